"""Model specs shared by the CLI and the dashboard, and pruned-model files.

`sample:NAME` (a trained sample model), `torchvision:NAME` or `timm:NAME` (random init unless
weights are given; nothing is downloaded), `hf:FOLDER_OR_CONFIG` (a local HuggingFace model folder,
or a config file for random init; see `prunecore.hf`) or `package.module:function` (any factory returning an
`nn.Module`). Constructor arguments follow the name in parentheses, `name=value` separated by commas;
each value is a Python literal read with `ast.literal_eval` (a number, string, True/False/None or a
tuple of them), never evaluated as code, so the spec string alone rebuilds the same model:

    >>> model = load_model("sample:resnet20")
    >>> model = load_model("torchvision:resnet18(num_classes=10)", weights="resnet18.pt")
    >>> model = load_model("timm:convnext_atto(in_chans=1,num_classes=10)")
    >>> model = load_model("mypkg.nets:build_net(width=2)")  # calls build_net(width=2)
    >>> canonical_spec("timm:resnet18( num_classes=10, in_chans=1 )")
    'timm:resnet18(in_chans=1,num_classes=10)'

A pruned model has new layer shapes, so its state_dict alone fits no class; a pruned-model file
keeps the model spec and the plan beside it, enough to rebuild the architecture and load it:

    >>> save_pruned("pruned.pt", apply_plan(model, plan), plan, "sample:resnet20")
    >>> pruned, plan = load_pruned("pruned.pt")

What loading a pruned-model file runs: the file is read with `weights_only=True` (no pickled code),
and a spec of a data kind (`DATA_SPEC_KINDS`: `sample:`, `torchvision:`, `timm:`, `hf:`) builds a registered
architecture, with arguments that are plain values (those that would load or download weights, such
as timm's `checkpoint_path`, are refused). A `package.module:function` spec in a file, with or without
arguments, is code and never runs (not even its module is imported) unless the caller names that
same spec (`model=`; the CLI's `--model`) or trusts the file (`trust_code=True`; the CLI's
`--trust-model-code`). Format /2 files also carry a SHA-256 over
spec, plan and weights, so a file edited or corrupted after saving is refused; it is a checksum, not
a signature (whoever edits a file can recompute it), so it never makes a file trusted.

    >>> load_pruned("downloaded.pt")  # it names 'mypkg.nets:build_net': ModelSpecError, nothing imported
    >>> load_pruned("downloaded.pt", model="mypkg.nets:build_net")  # the caller names it: it runs
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from prunecore.errors import UserError
from prunecore.files import write_atomic
from prunecore.graph import trace
from prunecore.plan import Plan, PlanError
from prunecore.surgery import apply_plan

__all__ = [
    "DATA_SPEC_KINDS",
    "PRUNED_FORMAT",
    "ModelSpec",
    "ModelSpecError",
    "canonical_spec",
    "default_input_shape",
    "example_input",
    "input_dtype",
    "load_model",
    "load_pruned",
    "load_weights_",
    "parse_spec",
    "save_pruned",
    "with_args",
    "write_atomic",
]

PRUNED_FORMAT = "prunecore.pruned/2"
_PRUNED_KEYS = {  # the keys of each format this prunecore reads; /1 files predate the hash
    "prunecore.pruned/1": ("format", "model", "plan", "state_dict"),
    PRUNED_FORMAT: ("format", "model", "plan", "state_dict", "sha256"),
}


class ModelSpecError(UserError, ValueError):
    """The model spec, its factory or its weights file cannot be used; the message says why."""


ArgValue = Any  # bool | int | float | str | None | tuple of these: what `ast.literal_eval` may return here
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_NAME = re.compile(r"[\w.\-]+")  # torchvision and timm names; timm's may carry a '.tag'
_PATH = re.compile(r"[\w.\-/~+@ ]*[\w.\-/~+@]")  # `hf:` names a local folder or config file
_FORMS = ("'sample:NAME', 'torchvision:NAME', 'timm:NAME', 'hf:FOLDER_OR_CONFIG' or 'package.module:function', "
          "each optionally followed by (arg=value, ...)")
_LOADING_ARGS = {  # constructor arguments that would download or read weights: never taken from a spec
    "torchvision": frozenset({"weights", "weights_backbone"}),
    "timm": frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"}),
}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: kind, name and constructor arguments (sorted); `str()` is its canonical form.

    >>> spec = parse_spec("timm:resnet18( num_classes=10, in_chans=1 )")
    >>> spec.kind, spec.name, spec.kwargs
    ('timm', 'resnet18', {'in_chans': 1, 'num_classes': 10})
    >>> str(spec)
    'timm:resnet18(in_chans=1,num_classes=10)'
    """

    kind: str  # a data kind (`DATA_SPEC_KINDS`) or, for a factory, the module to import
    name: str  # the architecture, or the factory function
    args: tuple[tuple[str, ArgValue], ...] = ()  # (name, value), sorted by name

    @property
    def kwargs(self) -> dict[str, ArgValue]:
        return dict(self.args)

    @property
    def runs_code(self) -> bool:
        """Whether building it imports and calls code (`package.module:function`), not a registered name."""
        return self.kind not in DATA_SPEC_KINDS

    def __str__(self) -> str:
        args = ",".join(f"{k}={_literal(v)}" for k, v in self.args)
        return f"{self.kind}:{self.name}({args})" if args else f"{self.kind}:{self.name}"


