"""`trace`: find the groups of channels that must be removed together.

The model runs once on the example inputs with every torch op watched (see `_tracer.py`); beside
every value the tracer carries a label saying which channel owns each element (see `_labels.py`),
and each op moves the labels by a rule (see `_rules.py`). Channels that an op ties together (a
residual add, the two halves of a chunk, a depthwise conv's input and output) end up in one set;
producers whose channels share a set form one `ChannelGroup`.

Example:
    >>> graph = trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> g = graph["layer1.0.conv1"]
    >>> g.size, g.producers
    (64, ('layer1.0.conv1',))
    >>> [(m.module, m.tensor, m.dim) for m in g.members][:3]
    [('layer1.0.conv1', 'weight', 0), ('layer1.0.bn1', 'weight', 0), ...]
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from prunecore._concurrency import forward_pass
from prunecore.errors import ArgumentError, UserError
from prunecore._labels import FIXED, Coupling, Slot, compress, varying_dims
from prunecore._modes import eval_mode, training_flags, working_copy
from prunecore._tracer import Recorder

__all__ = ["ChannelGraph", "ChannelGroup", "InputSpec", "Member", "TraceError", "trace"]


class TraceError(UserError, RuntimeError):
    """The model could not be traced; the message names the failing part and what to do."""


@dataclass(frozen=True, eq=False)
class Member:
    """One tensor dimension that loses positions when units of a group are removed.

    `unit_of[i]` is the index of the group unit that owns position `i` along `dim`, or -1 when the
    position belongs to another group or to no group.
    """

    module: str
    tensor: str
    dim: int
    unit_of: torch.Tensor  # (tensor.shape[dim],) long

    @property
    def path(self) -> str:
        return f"{self.module}.{self.tensor}" if self.module else self.tensor


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Channels that must be removed together, counted in *units*.

    A unit is one channel for ordinary convs and Linears; where a grouped conv forces whole conv
    groups out together, a unit is one conv group. `size` is the number of units: sparsity and
    rounding apply to units.
    """

    name: str
    size: int
    producers: tuple[str, ...]
    members: tuple[Member, ...]
    prunable: bool
    reason: str = ""
    channels: int = 0  # output channels of the first producer

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"not prunable: {self.reason}"
        return f"ChannelGroup({self.name!r}, size={self.size}, members={len(self.members)}, {state})"


MAX_EXAMPLE_BYTES = 2**30  # an example input is a batch to trace on; a plan asking for more is not one


