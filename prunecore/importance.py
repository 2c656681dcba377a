"""Importance criteria: one score per unit of each group, higher means keep.

A unit's score aggregates over *every* member of its group (the producer's filters, the
consumers' input slices, the BatchNorm entries), because removing the unit removes all of them.

Criteria live in a registry so the CLI, the dashboard and the tests all see the same list:

    >>> list_criteria()
    ['bn_scale', 'l1', 'l2', 'random', 'taylor']
    >>> scores = score(model, graph, "l1")          # {group name: (size,) tensor}
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from prunecore.graph import ChannelGraph, ChannelGroup, Member

__all__ = ["Criterion", "list_criteria", "register_criterion", "score"]


@dataclass(frozen=True)
class Criterion:
    name: str
    fn: Callable[..., dict[str, torch.Tensor]]
    needs_data: bool
    doc: str


_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, needs_data: bool = False):
    """Register `fn(model, graph, data=..., seed=...) -> {group: scores}` under `name`."""

    def wrap(fn: Callable[..., dict[str, torch.Tensor]]):
        _CRITERIA[name] = Criterion(name, fn, needs_data, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def list_criteria() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(name: str) -> Criterion:
    if name not in _CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose one of {', '.join(list_criteria())}")
    return _CRITERIA[name]


def score(
    model: nn.Module,
    graph: ChannelGraph,
    criterion: str = "l1",
    data: Iterable[Any] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Scores of every prunable group's units (a `(size,)` float tensor per group name)."""
    crit = get_criterion(criterion)
    if crit.needs_data and data is None:
        raise ValueError(f"criterion {criterion!r} needs data: pass batches of (inputs, targets) or inputs")
    return crit.fn(model, graph, data=data, seed=seed)


def _per_unit(group: ChannelGroup, member: Member, per_position: torch.Tensor, out: torch.Tensor) -> None:
    """Add per-position values of one member into the unit scores."""
    owned = member.unit_of >= 0
    out.index_add_(0, member.unit_of[owned], per_position[owned].to(out.dtype))


def _reduce_to_dim(t: torch.Tensor, dim: int) -> torch.Tensor:
    dims = [d for d in range(t.dim()) if d != dim]
    return t.sum(dim=dims) if dims else t


def _parameter(model: nn.Module, m: Member) -> torch.Tensor | None:
    value = getattr(model.get_submodule(m.module), m.tensor)
    return value if isinstance(value, nn.Parameter) else None


def _norm_scores(model: nn.Module, graph: ChannelGraph, power: int) -> dict[str, torch.Tensor]:
    scores = {}
    for g in graph.prunable:
        acc = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            p = _parameter(model, m)
            if p is not None:
                _per_unit(g, m, _reduce_to_dim(p.detach().abs() ** power, m.dim), acc)
        scores[g.name] = acc if power == 1 else acc.sqrt()
    return scores


@register_criterion("l1")
def l1(model: nn.Module, graph: ChannelGraph, **_: Any) -> dict[str, torch.Tensor]:
    """Sum of |w| over every parameter a unit removes (Li et al. 2017, extended to groups)."""
    return _norm_scores(model, graph, 1)


@register_criterion("l2")
def l2(model: nn.Module, graph: ChannelGraph, **_: Any) -> dict[str, torch.Tensor]:
    """Euclidean norm of every parameter a unit removes."""
    return _norm_scores(model, graph, 2)


@register_criterion("bn_scale")
def bn_scale(model: nn.Module, graph: ChannelGraph, **_: Any) -> dict[str, torch.Tensor]:
    """|gamma| of the group's BatchNorms (network slimming); groups without one fall back to l1."""
    fallback = None
    scores = {}
    for g in graph.prunable:
        acc = torch.zeros(g.size, dtype=torch.float64)
        found = False
        for m in g.members:
            module = model.get_submodule(m.module)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and m.tensor == "weight":
                _per_unit(g, m, module.weight.detach().abs(), acc)
                found = True
        if not found:
            fallback = fallback or l1(model, graph)
            acc = fallback[g.name]
        scores[g.name] = acc
    return scores


@register_criterion("taylor", needs_data=True)
def taylor(model: nn.Module, graph: ChannelGraph, data: Iterable[Any], batches: int = 16, **_: Any):
    """|sum of w * dL/dw| over a unit's parameters: first-order loss change (Molchanov 2019)."""
    grads = _mean_gradients(model, data, batches)
    scores = {}
    for g in graph.prunable:
        acc = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            p = _parameter(model, m)
            if p is not None and m.path in grads:
                _per_unit(g, m, _reduce_to_dim(p.detach() * grads[m.path], m.dim), acc)
        scores[g.name] = acc.abs()
    return scores


@register_criterion("random")
def random(model: nn.Module, graph: ChannelGraph, seed: int = 0, **_: Any) -> dict[str, torch.Tensor]:
    """Seeded uniform noise: the baseline any criterion must beat."""
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.size, generator=gen, dtype=torch.float64) for g in graph.prunable}


def _mean_gradients(model: nn.Module, data: Iterable[Any], batches: int) -> dict[str, torch.Tensor]:
    """Gradients of the mean loss, without touching `.grad` or the model's mode for good.

    Labelled batches use cross-entropy; unlabelled ones use the model's own top-1 as target.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    totals = {n: torch.zeros_like(p) for n, p in named}
    training = {m: m.training for m in model.modules()}
    model.eval()
    count = 0
    try:
        for batch in islice(data, batches):
            inputs, targets = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) > 1 else (batch, None)
            if isinstance(inputs, (tuple, list)):
                inputs = inputs[0]
            device = next(model.parameters()).device
            logits = model(inputs.to(device))
            if targets is None:
                targets = logits.detach().argmax(dim=-1)
            loss = F.cross_entropy(logits, targets.to(device))
            for (n, _), g in zip(named, torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)):
                if g is not None:
                    totals[n] += g
            count += 1
    finally:
        for m, flag in training.items():
            m.training = flag
    if count == 0:
        raise ValueError("criterion 'taylor' got no batches of data")
    return {n: t / count for n, t in totals.items()}