def parse_spec(spec: str) -> ModelSpec:
    """Read a model spec; `ModelSpecError` naming the part (or argument) that cannot be used.

    Arguments are `name=value` pairs whose values are literals (`ast.literal_eval`: numbers,
    strings, True/False/None, tuples of them); anything else, code included, is refused unrun.
    """
    kind, sep, rest = spec.strip().partition(":")
    name, paren, tail = rest.partition("(")
    kind, name = kind.strip(), name.strip()
    if not sep or not kind or not name:
        raise ModelSpecError(f"model spec {spec!r} must look like {_FORMS}")
    data = kind in DATA_SPEC_KINDS
    names = _PATH if kind == "hf" else _NAME
    if not (names.fullmatch(name) if data else _MODULE.fullmatch(kind) and name.isidentifier()):
        what = f"a {kind} model name" if data else "a package.module:function"
        raise ModelSpecError(f"model spec {spec!r} is not {what}; it must look like {_FORMS}")
    if not paren:
        return ModelSpec(kind, name)
    tail = tail.rstrip()
    if not tail.endswith(")"):
        raise ModelSpecError(f"model spec {spec!r}: its arguments must end with ')', e.g. {kind}:{name}(a=1,b='x')")
    args = _parse_args(spec, tail[:-1])
    if args and kind == "sample":
        raise ModelSpecError(f"model spec {spec!r}: sample models are fixed trained models and take no arguments")
    refused = sorted(_LOADING_ARGS.get(kind, frozenset()) & {k for k, _ in args})
    if refused:
        raise ModelSpecError(
            f"model spec {spec!r}: argument {refused[0]!r} would load or download weights, which a spec never "
            "does; give a state_dict file instead (weights=, --weights on the CLI, the uploader in the dashboard)"
        )
    return ModelSpec(kind, name, args)


def canonical_spec(spec: str) -> str:
    """The one spelling of a spec: arguments sorted, no spaces, so equal models give equal strings."""
    return str(parse_spec(spec))


def with_args(spec: str, args: Mapping[str, ArgValue]) -> str:
    """The canonical `spec` with `args` added (None values skipped); an argument given twice is an error.

    >>> with_args("timm:resnet18(drop_rate=0.1)", {"num_classes": 10, "in_chans": None})
    'timm:resnet18(drop_rate=0.1,num_classes=10)'
    """
    parsed = parse_spec(spec)
    extra = {k: v for k, v in args.items() if v is not None}
    twice = sorted(set(extra) & set(parsed.kwargs))
    if twice:
        raise ModelSpecError(f"model spec {spec!r} already sets {', '.join(twice)}; give each argument once")
    merged = ModelSpec(parsed.kind, parsed.name, tuple(sorted({**parsed.kwargs, **extra}.items())))
    return canonical_spec(str(merged))  # checks the added values as a typed spec would be checked


