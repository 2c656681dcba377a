"""The tracing mechanism behind `trace`: run the model for real and watch every op.

Why eager, not `torch.fx`: symbolic tracing sees Python-level calls of a *symbolic* run, so
control flow that reads shapes (NFNet, MobileViT, TResNet, EfficientViT) breaks it, and module
subclasses that call functionals (timm's `BatchNormAct2d` calls `F.batch_norm`) need one rule per
class. Here the model runs once on the real example inputs under a `TorchFunctionMode`, which
sees every torch function, functional and tensor method at the outermost level, whatever Python
the model runs around them; module hooks give the module scope. Parameters are recognised by
identity, so a functional call with `self.weight` is as well understood as the module.

Sizes read from a tensor (`x.shape`, `x.size(1)`) come back as `SizeInt`s that remember which
channel ids they measure; a reshape by such a size follows pruned channels only where the size
and the data shrink together (checked once every tie is known), where fx had to trust any size
computed at run time.

Modules whose stock forward a rule knows (Conv, Linear, BatchNorm, LayerNorm, attention, ...) are
followed by their module rule and their inside is not looked at; every other module is entered.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from prunecore import _rules, ops
from prunecore._labels import Coupling, shape_sizes

__all__ = ["Recorder"]


class _Shape(tuple):
    """`x.shape` during a trace: a tuple of `SizeInt`s that also answers `numel()` like torch.Size."""

    def numel(self) -> int:
        n = 1
        for s in self:
            n *= int(s)
        return n


_METADATA = {"dim", "ndimension", "numel", "nelement", "get_device", "is_contiguous", "is_floating_point",
             "is_complex", "element_size", "data_ptr", "stride", "storage_offset", "__len__", "type"}  # fmt: skip
_GETSET_PLAIN = {"ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_leaf", "grad_fn", "names",
                 "is_sparse", "is_quantized", "is_meta", "is_nested", "itemsize", "nbytes", "_version",
                 "grad"}  # fmt: skip


@dataclass
class _Frame:
    name: str
    module: nn.Module
    rule: Callable | None  # a module rule: the module is followed whole, its inside is not looked at


@dataclass
class Recorder:
    """Runs a model under the mode and hooks, labelling every value; the state of one trace."""

    model: nn.Module
    st: Coupling
    leaves: tuple[type, ...] = ()
    labels: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    watched: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    stack: list[_Frame] = field(default_factory=list)
    used: set[str] = field(default_factory=set)
    current: str = "before the first op"
    busy: bool = False

    def __post_init__(self) -> None:
        self.names = {id(m): n for n, m in self.model.named_modules(remove_duplicate=False)}
        self.tensor_names: dict[int, str] = {}
        for name, t in self.model.named_parameters(remove_duplicate=False):
            self.tensor_names.setdefault(id(t), name)
        for name, t in self.model.named_buffers(remove_duplicate=False):
            self.tensor_names.setdefault(id(t), name)
        self.thread = threading.get_ident()
        self.constant_types = ops.constants_types()

    # -- running ---------------------------------------------------------------------------------
    def run(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        handles = []
        for module in self.model.modules():
            handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            handles.append(module.register_forward_hook(self._leave, with_kwargs=True))
        try:
            for x in inputs:
                self.labels[x] = _rules.fixed_like(x)
            with torch.no_grad(), _Mode(self):
                out = self.model(*inputs)
        finally:
            for h in handles:
                h.remove()
        outputs = list(_tensors(out))
        _rules.output(self.st, [self.labels.get(t) for t in outputs])
        for t in outputs:
            self._check_watched(t)
        return out

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != self.thread:
            return
        name = self.names.get(id(module), type(module).__name__)
        self.used.add(name)
        if self._inside_whole():
            rule = None
        elif self.leaves and isinstance(module, self.leaves):
            rule = _rules.opaque
        else:
            rule = ops.rule(module)
        if rule is not None:
            self.current = f"{type(module).__name__} module {name!r}"
            # a leaf runs its children itself (MultiheadAttention's out_proj)
            self.used.update(f"{name}.{child}".strip(".") for child, _ in module.named_modules())
        self.stack.append(_Frame(name, module, rule))

    def _leave(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if threading.get_ident() != self.thread or not self.stack or self.stack[-1].module is not module:
            return
        frame = self.stack.pop()
        if frame.rule is None or self._inside_whole():
            return
        self.busy = True  # the rule's own torch calls are bookkeeping, not the model's ops
        try:
            call = self._call(module, args, kwargs, out, module=module, name=frame.name)
            self._label_output(call, frame.rule, out)
        finally:
            self.busy = False

    def on_call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        if self.busy or self._inside_whole():
            return func(*args, **kwargs)  # bookkeeping, or inside a module followed whole
        self.current = f"{_rules.function_name(func)} in {self.scope_name()}"
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__get__":
            return self._attribute(getattr(getattr(func, "__self__", None), "__name__", ""), args[0], out)
        if name == "size" and args and isinstance(args[0], torch.Tensor):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            return self._sizes(args[0], out, dim)
        if name in _METADATA:
            return out
        for t in _tensors((args, kwargs)):
            self._check_watched(t)
        rule = _rules.function_rule(func)
        call = self._call(func, args, kwargs, out, by_name=getattr(rule, "params_by_name", False))
        if not _has_tensor(out):
            if any(True for _ in _rules.walk_labels((call.labels, call.klabels))):
                # a value computed from the channels leaves the tensor world (x.tolist(), a bool)
                _rules.block_inputs(call, f"is turned into a non-tensor value by {call.where}")
            return out
        self._label_output(call, rule, out)
        return out

    # -- labels ------------------------------------------------------------------------------------
    def _call(self, fn: Any, args: tuple, kwargs: dict, out: Any, module: nn.Module | None = None,
              name: str = "", by_name: bool = False) -> _rules.Call:  # fmt: skip
        """The rule's view of one op; `by_name`: parameters get no per-element labels (the rule names them)."""
        by_name = by_name or module is not None
        labels = tuple(self._label_of(a, by_name) for a in args)
        klabels = {k: self._label_of(v, by_name) for k, v in kwargs.items()}
        return _rules.Call(
            fn, tuple(args), dict(kwargs), labels, klabels, out, self.st, module,
            name or self.scope_name(), self.scope(), self.tensor_names,
            any(isinstance(f.module, self.constant_types) for f in self.stack), _model_line(), self.watch,
        )  # fmt: skip

    def _label_of(self, value: Any, by_name: bool) -> Any:
        if isinstance(value, torch.Tensor):
            lab = self.labels.get(value)
            if lab is not None:
                return lab
            target = self.tensor_names.get(id(value))
            if target is not None and not by_name and value.dim() > 0 and value.numel() <= 1 << 22:
                return self.st.param(target, value)  # a loose parameter: one id per element (a 0-d one has none)
            return _rules.fixed_like(value)
        if isinstance(value, (tuple, list)):
            return tuple(self._label_of(v, by_name) for v in value)
        if isinstance(value, dict):
            return {k: self._label_of(v, by_name) for k, v in value.items()}
        return None

    def _label_output(self, call: _rules.Call, rule: Callable, out: Any) -> None:
        try:
            label = rule(call)
        except Exception as exc:  # a rule that cannot follow an op must not crash the trace
            _rules.block_inputs(call, f"reaches {call.where}, which prunecore could not follow ({exc})")
            label = _rules.fixed_like(out)
        self._store(out, _rules.finish(self.st, label))

    def _store(self, value: Any, label: Any) -> None:
        if isinstance(value, torch.Tensor):
            if isinstance(label, torch.Tensor) and label.dim() == value.dim():
                self.labels[value] = label
            else:
                self.labels[value] = _rules.fixed_like(value)
        elif isinstance(value, (tuple, list)):
            labels = label if isinstance(label, (tuple, list)) and len(label) == len(value) else [None] * len(value)
            for v, lab in zip(value, labels):
                self._store(v, lab)
        elif isinstance(value, dict):
            labels = label if isinstance(label, dict) else {}
            for k, v in value.items():
                self._store(v, labels.get(k))

    def _attribute(self, attr: str, tensor: Any, out: Any) -> Any:
        if not isinstance(tensor, torch.Tensor):
            return out
        if attr == "shape":
            return self._sizes(tensor, out)
        if attr in _GETSET_PLAIN or not isinstance(out, torch.Tensor):
            return out
        lab = self._label_of(tensor, by_name=False)
        if attr in ("data", "real"):
            self.labels[out] = lab
        elif attr in ("T", "mT", "H", "mH"):
            full = lab.expand(tensor.shape)
            self.labels[out] = full.permute(*reversed(range(full.dim()))) if attr in ("T", "H") else full.mT
        else:
            _rules.block_inputs(self._call(getattr, (tensor,), {}, out), f"is read as .{attr}")
        return out

    def _sizes(self, tensor: torch.Tensor, out: Any, dim: int | None = None) -> Any:
        """`x.shape` / `x.size(d)` as `SizeInt`s carrying the ids that own the positions along each dim."""
        lab = self.labels.get(tensor)
        sizes = shape_sizes(tuple(tensor.shape), lab if lab is not None else _rules.fixed_like(tensor))
        if dim is not None:
            return sizes[dim]
        return _Shape(sizes)

    # -- heads-averaged attention weights and similar outputs that must stay unused ----------------
    def watch(self, value: torch.Tensor, ids: torch.Tensor, reason: str) -> None:
        """Block `ids` if `value` is ever read by another op or returned."""
        self.watched[value] = (ids, reason)

    def _check_watched(self, t: torch.Tensor) -> None:
        hit = self.watched.get(t)
        if hit is not None:
            self.st.block(*hit)

    # -- scope -------------------------------------------------------------------------------------
    def _inside_whole(self) -> bool:
        """Whether an enclosing module is followed whole by its rule (its inside is not looked at)."""
        return any(f.rule is not None for f in self.stack)

    def scope(self) -> tuple[type, ...]:
        return (type(self.model),) + tuple(type(f.module) for f in self.stack)

    def scope_name(self) -> str:
        name = self.stack[-1].name if self.stack else ""
        return repr(name) if name else type(self.model).__name__


_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _model_line() -> str:
    """`file.py:line` of the innermost frame outside torch and prunecore: the model code that made the call."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_LIBRARY_DIRS):
            return f"{os.path.basename(filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return ""


class _Mode(TorchFunctionMode):
    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return self.recorder.on_call(func, args, kwargs or {})


_tensors = _rules.walk_labels  # every tensor of a nested value, as of a nested label


def _has_tensor(value: Any) -> bool:
    return any(True for _ in _tensors(value))