@dataclass(frozen=True)
class InputSpec:
    """Shape and dtype of one example input, enough to re-trace a model later."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def of(cls, tensor: torch.Tensor) -> InputSpec:
        return cls(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))

    def example(self) -> torch.Tensor:
        """A deterministic tensor of this shape and dtype (random normal, or zeros for integer inputs)."""
        dtype = getattr(torch, self.dtype, None) if isinstance(self.dtype, str) else None
        if not isinstance(dtype, torch.dtype):
            raise ArgumentError(f"example input dtype {self.dtype!r} is not a torch dtype (e.g. 'float32', 'int64')")
        shape = tuple(self.shape)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise ArgumentError(f"example input shape {shape} must be non-negative integers")
        size = math.prod(shape) * dtype.itemsize
        if size > MAX_EXAMPLE_BYTES:
            raise ArgumentError(
                f"example input of shape {shape} ({self.dtype}) would take {size / 2**30:.1f} GiB; an example input "
                f"is one small batch (at most {MAX_EXAMPLE_BYTES // 2**30} GiB). Was the plan made for another model?"
            )
        if dtype.is_floating_point:
            return torch.randn(self.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        return torch.zeros(self.shape, dtype=dtype)


@dataclass(frozen=True, eq=False)
class ChannelGraph:
    """All channel groups of a model, in the order their first producer runs."""

    groups: tuple[ChannelGroup, ...]
    inputs: tuple[InputSpec, ...]
    model_type: str = ""
    unreached: tuple[str, ...] = field(default=())
    norm_dims: tuple[tuple[str, int], ...] = field(default=())  # (norm module, input dim of its channels)

    def __getitem__(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no channel group named {name!r}; the model has: {', '.join(g.name for g in self.groups)}")

    def __contains__(self, name: object) -> bool:
        return any(g.name == name for g in self.groups)

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the channel structure (groups, their members and unit maps), not of the weights.

        Two models a plan can be applied to identically have equal fingerprints: a fresh copy of
        the architecture, a fine-tuned one, the same model traced again. A plan records it so that
        applying it to another architecture is refused.
        """
        h = hashlib.sha256(self.model_type.encode())
        for g in self.groups:
            h.update(f"|{g.name}:{g.size}:{g.prunable}".encode())
            for m in g.members:
                h.update(f"|{m.module}.{m.tensor}:{m.dim}".encode())
                h.update(m.unit_of.to(torch.int64).numpy().tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        lines = [f"{self.model_type}: {len(self.groups)} channel groups, {len(self.prunable)} prunable"]
        for g in self.groups:
            state = "" if g.prunable else f"  [fixed: {g.reason}]"
            lines.append(f"  {g.name:<40} {g.size:>6} units  {len(g.members):>3} members{state}")
        return "\n".join(lines)


# -- tracing --------------------------------------------------------------------------------------
def failing_frame(exc: BaseException) -> str:
    """Name the line of the user's code that was running when `exc` was raised."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if "/torch/" not in filename and "prunecore" not in filename:
            last = tb
        tb = tb.tb_next
    if last is None:
        return ""
    code = last.tb_frame.f_code
    return f" (in {code.co_name}, {code.co_filename}:{last.tb_lineno})"


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in example_inputs):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor or a tuple of tensors")


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...], st: Coupling, leaves: tuple[type, ...]) -> set[str]:
    """Run the model once under the recorder; the names of the modules (and owners of tensors) it used."""
    recorder = Recorder(model, st, leaves)
    try:
        with forward_pass():
            recorder.run(inputs)
    except Exception as exc:
        where = f"at {recorder.current}"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TraceError(
            f"running {type(model).__name__} on the example inputs failed {where}{failing_frame(exc)}: "
            f"{type(exc).__name__}: {first_line}. Check that the example inputs have the shape the model expects."
        ) from None
    used = set(recorder.used)
    used.update(name.rpartition(".")[0] for name in st.params)
    return used


def trace(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    leaf_modules: Sequence[type] = (),
) -> ChannelGraph:
    """Find every group of channels of `model` that must be removed together.

    The model is traced in eval mode; modules that only run in training mode (auxiliary heads)
    are found by a second trace in training mode, so pruning keeps them consistent too. The model
    is not changed, not even for a moment: hooks and training flags go on a `working_copy` that
    shares its tensors, so other threads may run or copy the model meanwhile.
    """
    inputs = _as_tuple(example_inputs)
    leaves = tuple(leaf_modules)
    st = Coupling()
    model = working_copy(model)
    with eval_mode(model):
        used = _run(model, inputs, st, leaves)
    with_params = {name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    unreached = with_params - used
    if unreached:
        try:
            # BatchNorm stays in eval so that no running statistics move
            with training_flags(model, lambda m: not isinstance(m, nn.modules.batchnorm._BatchNorm)):
                used |= _run(model, inputs, st, leaves)
        except TraceError as exc:
            warnings.warn(
                f"{len(unreached)} modules run only in training mode ({', '.join(sorted(unreached)[:3])}, ...) "
                f"and could not be traced on the example inputs ({exc}); pruning leaves them as they "
                "are, so the pruned model works in eval mode only. Trace with a larger input to include them.",
                stacklevel=2,
            )
        unreached = with_params - used
    _tie_shared(model, st)
    groups = _build_groups(model, st)
    return ChannelGraph(
        groups=groups,
        inputs=tuple(InputSpec.of(x) for x in inputs),
        model_type=type(model).__name__,
        unreached=tuple(sorted(unreached)),
        norm_dims=tuple(sorted(st.norm_dims.items())),
    )


# -- from ids to groups ---------------------------------------------------------------------------
def _tie_shared(model: nn.Module, st: Coupling) -> None:
    """A tensor several modules hold (an LM head tied to the token embeddings) loses the same positions in all.

    Slots are named by module, so without this the embedding's width and the head's input would
    be two groups slicing one tensor two ways.
    """
    holders: dict[int, list[tuple[str, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for tensor_name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            holders.setdefault(id(tensor), []).append((name, tensor_name))
    for aliases in holders.values():
        if len(aliases) < 2:
            continue
        for dim in sorted({d for (m, t, d) in st.slots if (m, t) in aliases}):
            recorded = [st.slots[(m, t, dim)] for m, t in aliases if (m, t, dim) in st.slots]
            for ids in recorded[1:]:
                st.unify(recorded[0], ids, f"is tensor {aliases[0][0]}.{aliases[0][1]}, which several modules share")
            for m, t in aliases:
                st.slots.setdefault((m, t, dim), recorded[0])


def _param_slots(st: Coupling) -> dict[Slot, torch.Tensor]:
    """Loose parameters (read via get_attr) become slots along the one dim their channels vary.

    Elements tied to no producer's channel keep their own ids; they are nobody's channels.
    """
    is_channel = torch.zeros(len(st.parent) + 1, dtype=torch.bool)  # indexed by id + 1 (FIXED -> 0)
    for ids in st.origins.values():
        is_channel[st.roots(ids) + 1] = True
    slots = {}
    for target, ids in st.params.items():
        roots = st.roots(ids)
        roots = compress(torch.where(is_channel[roots + 1], roots, FIXED))
        if not bool((roots >= 0).any()):
            continue
        module, _, tensor = target.rpartition(".")
        varying = varying_dims(roots)
        if len(varying) == 1:
            (dim,) = varying
            index = tuple(slice(None) if d == dim else 0 for d in range(roots.dim()))
            slots[(module, tensor, dim)] = roots[index]
        elif varying:
            st.block(ids, f"parameter {target!r} carries channels along several dims")
    return slots


def _build_groups(model: nn.Module, st: Coupling) -> tuple[ChannelGroup, ...]:
    st.check_whole()
    st.check_sizes()
    slots = {slot: st.roots(ids) for slot, ids in st.slots.items()}
    slots.update(_param_slots(st))
    blocked: dict[int, str] = {}
    for i, reason in st.blocked.items():
        blocked.setdefault(st.find(i), reason)

    # producers sharing any root form one group
    order = list(st.origins)
    owner: dict[int, int] = {}
    parent = list(range(len(order)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    origin_roots = [st.roots(st.origins[name]) for name in order]
    for p, roots in enumerate(origin_roots):
        for r in torch.unique(roots).tolist():
            if r in owner:
                a, b = find(p), find(owner[r])
                parent[max(a, b)] = min(a, b)
            else:
                owner[r] = p

    members_of: dict[int, list[int]] = {}
    for p in range(len(order)):
        members_of.setdefault(find(p), []).append(p)

    # unit index of every root, per group
    unit_index: dict[int, tuple[int, int]] = {}
    group_units: list[list[int]] = []
    heads = sorted(members_of)
    for gi, head in enumerate(heads):
        units: list[int] = []
        seen: set[int] = set()
        for p in members_of[head]:
            for r in origin_roots[p].tolist():
                if r not in seen:
                    seen.add(r)
                    unit_index[r] = (gi, len(units))
                    units.append(r)
        group_units.append(units)

    members: list[list[Member]] = [[] for _ in heads]
    producers: list[list[str]] = [[] for _ in heads]
    for slot, roots in slots.items():
        uniq, inverse = torch.unique(roots, return_inverse=True)
        found = [unit_index.get(r, (-1, -1)) for r in uniq.tolist()]
        for gi in {g for g, _ in found if g >= 0}:
            lookup = torch.tensor([u if g == gi else -1 for g, u in found], dtype=torch.long)
            module, tensor, dim = slot
            members[gi].append(Member(module, tensor, dim, lookup[inverse]))
            if slot in st.output_slots and module not in producers[gi]:
                producers[gi].append(module)

    groups = []
    for gi, head in enumerate(heads):
        names = [order[p] for p in members_of[head]]
        name = next((n for n in names if n in st.group_names), names[0])
        units = group_units[gi]
        reason = next((blocked[r] for r in units if r in blocked), "")
        if not reason and len(units) < 2:
            reason = "has a single unit; removing it would remove the whole layer"
        origin_names = [order[p] for p in members_of[head]]
        ordered_producers = tuple(dict.fromkeys(origin_names + producers[gi]))
        groups.append(
            ChannelGroup(
                name=name,
                size=len(units),
                producers=ordered_producers,
                members=tuple(sorted(members[gi], key=_member_order(model))),
                prunable=not reason,
                reason=reason,
                channels=int(st.origins[name].numel()),
            )
        )
    return tuple(groups)


def _member_order(model: nn.Module):
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}

    def key(m: Member) -> tuple[int, str, int]:
        return (position.get(m.module, len(position)), m.tensor, m.dim)

    return key