def _parse_args(spec: str, text: str) -> tuple[tuple[str, ArgValue], ...]:
    """`"num_classes=10, in_chans=1"` -> sorted (name, value) pairs; parsed with `ast`, never evaluated."""
    if not text.strip():
        return ()
    try:
        call = ast.parse(f"f({text})", mode="eval").body  # parsing runs nothing
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        reason = exc.msg if isinstance(exc, SyntaxError) else type(exc).__name__
        message = f"model spec {spec!r}: cannot read its arguments ({reason}); write name=value,..."
        raise ModelSpecError(message) from None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "f"):
        raise ModelSpecError(f"model spec {spec!r}: cannot read its arguments; write name=value,...")
    if call.args or any(kw.arg is None for kw in call.keywords):
        raise ModelSpecError(f"model spec {spec!r}: every argument needs a name (name=value)")
    names = [kw.arg for kw in call.keywords]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ModelSpecError(f"model spec {spec!r}: argument {twice[0]!r} is given more than once")
    args = []
    for kw in call.keywords:
        try:
            value = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            code = ast.unparse(kw.value)
            shown = code if len(code) <= 60 else code[:57] + "..."
            raise ModelSpecError(
                f"model spec {spec!r}: argument {kw.arg!r} is {shown!r}, not a plain value (a number, string, "
                "True/False/None or a tuple of them); constructor arguments are data, never code"
            ) from None
        problem = _plain(value)
        if problem:
            raise ModelSpecError(f"model spec {spec!r}: argument {kw.arg!r} is {problem}")
        args.append((kw.arg, value))
    return tuple(sorted(args))


def _plain(value: object) -> str | None:
    """Why `value` is not a plain spec value (None when it is one)."""
    if isinstance(value, tuple):
        return next(filter(None, map(_plain, value)), None)
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value}, not a finite number"
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    hint = " (write a tuple)" if isinstance(value, list) else ""
    return f"a {type(value).__name__}, not a number, string, True/False/None or a tuple of them{hint}"


def _literal(value: ArgValue) -> str:
    """The source text `ast.literal_eval` reads back as `value`, without spaces outside strings."""
    if isinstance(value, tuple):
        inner = ",".join(map(_literal, value))
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def load_model(spec: str, weights: str | Path | None = None, weights_name: str | None = None) -> nn.Module:
    """Build the model a spec names (random init unless `weights` is given), in eval mode.

    A `package.module:function` spec imports and calls that function: pass only specs the user
    typed, never one read from a file (`load_pruned` checks that first). `weights_name` is what
    error messages call the weights file (an upload's original name); the path by default.
    """
    parsed = parse_spec(spec)
    build = _DATA_KINDS.get(parsed.kind)
    model = build(parsed) if build is not None else _factory(parsed)
    if weights is not None:
        _load_weights(model, weights, weights_name, _fit_hint(parsed))
    return model.eval()


def default_input_shape(spec: str) -> tuple[int, ...] | None:
    """The example input a spec's model expects, where it is known (None for arbitrary factories).

    Arguments that change the input count: timm's `in_chans` and `img_size`, torchvision's `image_size`.
    """
    parsed = parse_spec(spec)
    kind, name, kwargs = parsed.kind, parsed.name, parsed.kwargs
    if kind == "sample":
        from prunecore.samples import SampleError, get_spec

        try:
            return get_spec(name).input_shape
        except SampleError as exc:
            raise ModelSpecError(str(exc)) from None
    if kind == "torchvision":
        side = 299 if name == "inception_v3" else 224
        return (1, 3, *_image_size(kwargs.get("image_size"), (side, side)))
    if kind == "timm":
        import timm

        cfg = timm.get_pretrained_cfg(name)
        c, h, w = cfg.input_size if cfg is not None and cfg.input_size else (3, 224, 224)
        chans = kwargs.get("in_chans")
        c = chans if isinstance(chans, int) and not isinstance(chans, bool) else c
        return (1, c, *_image_size(kwargs.get("img_size"), (h, w)))
    if kind == "hf":
        from prunecore.hf import HFError, example_shape

        try:
            return example_shape(name)[0]
        except HFError as exc:
            raise ModelSpecError(str(exc)) from None
    return None


