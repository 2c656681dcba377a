"""The registry of module handlers: one `Handler` record per module type.

`ops.core` knows torch.nn, `ops.torchvision` torchvision's transformer classes, `ops.timm` timm,
`ops.transformers` HuggingFace transformers. Each declares a list of records; this module
assembles them, with records registered at run time (`register`, `cost.register_flops`) consulted
first. A library's records load once the user's code has imported the library (for transformers,
the classes of the model modules imported so far): a module can only be an instance of a class
whose library is loaded, and importing torchvision.models and timm would cost every worker process
and CLI call about 1.5 s that a model of plain torch.nn layers never needs. Lookups walk the
module's MRO, nearest class first, separately for each aspect (rule, fix, FLOPs, stand-alone layer).
"""

from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from prunecore.ops import core
from prunecore.ops.handler import FlopRule, FlopTerm, Handler, LayerBuilder, arg

__all__ = [
    "FlopRule", "FlopTerm", "Handler", "LayerBuilder", "arg", "constants_types", "fix", "flops", "layer", "register",
    "rule", "whole_types",
]  # fmt: skip

_LIBRARIES = ("torchvision", "timm")  # optional libraries whose records load once the user's code imports them


@functools.cache
def _library_handlers(library: str) -> tuple[Handler, ...]:
    """The records of one optional library (imported by now)."""
    if library == "torchvision":
        from prunecore.ops import torchvision

        return tuple(torchvision.HANDLERS)
    try:
        from prunecore.ops import timm as timm_handlers
    except (ImportError, AttributeError) as exc:  # a timm too old for the classes the handlers name
        warnings.warn(f"prunecore's timm handlers need timm>=1.0 ({exc}); timm models are followed op by op only",
                      stacklevel=3)  # fmt: skip
        return ()
    return tuple(timm_handlers.HANDLERS)


_REGISTERED: list[Handler] = []


def register(handler: Handler) -> Handler:
    """Add a record; it wins over the libraries' records for the same class."""
    _REGISTERED.append(handler)
    return handler


@dataclass(frozen=True)
class _Tables:
    """The registry in the forms lookups need, built once per registry state (not per module)."""

    ordered: tuple[Handler, ...]  # the latest registration first, then the libraries
    by_aspect: dict[str, dict[type, Handler]]  # aspect -> class -> the first handler with that aspect
    whole: tuple[type, ...]
    constants: tuple[type, ...]


@functools.lru_cache(maxsize=8)
def _build(
    registered: tuple[Handler, ...], libraries: tuple[str, ...], transformers_modules: tuple[str, ...]
) -> _Tables:
    late: tuple[Handler, ...] = ()
    if transformers_modules:
        from prunecore.ops import transformers as hf

        late = hf.handlers(transformers_modules)
    loaded = tuple(h for lib in libraries for h in _library_handlers(lib))
    ordered = registered[::-1] + tuple(core.HANDLERS) + loaded + late
    by_aspect: dict[str, dict[type, Handler]] = {}
    for aspect in ("rule", "fix", "flops", "layer"):
        table = by_aspect[aspect] = {}
        for h in ordered:
            if getattr(h, aspect) is not None:
                for t in h.types:
                    table.setdefault(t, h)
    whole = tuple(t for h in ordered if h.whole for t in h.types)
    constants = tuple(t for h in ordered if h.constants for t in h.types)
    return _Tables(ordered, by_aspect, whole, constants)


def _tables() -> _Tables:
    libraries = tuple(lib for lib in _LIBRARIES if lib in sys.modules)
    return _build(tuple(_REGISTERED), libraries, _transformers_modules())


def _transformers_modules() -> tuple[str, ...]:
    """The transformers model modules imported so far, whose classes have records; () before transformers is."""
    if "transformers" not in sys.modules:
        return ()
    from prunecore.ops import transformers as hf

    return hf.loaded()


def _nearest(module: nn.Module, aspect: str) -> Handler | None:
    table = _tables().by_aspect[aspect]
    return next((table[cls] for cls in type(module).__mro__ if cls in table), None)


def whole_types() -> tuple[type, ...]:
    """Types followed whole even where a subclass has its own forward."""
    return _tables().whole


def constants_types() -> tuple[type, ...]:
    """Types whose forward reads shape constants that their `fix` re-derives."""
    return _tables().constants


def rule(module: nn.Module) -> Callable[[Any], Any] | None:
    """The rule that follows `module` whole, or None to look inside its forward.

    A rule applies to the class it was written for and to subclasses that keep that forward (or
    a torch.nn one); a subclass with its own forward (timm's `BatchNormAct2d`, `Conv2dSame`) is
    entered, and the functionals it calls are followed with its parameters.
    """
    tables = _tables()
    whole = isinstance(module, tables.whole)
    owner = next(k for k in type(module).__mro__ if "forward" in vars(k))
    for cls in type(module).__mro__:
        for h in tables.ordered:
            if h.rule is not None and cls in h.types:
                if whole or owner in h.types or owner.__module__.startswith("torch.nn."):
                    return h.rule
    return None


def fix(module: nn.Module) -> Callable[[Any], None] | None:
    """The shape-attribute fix of the nearest registered class, if any."""
    h = _nearest(module, "fix")
    return h.fix if h is not None else None


def flops(module: nn.Module) -> FlopRule | None:
    """The FLOP formula of the nearest registered class, if any."""
    h = _nearest(module, "flops")
    return h.flops if h is not None else None


def layer(module: nn.Module) -> LayerBuilder | None:
    """The stand-alone layer builder of the nearest registered class, if any (latency tables)."""
    h = _nearest(module, "layer")
    return h.layer if h is not None else None
