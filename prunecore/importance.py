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
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from prunecore.devices import on_device, resolve_device
from prunecore.errors import ArgumentError, running_model
from prunecore._modes import eval_mode
from prunecore.evaluate import as_rows, output_logits, split_batch
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
        raise ArgumentError(f"unknown criterion {name!r}; choose one of {', '.join(list_criteria())}")
    return _CRITERIA[name]


def score(
    model: nn.Module,
    graph: ChannelGraph,
    criterion: str = "l1",
    data: Iterable[Any] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Scores of every prunable group's units (a `(size,)` float tensor per group name).

    `device` runs a data-driven criterion's passes there, on a copy of the model when it lives
    elsewhere (the scores come back on the CPU); default, where the model is.
    """
    crit = get_criterion(criterion)
    if crit.needs_data and data is None:
        raise ArgumentError(f"criterion {criterion!r} needs data: pass batches of (inputs, targets) or inputs")
    if device is None or not crit.needs_data:
        return crit.fn(model, graph, data=data, seed=seed)
    worker = on_device(model, resolve_device(device))
    return {name: s.cpu() for name, s in crit.fn(worker, graph, data=data, seed=seed).items()}


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


def _member_scores(
    model: nn.Module, graph: ChannelGraph, per_position: Callable[[torch.Tensor, int], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Sum `per_position(param, dim)` into unit scores over every parameter member of each group.

    A tensor shared by many groups (a DenseNet layer reading every earlier layer's output) is
    reduced once, not once per group.
    """
    cache: dict[tuple[str, int], torch.Tensor] = {}
    scores = {}
    for g in graph.prunable:
        acc = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            key = (m.path, m.dim)
            if key not in cache:
                p = _parameter(model, m)
                with torch.no_grad():
                    cache[key] = per_position(p, m.dim) if p is not None else None
            if cache[key] is not None:
                _per_unit(g, m, cache[key], acc)
        scores[g.name] = acc
    return scores


@register_criterion("l1")
def l1(model: nn.Module, graph: ChannelGraph, **_: Any) -> dict[str, torch.Tensor]:
    """Sum of |w| over every parameter a unit removes (Li et al. 2017, extended to groups)."""
    return _member_scores(model, graph, lambda p, dim: _reduce_to_dim(p.abs(), dim))


@register_criterion("l2")
def l2(model: nn.Module, graph: ChannelGraph, **_: Any) -> dict[str, torch.Tensor]:
    """Euclidean norm of every parameter a unit removes."""
    squares = _member_scores(model, graph, lambda p, dim: _reduce_to_dim(p.square(), dim))
    return {name: s.sqrt() for name, s in squares.items()}


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
    totals: dict[int, torch.Tensor] = {}
    count = 0
    for grads, _, _ in batch_gradients(model, islice(data, batches)):
        for key, g in grads.items():
            totals[key] = totals[key] + g if key in totals else g
        count += 1
    if count == 0:
        raise ArgumentError("criterion 'taylor' got no batches of data")
    mean = {key: g / count for key, g in totals.items()}
    return {name: s.abs() for name, s in unit_sums_of_w_times_grad(model, graph, mean).items()}


def unit_sums_of_w_times_grad(
    model: nn.Module, graph: ChannelGraph, grads: dict[int, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per prunable group, per unit: sum of w * g over the unit's parameters (`grads` keyed by id(param))."""

    def w_times_grad(p: torch.Tensor, dim: int) -> torch.Tensor:
        g = grads.get(id(p))
        return _reduce_to_dim((p * g).double(), dim) if g is not None else torch.zeros(p.shape[dim])

    return _member_scores(model, graph, w_times_grad)


def batch_gradients(model: nn.Module, batches: Iterable[Any]) -> Iterator[tuple[dict[int, torch.Tensor], float, int]]:
    """Per batch: gradients of its mean loss keyed by id(param), the loss, and the batch size.

    Labelled batches use cross-entropy; unlabelled ones use the model's own top-1 as target. The
    model runs in eval mode (restored afterwards) and `.grad` is never written.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    with eval_mode(model):
        for batch in batches:
            inputs, targets = split_batch(batch)
            with running_model(model, inputs, "a gradient pass"):
                logits = output_logits(model(inputs.to(device)))
                if targets is None:
                    targets = logits.detach().argmax(dim=-1)
                logits, targets = as_rows(logits, targets)  # (N, C), (N,): N = B, or B*T tokens
                loss = F.cross_entropy(logits, targets.to(device))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            yield {id(p): g for p, g in zip(params, grads) if g is not None}, float(loss.detach()), inputs.shape[0]


@register_criterion("random")
def random(model: nn.Module, graph: ChannelGraph, seed: int = 0, **_: Any) -> dict[str, torch.Tensor]:
    """Seeded uniform noise: the baseline any criterion must beat."""
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.size, generator=gen, dtype=torch.float64) for g in graph.prunable}
