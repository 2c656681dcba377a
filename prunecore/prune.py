"""From sparsities to a plan, and the one-call `prune` pipeline.

    >>> plan = make_plan(model, graph, {"layer1.0.conv1": 0.5}, criterion="l2", round_to=8)
    >>> smaller = prune(model, torch.randn(1, 3, 224, 224), 0.3)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from prunecore.errors import ArgumentError
from prunecore.graph import ChannelGraph, trace
from prunecore.importance import score
from prunecore.plan import GroupPlan, Plan, PlanError, kept_units
from prunecore.surgery import apply_plan

__all__ = ["keep_top", "make_plan", "prune", "select_units"]


def make_plan(
    model: nn.Module,
    graph: ChannelGraph,
    sparsity: float | Mapping[str, float],
    criterion: str = "l1",
    round_to: int = 1,
    data: Iterable[Any] | None = None,
    seed: int = 0,
) -> Plan:
    """Keep the highest-scored units of each group.

    `sparsity` is one fraction for every prunable group, or `{group name: fraction}`; groups not
    named keep all their units. Naming a group that cannot be pruned is an error that says why.
    """
    if isinstance(sparsity, Mapping):
        targets = dict(sparsity)
        for name, s in targets.items():
            if name not in graph:
                raise PlanError(f"no channel group named {name!r} in {graph.model_type}")
            if s > 0 and not graph[name].prunable:
                raise PlanError(f"group {name!r} cannot be pruned: it {graph[name].reason}")
    else:
        if not 0.0 <= sparsity < 1.0:
            raise ArgumentError(f"sparsity must be in [0, 1), got {sparsity}")
        targets = {g.name: float(sparsity) for g in graph.prunable}
    for name, s in targets.items():
        if not 0.0 <= s < 1.0:
            raise ArgumentError(f"sparsity of group {name!r} must be in [0, 1), got {s}")
    scores = score(model, graph, criterion, data=data, seed=seed) if any(targets.values()) else {}
    groups = {
        name: select_units(scores.get(name), graph[name].size, s, round_to, graph[name].channels or None)
        for name, s in targets.items()
    }
    return Plan(groups, graph.inputs, graph.model_type, criterion, round_to, fingerprint=graph.fingerprint)


def select_units(
    scores: torch.Tensor | None, size: int, sparsity: float, round_to: int = 1, channels: int | None = None
) -> GroupPlan:
    """Keep the `kept_units(...)` highest-scored units; ties keep the earlier unit."""
    return keep_top(scores, size, kept_units(size, sparsity, round_to), channels)


def keep_top(scores: torch.Tensor | None, size: int, n: int, channels: int | None = None) -> GroupPlan:
    """Keep the `n` highest-scored of `size` units (`scores` may be None when `n == size`)."""
    if n == size:
        return GroupPlan(size, tuple(range(size)), channels)
    order = torch.sort(scores, descending=True, stable=True).indices[:n]
    return GroupPlan(size, tuple(sorted(order.tolist())), channels)


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    sparsity: float | Mapping[str, float],
    criterion: str = "l1",
    round_to: int = 1,
    data: Iterable[Any] | None = None,
) -> nn.Module:
    """Trace, plan and apply in one call; returns a new, smaller model."""
    graph = trace(model, example_inputs)
    plan = make_plan(model, graph, sparsity, criterion, round_to, data)
    return apply_plan(model, plan, graph=graph)
