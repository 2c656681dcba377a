"""`apply_plan`: materialise a plan as a smaller dense model (or a masked one of the same size).

Slicing is driven entirely by the members that `trace` recorded: every (module, tensor, dim)
loses the positions of removed units. Module attributes that describe shapes (`in_channels`,
`num_features`, ...) are then re-derived from the sliced tensors by each type's handler
(`Handler.fix` in `prunecore.ops`).

`mode="mask"` zeroes the same parameter slices instead of removing them. Zeroing a removed
channel's producer *and* every consumer slice means nothing it carries reaches a kept output, so
the masked model computes what the pruned one computes: the invariant the tests pin.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from prunecore.errors import ArgumentError
from prunecore import ops
from prunecore._labels import Slot
from prunecore.graph import ChannelGraph, trace
from prunecore.plan import Plan

__all__ = ["apply_plan", "kept_positions", "sliced_tensors", "swap_tensors_", "with_ancestors"]


def kept_positions(graph: ChannelGraph, plan: Plan, force: bool = False) -> dict[Slot, torch.Tensor]:
    """For every member slot touched by the plan: a bool mask of the positions that stay."""
    plan.check(graph, force=force)
    keep: dict[Slot, torch.Tensor] = {}
    for group in graph.groups:
        gp = plan.groups.get(group.name)
        if gp is None or len(gp.keep) == group.size:
            continue
        removed = torch.ones(group.size, dtype=torch.bool)
        removed[list(gp.keep)] = False
        for m in group.members:
            slot = (m.module, m.tensor, m.dim)
            mask = keep.get(slot)
            if mask is None:
                mask = torch.ones(m.unit_of.numel(), dtype=torch.bool)
            owned = m.unit_of >= 0
            gone = torch.zeros_like(mask)
            gone[owned] = removed[m.unit_of[owned]]
            keep[slot] = mask & ~gone
    return keep


def apply_plan(
    model: nn.Module,
    plan: Plan,
    mode: Literal["remove", "mask"] = "remove",
    graph: ChannelGraph | None = None,
    force: bool = False,
) -> nn.Module:
    """A NEW model with the plan applied; `model` is left untouched.

    `graph` skips re-tracing when the caller already has the model's graph; otherwise the model is
    traced on inputs of the shapes the plan records. A plan recorded for another channel structure
    (its fingerprint differs) is refused unless `force=True`; group names and sizes must fit anyway.
    """
    if mode not in ("remove", "mask"):
        raise ArgumentError(f"mode must be 'remove' or 'mask', got {mode!r}")
    if graph is None:
        graph = trace(model, tuple(spec.example() for spec in plan.inputs))
    keep = kept_positions(graph, plan, force=force)
    if mode == "remove":
        tensors = sliced_tensors(model, keep)
        # the copy takes the sliced tensors in place of the originals, which are never copied
        memo = {id(getattr(model.get_submodule(m), t)): value for (m, t), value in tensors.items()}
        new = copy.deepcopy(model, memo)
        swap_tensors_(new, tensors)
        return new
    new = copy.deepcopy(model)
    for (module_name, tensor_name, dim), mask in keep.items():
        old = getattr(new.get_submodule(module_name), tensor_name)
        if isinstance(old, nn.Parameter):
            with torch.no_grad():
                old.index_fill_(dim, (~mask).nonzero().flatten(), 0.0)
    for module_name, input_dim in graph.norm_dims:
        slots = {(t, d): mask for (m, t, d), mask in keep.items() if m == module_name}
        if slots:
            _mask_norm_(new.get_submodule(module_name), slots, input_dim)
    return new


class MaskedNorm(nn.Module):
    """Mixin for a norm over a dim that lost positions: statistics over the kept positions only.

    The kept slice of the input is normalised by a pruned twin of the norm (its own class, so a
    channels-first LayerNorm keeps its forward) using the kept slices of this module's
    parameters; removed positions output zero. That is what removal computes, which zeroing
    alone would not (LayerNorm statistics change when channels go). Parameters, names and
    state-dict keys stay those of the original module.
    """

    prunecore_kept: torch.Tensor  # (kept,) positions along the normalised dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        twin, dim, wdim = self.__dict__["_prunecore_twin"]
        kept = self.prunecore_kept
        params = {name: p.index_select(wdim, kept) for name, p in self.named_parameters(recurse=False)}
        y = torch.func.functional_call(twin, params, (x.index_select(dim, kept),))
        return torch.zeros_like(x).index_copy(x.dim() + dim, kept, y)


_MASKED: dict[type, type] = {}


def _mask_norm_(norm: nn.Module, slots: dict[tuple[str, int], torch.Tensor], input_dim: int) -> None:
    """Turn `norm` (in place, in the masked copy) into its `MaskedNorm` version."""
    (_, wdim), mask = next(iter(slots.items()))  # weight and bias keep the same positions
    twin = copy.deepcopy(norm)
    swap_tensors_(twin, sliced_tensors(norm, {("", t, d): m for (t, d), m in slots.items()}))
    cls = type(norm)
    if cls not in _MASKED:
        _MASKED[cls] = type(f"Masked{cls.__name__}", (MaskedNorm, cls), {"__module__": __name__})
    norm.__class__ = _MASKED[cls]
    norm.register_buffer("prunecore_kept", mask.nonzero().flatten(), persistent=False)
    norm.__dict__["_prunecore_twin"] = (twin, input_dim, wdim)


def sliced_tensors(model: nn.Module, keep: dict[Slot, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """New tensors holding only the kept positions (along every sliced dim); `model` is not changed.

    Parameters come back as `nn.Parameter`s (same `requires_grad`), buffers as tensors.
    """
    out: dict[tuple[str, str], torch.Tensor] = {}
    for (module_name, tensor_name, dim), mask in keep.items():
        key = (module_name, tensor_name)
        value = out[key] if key in out else getattr(model.get_submodule(module_name), tensor_name).detach()
        out[key] = torch.index_select(value, dim, mask.nonzero().flatten())
    made: dict[int, torch.Tensor] = {}  # id of the original -> its sliced twin: a tied tensor stays one tensor
    for (module_name, tensor_name), value in out.items():
        old = getattr(model.get_submodule(module_name), tensor_name)
        if id(old) in made:
            out[(module_name, tensor_name)] = made[id(old)]
        elif isinstance(old, nn.Parameter):
            out[(module_name, tensor_name)] = made[id(old)] = nn.Parameter(value, requires_grad=old.requires_grad)
        else:
            made[id(old)] = value
    return out


def swap_tensors_(
    model: nn.Module, tensors: dict[tuple[str, str], torch.Tensor]
) -> dict[tuple[str, str], torch.Tensor]:
    """Put `tensors` into `model` in place, re-derive shape attributes, and return what they replaced.

    Swapping the returned tensors back restores the model exactly: the sweep prunes and un-prunes
    its working copy this way, and `apply_plan` uses it on a fresh copy.
    """
    old = {}
    for (module_name, tensor_name), value in tensors.items():
        module = model.get_submodule(module_name)
        old[(module_name, tensor_name)] = getattr(module, tensor_name)
        setattr(module, tensor_name, value)
    for module_name in with_ancestors({m for m, _ in tensors}):
        module = model.get_submodule(module_name)
        fix = ops.fix(module)
        if fix is not None:
            fix(module)
    return old


def with_ancestors(names: set[str]) -> list[str]:
    """`names` and every module containing one, innermost first: a parent reads fixed children."""
    out = set(names)
    for name in names:
        while name:
            name = name.rpartition(".")[0]
            out.add(name)
    return sorted(out, key=lambda n: (-n.count(".") - bool(n), n))