def input_dtype(spec: str) -> torch.dtype:
    """What the model of a spec takes: token ids (int64) for language models, else float32 images."""
    parsed = parse_spec(spec)
    if parsed.kind == "sample":
        from prunecore.samples import SampleError, get_spec

        try:
            return torch.long if get_spec(parsed.name).data == "text" else torch.float32
        except SampleError as exc:
            raise ModelSpecError(str(exc)) from None
    if parsed.kind == "hf":
        from prunecore.hf import HFError, example_shape

        try:
            return torch.long if example_shape(parsed.name)[1] == "int64" else torch.float32
        except HFError as exc:
            raise ModelSpecError(str(exc)) from None
    return torch.float32


def example_input(spec: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The example input every face of prunecore traces a spec's model with: seeded noise, or token id 0."""
    if input_dtype(spec) == torch.long:
        return torch.zeros(shape, dtype=torch.long)  # (B, T): any vocabulary has id 0
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _image_size(value: ArgValue, default: tuple[int, int]) -> tuple[int, int]:
    """An `img_size`-style argument (an int, or a (height, width) tuple) as (H, W); `default` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value
    return default


def _construct(spec: ModelSpec, build: Callable[..., Any]) -> Any:
    """`build(**spec.kwargs)`; with arguments, a failure is the arguments' and names them."""
    if not spec.args:
        return build()
    try:
        return build(**spec.kwargs)
    except Exception as exc:  # TypeError for an unknown argument, anything for a value the model rejects
        text = str(exc)
        named = [k for k, _ in spec.args if f"'{k}'" in text] or [k for k, _ in spec.args]
        which = f"argument {named[0]!r}" if len(named) == 1 else f"arguments {', '.join(map(repr, named))}"
        raise ModelSpecError(f"model spec {str(spec)!r}: {which} did not work: {_reason(exc)}") from None


def _sample(spec: ModelSpec) -> nn.Module:
    from prunecore.samples import SampleError, load_sample

    try:
        return load_sample(spec.name).model
    except SampleError as exc:
        raise ModelSpecError(str(exc)) from None


def _torchvision(spec: ModelSpec) -> nn.Module:
    import torchvision

    name = spec.name
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = [n for n in available if name.split("_")[0] in n][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelSpecError(f"torchvision has no classification model {name!r}{hint}")
    return _construct(spec, lambda **kwargs: torchvision.models.get_model(name, weights=None, **kwargs))


def _timm(spec: ModelSpec) -> nn.Module:
    """A timm architecture with random init: `pretrained=False`, so nothing is downloaded."""
    try:
        import timm
    except ImportError:
        raise ModelSpecError("model spec 'timm:...' needs timm: pip install 'prunecore[timm]'") from None
    name = spec.name
    available = timm.list_models()
    if name not in available:
        close = [n for n in available if n.startswith(name.split("_")[0])][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelSpecError(f"timm has no model {name!r}{hint}")
    return _construct(spec, lambda **kwargs: timm.create_model(name, pretrained=False, **kwargs))


def _hf(spec: ModelSpec) -> nn.Module:
    """A transformers model from a local folder or config file (`prunecore.hf`): no download, no remote code."""
    from prunecore.hf import HFError, load_hf

    kwargs = spec.kwargs
    kwargs.pop("tokenizer", None)  # for text data (`prunecore.hf.tokenizer_for`), not the model
    try:
        return load_hf(spec.name, kwargs.pop("task", None), **kwargs)
    except HFError as exc:
        raise ModelSpecError(str(exc)) from None


_DATA_KINDS: Mapping[str, Callable[[ModelSpec], nn.Module]] = {
    "sample": _sample,
    "torchvision": _torchvision,
    "timm": _timm,
    "hf": _hf,
}
DATA_SPEC_KINDS = frozenset(_DATA_KINDS)
"""Spec kinds that name a registered architecture, not code: a pruned-model file may name them.

Every other `kind:name` is `package.module:function`, which imports and calls code.
"""


def _factory(spec: ModelSpec) -> nn.Module:
    module_name, attr = spec.kind, spec.name
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while it runs
        raise ModelSpecError(f"cannot import {module_name!r} for model spec {str(spec)!r}: {_reason(exc)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"{module_name!r} has no callable {attr!r}")
    if spec.args:
        model = _construct(spec, factory)
    else:
        try:
            model = factory()
        except Exception as exc:  # the user's code: any error is the spec's failure, reported on one line
            raise ModelSpecError(f"model factory {spec}() raised {_reason(exc)}") from None
    if not isinstance(model, nn.Module):
        called = f"{spec}" if spec.args else f"{spec}()"
        raise ModelSpecError(f"{called} returned {type(model).__name__}, not an nn.Module")
    return model


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _fit_hint(spec: ModelSpec) -> str:
    """What to try when weights do not fit a registered architecture: its constructor arguments."""
    if spec.kind not in ("torchvision", "timm"):
        return ""
    return (f"; if they were trained with other constructor arguments, name them in the spec, e.g. "
            f"{spec.kind}:{spec.name}(num_classes=10)")  # fmt: skip


def load_weights_(model: nn.Module, path: str | Path, name: str | None = None) -> nn.Module:
    """Load a `state_dict` file into `model` without unpickling arbitrary objects.

    `name` is what error messages call the file (e.g. an upload's original name); the path by default.
    """
    return _load_weights(model, path, name, "")


def _load_weights(model: nn.Module, path: str | Path, name: str | None, hint: str) -> nn.Module:
    path = Path(path)
    where = f"weights file {name or str(path)!r}"
    if not path.is_file():
        raise ModelSpecError(f"{where} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelSpecError(
            f"{where} is not a readable PyTorch weights file (corrupt, truncated, or not "
            f"saved with torch.save; loading is restricted to weights_only=True): {_load_failure(exc)}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSpecError(f"{where} does not hold a state_dict of tensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ModelSpecError(f"{where} does not fit {type(model).__name__}: {detail}{hint}") from None
    return model


# -- pruned-model files ---------------------------------------------------------------------------
def save_pruned(path: str | Path, pruned: nn.Module, plan: Plan, model_spec: str) -> Path:
    """Save `pruned` (the result of applying `plan` to `load_model(model_spec)`) so it can be rebuilt.

    The file is a `torch.save` of plain data (format tag, canonical spec, plan JSON, state_dict and
    their SHA-256), readable with `weights_only=True`: loading it never unpickles code.
    """
    payload: dict[str, Any] = {
        "format": PRUNED_FORMAT,
        "model": canonical_spec(model_spec),
        "plan": plan.to_json(),
        "state_dict": pruned.state_dict(),
    }
    payload["sha256"] = _pruned_digest(payload)
    return write_atomic(path, lambda f: torch.save(payload, f))


def load_pruned(path: str | Path, trust_code: bool = False, model: str | None = None) -> tuple[nn.Module, Plan]:
    """Rebuild the model `save_pruned` wrote: its architecture, the plan applied, then its weights.

    The architecture comes from the recorded spec (its own weights are overwritten), is re-traced
    on the plan's inputs and pruned by the plan, so the state_dict must fit exactly (strict load).
    A recorded `package.module:function` spec is code, run only when `model` (the spec the caller
    itself names) is that same spec, arguments included (compared canonically), or `trust_code` is
    set; nothing is imported before that check.
    Raises `ModelSpecError` for an unreadable, foreign, edited or untrusted file, `PlanError` for a
    plan that does not fit the model.
    """
    payload = _read_pruned(Path(path))
    where = f"pruned-model file {str(path)!r}"
    spec = payload["model"]
    try:
        _check_runnable(spec, trust_code, model)
        plan = Plan.from_json(payload["plan"])
        built = load_model(spec)
    except (ModelSpecError, PlanError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
    graph = trace(built, tuple(s.example() for s in plan.inputs))
    try:
        plan.check(graph)
    except PlanError as exc:
        raise PlanError(f"{where}: {exc}") from None
    pruned = apply_plan(built, plan, graph=graph)
    try:
        pruned.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:3])
        raise ModelSpecError(f"{where}: its weights do not fit {spec} pruned by its plan: {detail}") from None
    return pruned.eval(), plan


def _check_runnable(spec: str, trust_code: bool, model: str | None) -> None:
    """Refuse a code spec read from a file unless the caller named it or trusts the file; imports nothing."""
    parsed = parse_spec(spec)  # the text only, as load_model will read it; imports nothing
    if not parsed.runs_code or trust_code or _same_spec(model, parsed):
        return
    other = f" (the model you named is {model!r})" if model is not None else ""
    raise ModelSpecError(
        f"it names code {spec!r} as its model{other} and prunecore does not run code named in a file; "
        f"if you trust the file, pass that same spec (model={spec!r}, --model {spec} on the CLI) or "
        "trust_code=True (--trust-model-code on the CLI)"
    )


def _same_spec(named: str | None, recorded: ModelSpec) -> bool:
    """Whether the caller's spec is the recorded one, arguments included, however either is spelled."""
    if named is None:
        return False
    try:
        return canonical_spec(named) == str(recorded)
    except ModelSpecError:
        return False


def _read_pruned(path: Path) -> dict[str, Any]:
    """The validated payload of a pruned-model file; `ModelSpecError` saying what is wrong otherwise."""
    where = f"pruned-model file {str(path)!r}"
    if not path.is_file():
        raise ModelSpecError(f"{where} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        message = f"{where} is not readable (corrupt, truncated, or not saved with torch.save): {_load_failure(exc)}"
        raise ModelSpecError(message) from None
    if not isinstance(payload, dict) or "format" not in payload:
        plain = isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values())
        what = "a plain state_dict" if plain else f"a {type(payload).__name__}"
        raise ModelSpecError(f"{where} holds {what}, not a pruned model ({PRUNED_FORMAT}, written by "
                             "`prunecore apply` or save_pruned)")  # fmt: skip
    keys = _PRUNED_KEYS.get(payload["format"]) if isinstance(payload["format"], str) else None
    if keys is None:
        readable = " or ".join(map(repr, _PRUNED_KEYS))
        raise ModelSpecError(f"{where} has format {payload['format']!r}; this prunecore reads {readable}")
    missing, unknown = set(keys) - set(payload), set(payload) - set(keys)
    if missing or unknown:
        problem = f"lacks {sorted(missing)}" if missing else f"has unknown keys {sorted(map(str, unknown))}"
        raise ModelSpecError(f"{where} {problem}")
    for key, kind in (("model", str), ("plan", str), ("state_dict", dict), ("sha256", str)):
        if key in keys and not isinstance(payload[key], kind):
            raise ModelSpecError(f"{where}: {key!r} must be a {kind.__name__}, got {type(payload[key]).__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()):
        raise ModelSpecError(f"{where}: 'state_dict' must map names to tensors")
    if "sha256" in keys and payload["sha256"] != _pruned_digest(payload):
        raise ModelSpecError(f"{where} does not match its SHA-256: its plan or weights were changed after saving")
    return payload


def _pruned_digest(payload: Mapping[str, Any]) -> str:
    """SHA-256 over format, spec, plan JSON and each tensor's name, dtype, shape and bytes, by name.

    Every field is length-prefixed, so no two different payloads hash the same bytes.
    """
    digest = hashlib.sha256()

    def field(data: bytes | memoryview) -> None:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for key in ("format", "model", "plan"):
        field(payload[key].encode())
    state = payload["state_dict"]
    for name in sorted(state):
        tensor = state[name].detach().cpu().resolve_conj().resolve_neg().contiguous()
        field(name.encode())
        field(str(tensor.dtype).encode())
        field(",".join(map(str, tensor.shape)).encode())
        field(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # raw bytes, any dtype
    return digest.hexdigest()


def _load_failure(exc: BaseException) -> str:
    """The informative line of a `torch.load` error: the unpickler's reason, not its weights_only advice."""
    text = str(exc)
    _, found, reason = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (reason if found else text).splitlines() if line.strip()]
    return lines[0].split(" was not an allowed global")[0][:200] if lines else type(exc).__name__
