"""`count`: parameters and FLOPs of a model, or of the model a plan would make.

FLOPs are multiply-accumulates (MACs) per example of the layers that dominate inference time:
Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear. Normalisation, activations, pooling and
elementwise ops are not counted: they are memory-bound, and deployment folds most of them into the
neighbouring conv or Linear. Attention matmuls are not counted yet.

MACs are measured on one real forward pass in eval mode, so a module called twice counts twice and
modules that run only in training mode (auxiliary heads) add parameters but no FLOPs. With a plan,
the cost is predicted from the kept channels without building the smaller model: channel pruning
changes weight shapes, never spatial sizes, so each layer's MACs scale with its weight's size.

Example:
    >>> dense = count(model, x)
    >>> pruned = count(model, x, plan=make_plan(model, graph, 0.5), graph=graph)
    >>> pruned.ratio(dense)  # kept fraction of (params, flops)
    (0.26, 0.27)
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from prunecore._labels import Slot
from prunecore._modes import eval_mode
from prunecore.graph import ChannelGraph, trace
from prunecore.plan import Plan
from prunecore.surgery import kept_positions

__all__ = ["Cost", "ModuleCost", "count", "latency", "plan_costs"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class ModuleCost:
    """Parameters owned directly by one module (not its children) and its MACs per example."""

    params: int
    flops: int


@dataclass(frozen=True)
class Cost:
    """Totals of a model plus per-module detail keyed by qualified module name.

    `params` counts each parameter once even when modules share it, so it can be less than the sum
    over `modules`. Only modules with parameters or FLOPs appear in `modules`.
    """

    params: int
    flops: int
    modules: Mapping[str, ModuleCost]

    def ratio(self, other: Cost) -> tuple[float, float]:
        """(params, flops) of this cost as fractions of `other`'s; nan where `other` has none."""
        return _fraction(self.params, other.params), _fraction(self.flops, other.flops)


def count(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    plan: Plan | None = None,
    graph: ChannelGraph | None = None,
) -> Cost:
    """Params and MACs per example of `model`, or of `apply_plan(model, plan)` when a plan is given.

    The batch size is the first dim of the first example input. `graph` skips re-tracing when the
    caller already traced the model. The model is not changed: hooks are removed and every
    module's training flag is restored.
    """
    inputs = _inputs(example_inputs)
    keep: dict[Slot, torch.Tensor] = {}
    if plan is not None:
        keep = kept_positions(graph if graph is not None else trace(model, inputs), plan)
    return _cost(model, _per_example_rows(model, inputs), keep)


def plan_costs(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    plans: Sequence[Plan],
    graph: ChannelGraph,
) -> list[Cost]:
    """`count(model, x, plan=p, graph=graph)` for many plans from a single forward pass."""
    rows = _per_example_rows(model, _inputs(example_inputs))
    return [_cost(model, rows, kept_positions(graph, p)) for p in plans]


def _inputs(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _per_example_rows(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    batch = inputs[0].shape[0] if inputs[0].dim() > 0 else 1
    return {name: total // batch for name, total in _rows(model, inputs).items()}


def _cost(model: nn.Module, rows: Mapping[str, int], keep: Mapping[Slot, torch.Tensor]) -> Cost:
    modules: dict[str, ModuleCost] = {}
    seen: set[int] = set()
    total_params = 0
    for name, module in model.named_modules():
        sizes = {p: _numel(name, p, t, keep) for p, t in module.named_parameters(recurse=False)}
        for p, t in module.named_parameters(recurse=False):
            if id(t) not in seen:
                seen.add(id(t))
                total_params += sizes[p]
        flops = _numel(name, "weight", module.weight, keep) * rows[name] if name in rows else 0
        if sizes or flops:
            modules[name] = ModuleCost(sum(sizes.values()), flops)
    return Cost(total_params, sum(m.flops for m in modules.values()), modules)


def _rows(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Per conv/Linear module: how many times its whole weight was applied in one forward pass.

    MACs of one call are `weight.numel() * rows`, so keeping rows lets a plan rescale the weight.
    Counts are for the whole batch.
    """
    rows: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            rows[name] = rows.get(name, 0) + _call_rows(module, args[0], out)

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, _CONV + _CONV_T + (nn.Linear,))
    ]
    try:
        with torch.no_grad(), eval_mode(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return rows


def _call_rows(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    """Positions one call applies the whole weight at, over the batch (or unbatched input)."""
    if isinstance(module, nn.Linear):
        return out.numel() // out.shape[-1]  # out: (*, out_features)
    spatial = len(module.kernel_size)
    if isinstance(module, _CONV_T):
        # every input position scatters the whole kernel; x: ([B,] C_in, *spatial)
        return x.numel() // x.shape[-spatial - 1]
    return out.numel() // out.shape[-spatial - 1]  # out: ([B,] C_out, *spatial)


def _numel(module: str, tensor: str, param: torch.Tensor, keep: Mapping[Slot, torch.Tensor]) -> int:
    """Size of a parameter once the kept positions of every sliced dim are selected."""
    shape = list(param.shape)
    for dim in range(len(shape)):
        mask = keep.get((module, tensor, dim))
        if mask is not None:
            shape[dim] = int(mask.sum())
    return math.prod(shape)


def _fraction(part: int, whole: int) -> float:
    return part / whole if whole else math.nan


def latency(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], reps: int = 10, warmup: int = 2
) -> float:
    """Median seconds of one forward pass (eval mode, inference mode); the model is not changed.

    The median of several runs resists the noise of a shared machine; compare models measured in
    the same process, as ratios.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    times = []
    with torch.inference_mode(), eval_mode(model):
        for i in range(warmup + reps):
            start = time.perf_counter()
            model(*inputs)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)
