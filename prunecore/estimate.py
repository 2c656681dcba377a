"""Estimated sensitivity curves: a second-order Taylor prediction of the loss, from a few gradients.

Removing the units R of a group moves the weights by delta = -w_R. Around the trained point

    loss(w + delta) ~ loss(w) + g . delta + 1/2 delta' F delta

with g the mean gradient and F the Fisher information, estimated as the spread of gradients
over small micro-batches: delta' F delta ~ m * mean_b (g_b . delta)^2 for micro-batches of m
samples. Both terms only need, per micro-batch b and unit u, the scalar T[b, u] = sum over the
unit's parameters of w * g_b (Molchanov et al. 2019), so one backward pass per micro-batch prices
every level of every group; the cross terms between removed units are kept, which matters because
units are removed together. Unlabelled data uses the model's own top-1 as the target.

This is a first look for large models, not a measurement: bench/README.md reports its rank
correlation with exact curves on the sample models.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from prunecore.errors import ArgumentError
from prunecore.evaluate import split_batch
from prunecore.graph import ChannelGraph
from prunecore.importance import batch_gradients, unit_sums_of_w_times_grad
from prunecore.plan import GroupPlan

__all__ = ["estimate_loss"]


def estimate_loss(
    model: nn.Module,
    graph: ChannelGraph,
    data: Iterable[Any],
    points: dict[tuple[str, float], GroupPlan],
    samples: int = 256,
    micro_batch: int = 16,
) -> tuple[dict[tuple[str, float], float], float]:
    """Predicted loss of each (group, sparsity) point, and the dense loss it is relative to."""
    groups = sorted({g for g, _ in points})
    terms, dense = _unit_terms(model, graph, groups, data, samples, micro_batch)
    predicted = {}
    for (group, sparsity), keep in points.items():
        removed = torch.tensor(keep.removed, dtype=torch.long)
        t = terms[group][:, removed].sum(dim=1)  # (micro-batches,): g_b . delta for each micro-batch
        first = -t.mean()
        second = micro_batch * t.square().mean()
        predicted[(group, sparsity)] = float(dense + first + 0.5 * second)
    return predicted, dense


def _unit_terms(
    model: nn.Module, graph: ChannelGraph, groups: list[str], data: Iterable[Any], samples: int, micro: int
) -> tuple[dict[str, torch.Tensor], float]:
    """T[group]: (micro-batches, units) of sum(w * g_b) per unit; and the mean loss over the samples."""
    rows: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
    total_loss, seen = 0.0, 0
    for grads, loss, n in batch_gradients(model, islice(_micro_batches(data, micro), max(1, samples // micro))):
        terms = unit_sums_of_w_times_grad(model, graph, grads)
        for g in groups:
            rows[g].append(terms[g])
        total_loss += loss * n
        seen += n
    if seen == 0:
        raise ArgumentError("estimate mode got no data")
    return {g: torch.stack(r) for g, r in rows.items()}, total_loss / seen


def _micro_batches(data: Iterable[Any], size: int) -> Iterator[Any]:
    """Re-slice the data into micro-batches of `size` samples (the Fisher estimate's unit)."""
    for batch in data:
        inputs, targets = split_batch(batch)
        for start in range(0, inputs.shape[0] - size + 1, size):
            window = slice(start, start + size)
            yield inputs[window] if targets is None else (inputs[window], targets[window])
