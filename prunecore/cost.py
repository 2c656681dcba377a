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
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from prunecore._labels import Slot
from prunecore._modes import eval_mode
from prunecore.graph import ChannelGraph, trace
from prunecore.plan import Plan
from prunecore.surgery import kept_positions

__all__ = ["Cost", "CostModel", "ModuleCost", "cost_model", "count", "latency", "plan_costs"]

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


@dataclass(frozen=True, eq=False)
class CostModel:
    """Params and FLOPs as a function of how many units each prunable group keeps.

    Each weight's size is the product of its dims' kept sizes, and a dim's kept size is its
    positions owned by no group plus, for every group owning positions along it, the positions its
    kept units own. Groups keep their best-ranked units first, so "positions owned by the first k
    units" is a cumulative sum along the ranking: exact for every k, also where units own unequal
    numbers of positions. Coupling is therefore exact too: a conv between two pruned groups costs
    (kept in) x (kept out). Pricing a kept vector is a few numpy gathers, so allocation can try
    thousands of them and the dashboard can re-price a plan on every slider move.

        >>> cm = cost_model(model, x, graph, scores)
        >>> cm.price({"layer1.0.conv1": 32})          # (params, flops) with that group at 32 units
        (263002, 29433856)
    """

    groups: tuple[str, ...]  # prunable groups; kept vectors follow this order
    sizes: np.ndarray  # (G,) units per group
    fixed: np.ndarray  # (D,) positions of each weight dim that no prunable group owns
    pair_dim: np.ndarray  # (P,) the dim of each (dim, group) pair
    pair_group: np.ndarray  # (P,) the group of each pair
    pair_start: np.ndarray  # (P,) where the pair's cumulative counts start in `cumulative`
    cumulative: np.ndarray  # positions along the dim owned by the group's first k ranked units, k = 0..size
    param_dims: np.ndarray  # (T, R) dims of each parameter tensor, padded with the constant-1 dim
    flop_dims: np.ndarray  # (F, R) dims of each conv/Linear weight
    flop_rows: np.ndarray  # (F,) positions per example each weight is applied at
    fixed_params: int  # parameters of tensors no group touches (a constant)

    @property
    def dense(self) -> tuple[int, int]:
        return self.price({})

    def index(self, name: str) -> int:
        try:
            return self.groups.index(name)
        except ValueError:
            raise KeyError(f"no prunable group named {name!r}") from None

    def kept_vector(self, kept: Mapping[str, int]) -> np.ndarray:
        """(G,) kept units per group; groups not named keep all their units."""
        vector = self.sizes.copy()
        for name, k in kept.items():
            vector[self.index(name)] = k
        return vector

    def price(self, kept: Mapping[str, int]) -> tuple[int, int]:
        """(params, flops) of the model whose named groups keep `kept[name]` units each."""
        params, flops = self.evaluate(self.kept_vector(kept))
        return int(params[0]), int(flops[0])

    def evaluate(self, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(params, flops) for one kept vector `(G,)` or many as columns `(G, N)`; each `(N,)`."""
        dims = self._dim_sizes(kept)  # (D, N)
        params = dims[self.param_dims].prod(axis=1).sum(axis=0) + self.fixed_params  # (N,)
        flops = (dims[self.flop_dims].prod(axis=1) * self.flop_rows[:, None]).sum(axis=0)  # (N,)
        return np.rint(params), np.rint(flops)

    def _dim_sizes(self, kept: np.ndarray) -> np.ndarray:
        """Kept size of every weight dim, `(D, N)`, for kept vectors `(G,)` or `(G, N)`."""
        k = np.asarray(kept, dtype=np.int64)
        k = k[:, None] if k.ndim == 1 else k  # (G, N)
        owned = self.cumulative[self.pair_start[:, None] + k[self.pair_group]]  # (P, N)
        dims = np.repeat(self.fixed[:, None], k.shape[1], axis=1).astype(np.float64)  # (D, N)
        np.add.at(dims, self.pair_dim, owned)
        return dims

    def flop_shares(self) -> dict[str, float]:
        """Per group: the fraction of the dense model's FLOPs in layers whose weights it touches.

        What a group's sparsity can act on (a group feeding and fed by big convs has a large
        share); shares overlap, since a conv between two groups counts for both.
        """
        dims = self._dim_sizes(self.sizes)[:, 0]  # (D,) dense
        flops = dims[self.flop_dims].prod(axis=1) * self.flop_rows  # (F,) dense MACs of each layer
        total = flops.sum()
        touched: dict[int, set[int]] = defaultdict(set)
        for d, g in zip(self.pair_dim.tolist(), self.pair_group.tolist()):
            touched[g].add(d)
        return {
            name: float(flops[np.isin(self.flop_dims, list(touched[g])).any(axis=1)].sum() / total) if total else 0.0
            for g, name in enumerate(self.groups)
        }

    def coupled(self) -> list[set[int]]:
        """Per group, the other groups whose kept count changes its cost (they share a weight)."""
        by_dim: dict[int, set[int]] = defaultdict(set)
        for d, g in zip(self.pair_dim.tolist(), self.pair_group.tolist()):
            by_dim[d].add(g)
        out: list[set[int]] = [set() for _ in self.groups]
        for term in np.concatenate([self.param_dims, self.flop_dims]).tolist():
            together = set().union(*(by_dim.get(d, set()) for d in term))
            for g in together:
                out[g] |= together - {g}
        return out


def cost_model(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    graph: ChannelGraph,
    scores: Mapping[str, torch.Tensor] | None = None,
) -> CostModel:
    """Build the `CostModel` of `model` from one forward pass.

    `scores` ranks each group's units as `make_plan` would keep them (highest first, ties to the
    earlier unit); without it units are assumed kept in index order, which gives the same prices
    wherever every unit owns equally many positions (all but unusual concat/shuffle layouts).
    """
    rows = _per_example_rows(model, _inputs(example_inputs))
    groups = graph.prunable
    by_slot: dict[Slot, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for gi, g in enumerate(groups):
        for m in g.members:
            by_slot[(m.module, m.tensor, m.dim)].append((gi, m.unit_of))
    rank = {g.name: _ranking(g.size, None if scores is None else scores.get(g.name)) for g in groups}

    dims: dict[Slot, int] = {}
    fixed: list[int] = [1]  # dim 0 is the constant 1 that pads short weights
    pairs: list[tuple[int, int, int]] = []
    chunks: list[np.ndarray] = []
    touched: set[int] = set()
    start = 0

    def dim(slot: Slot, size: int) -> int:
        nonlocal start
        if slot not in dims:
            dims[slot] = len(fixed)
            free = size
            for gi, unit_of in by_slot.get(slot, []):
                owned = unit_of[unit_of >= 0]
                per_unit = torch.bincount(owned, minlength=groups[gi].size)[rank[groups[gi].name]]
                chunks.append(np.concatenate([[0], per_unit.cumsum(0).numpy()]))
                pairs.append((dims[slot], gi, start))
                start += groups[gi].size + 1
                free -= owned.numel()
                touched.add(dims[slot])
            fixed.append(free)
        return dims[slot]

    param_terms: list[list[int]] = []
    flop_terms: list[list[int]] = []
    flop_rows: list[int] = []
    fixed_params = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        for p, t in module.named_parameters(recurse=False):
            if id(t) in seen:
                continue
            seen.add(id(t))
            term = [dim((name, p, d), t.shape[d]) for d in range(t.dim())]
            if touched.isdisjoint(term):
                fixed_params += t.numel()  # no group touches it
            else:
                param_terms.append(term)
        if name in rows:
            w = module.weight
            flop_terms.append([dim((name, "weight", d), w.shape[d]) for d in range(w.dim())])
            flop_rows.append(rows[name])
    width = max((len(t) for t in param_terms + flop_terms), default=1)

    def pad(terms: list[list[int]]) -> np.ndarray:
        return np.array([t + [0] * (width - len(t)) for t in terms], dtype=np.int64).reshape(-1, width)

    return CostModel(
        groups=tuple(g.name for g in groups),
        sizes=np.array([g.size for g in groups], dtype=np.int64),
        fixed=np.array(fixed, dtype=np.int64),
        pair_dim=np.array([p[0] for p in pairs], dtype=np.int64),
        pair_group=np.array([p[1] for p in pairs], dtype=np.int64),
        pair_start=np.array([p[2] for p in pairs], dtype=np.int64),
        cumulative=np.concatenate(chunks).astype(np.float64) if chunks else np.zeros(0),
        param_dims=pad(param_terms),
        flop_dims=pad(flop_terms),
        flop_rows=np.array(flop_rows, dtype=np.float64),
        fixed_params=fixed_params,
    )


def _ranking(size: int, scores: torch.Tensor | None) -> torch.Tensor:
    """Unit indices in the order `keep_top` keeps them."""
    if scores is None:
        return torch.arange(size)
    return torch.sort(scores, descending=True, stable=True).indices


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
