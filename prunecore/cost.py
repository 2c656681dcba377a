"""`count`: parameters and FLOPs of a model, or of the model a plan would make.

FLOPs are multiply-accumulates (MACs) per example of the ops that dominate inference time:
Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear, and attention (its projections and its two matmuls,
Q K^T and attn V) in `nn.MultiheadAttention`, torchvision's Swin and MaxViT attention. Normalisation,
activations, softmax, pooling and elementwise ops are not counted: they are memory-bound, and
deployment folds most of them into the neighbouring matmul.

MACs are measured on one real forward pass in eval mode, so a module called twice counts twice and
modules that run only in training mode (auxiliary heads) add parameters but no FLOPs. Each op is
recorded as a `FlopTerm`: rows times the product of some weight dims. Channel pruning changes
weight shapes, never spatial sizes or sequence lengths, so with a plan the cost is predicted from
the kept positions of those dims without building the smaller model. `register_flops` adds a rule
for another module type.

Example:
    >>> dense = count(model, x)
    >>> pruned = count(model, x, plan=make_plan(model, graph, 0.5), graph=graph)
    >>> pruned.ratio(dense)  # kept fraction of (params, flops)
    (0.26, 0.27)
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from prunecore.devices import synchronizer
from prunecore.errors import ArgumentError, running_model
from prunecore._labels import Slot
from prunecore import ops
from prunecore.ops import FlopRule, FlopTerm
from prunecore._modes import eval_mode, working_copy
from prunecore.graph import ChannelGraph, trace
from prunecore.plan import Plan
from prunecore.surgery import kept_positions

__all__ = [
    "Cost",
    "CostModel",
    "FlopTerm",
    "Latency",
    "ModuleCost",
    "compare_latency",
    "cost_model",
    "count",
    "format_latency",
    "format_speedup",
    "latency",
    "measure_latencies",
    "measure_latency",
    "plan_costs",
    "register_flops",
    "speedup",
]

@dataclass(frozen=True)
class ModuleCost:
    """Parameters owned directly by one module (not its children) and its MACs per example.

    A projection's MACs belong to the module owning its weight (`nn.MultiheadAttention` itself for
    `in_proj_weight`, its `out_proj` for the output projection, Swin's `qkv` and `proj`); the
    attention matmuls belong to the attention module.
    """

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




def register_flops(*classes: type[nn.Module]) -> Callable[[FlopRule], FlopRule]:
    """Decorator: count the MACs of `classes` and their subclasses with the decorated rule.

    The nearest registered class in a module's MRO wins, so pruned subclasses of an attention
    module are counted by its rule. A rule may also describe a child's weight that the module
    uses functionally (Swin's `qkv`); those terms are dropped where the child ran as a module
    itself, since its own rule counted it.
    """

    def register(rule: FlopRule) -> FlopRule:
        ops.register(ops.Handler(tuple(classes), flops=rule))
        return rule

    return register


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
    return _cost(model, _flop_terms(model, inputs), keep)


def plan_costs(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    plans: Sequence[Plan],
    graph: ChannelGraph,
) -> list[Cost]:
    """`count(model, x, plan=p, graph=graph)` for many plans from a single forward pass."""
    terms = _flop_terms(model, _inputs(example_inputs))
    return [_cost(model, terms, kept_positions(graph, p)) for p in plans]


@dataclass(frozen=True, eq=False)
class CostModel:
    """Params and FLOPs as a function of how many units each prunable group keeps.

    Each weight's size is the product of its dims' kept sizes, and a dim's kept size is its
    positions owned by no group plus, for every group owning positions along it, the positions its
    kept units own. Groups keep their best-ranked units first, so "positions owned by the first k
    units" is a cumulative sum along the ranking: exact for every k, also where units own unequal
    numbers of positions. Coupling is therefore exact too: a conv between two pruned groups costs
    (kept in) x (kept out). FLOPs are the `FlopTerm`s of one forward pass priced the same way: rows
    times the kept sizes of the term's dims, where a slice (q's third of `in_proj_weight`) is a dim
    of its own. Pricing a kept vector is a few numpy gathers, so allocation can try thousands of
    them and the dashboard can re-price a plan on every slider move.

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
    flop_dims: np.ndarray  # (F, R) the dims of each `FlopTerm`, padded likewise
    flop_rows: np.ndarray  # (F,) rows per example of each term
    fixed_params: int  # parameters of tensors no group touches (a constant)
    dim_of: Mapping[tuple[Slot, tuple[int, int]], int] = field(default_factory=dict)  # (slot, part) -> dim index

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
        dims = self.dim_sizes(kept)  # (D, N)
        params = dims[self.param_dims].prod(axis=1).sum(axis=0) + self.fixed_params  # (N,)
        flops = (dims[self.flop_dims].prod(axis=1) * self.flop_rows[:, None]).sum(axis=0)  # (N,)
        return np.rint(params), np.rint(flops)

    def weight_dims(self, module: str, tensor: str, ndim: int) -> list[int] | None:
        """Indices of a weight's whole dims in `dim_sizes`; None for a weight the model does not own
        under this name (the second name of a tied tensor)."""
        found = [self.dim_of.get(((module, tensor, d), (0, 1))) for d in range(ndim)]
        return None if None in found else found  # type: ignore[return-value]

    def dim_sizes(self, kept: np.ndarray) -> np.ndarray:
        """Kept size of every weight dim, `(D, N)`, for kept vectors `(G,)` or `(G, N)` (also what latency
        tables read a layer's pruned shape from)."""
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
        dims = self.dim_sizes(self.sizes)[:, 0]  # (D,) dense
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
    terms = _flop_terms(model, _inputs(example_inputs))
    groups = graph.prunable
    by_slot: dict[Slot, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for gi, g in enumerate(groups):
        for m in g.members:
            by_slot[(m.module, m.tensor, m.dim)].append((gi, m.unit_of))
    rank = {g.name: _ranking(g.size, None if scores is None else scores.get(g.name)) for g in groups}

    dims: dict[tuple[Slot, tuple[int, int]], int] = {}
    fixed: list[int] = [1]  # dim 0 is the constant 1 that pads short weights
    pairs: list[tuple[int, int, int]] = []
    chunks: list[np.ndarray] = []
    touched: set[int] = set()
    start = 0

    def dim(slot: Slot, size: int, part: tuple[int, int] = (0, 1)) -> int:
        """Index of the dim (or the `part` slice of it) in `fixed`, added on first sight."""
        nonlocal start
        key = (slot, part)
        if key not in dims:
            d = dims[key] = len(fixed)
            lo, hi = _span(size, part)
            free = hi - lo
            for gi, unit_of in by_slot.get(slot, []):
                owned = unit_of[lo:hi][unit_of[lo:hi] >= 0]
                per_unit = torch.bincount(owned, minlength=groups[gi].size)[rank[groups[gi].name]]
                chunks.append(np.concatenate([[0], per_unit.cumsum(0).numpy()]))
                pairs.append((d, gi, start))
                start += groups[gi].size + 1
                free -= owned.numel()
                touched.add(d)
            fixed.append(free)
        return dims[key]

    param_terms: list[list[int]] = []
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
    shapes = _shapes(model, terms)
    flop_terms = [
        [dim((t.module, t.tensor, d), shapes[t.module, t.tensor][d], part) for d, part in t.axes()] for t in terms
    ]
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
        flop_rows=np.array([t.rows for t in terms], dtype=np.float64),
        fixed_params=fixed_params,
        dim_of=dims,
    )


def _ranking(size: int, scores: torch.Tensor | None) -> torch.Tensor:
    """Unit indices in the order `keep_top` keeps them."""
    if scores is None:
        return torch.arange(size)
    return torch.sort(scores, descending=True, stable=True).indices


def _inputs(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _cost(model: nn.Module, terms: Sequence[FlopTerm], keep: Mapping[Slot, torch.Tensor]) -> Cost:
    shapes = _shapes(model, terms)
    flops: dict[str, int] = defaultdict(int)
    for t in terms:
        shape = shapes[t.module, t.tensor]
        kept = [_kept((t.module, t.tensor, d), shape[d], part, keep) for d, part in t.axes()]
        flops[t.owner] += t.rows * math.prod(kept)
    modules: dict[str, ModuleCost] = {}
    seen: set[int] = set()
    total_params = 0
    for name, module in model.named_modules():
        sizes = {p: _numel(name, p, t, keep) for p, t in module.named_parameters(recurse=False)}
        for p, t in module.named_parameters(recurse=False):
            if id(t) not in seen:
                seen.add(id(t))
                total_params += sizes[p]
        if sizes or flops.get(name):
            modules[name] = ModuleCost(sum(sizes.values()), flops.get(name, 0))
    return Cost(total_params, sum(m.flops for m in modules.values()), modules)


def _shapes(model: nn.Module, terms: Sequence[FlopTerm]) -> dict[tuple[str, str], torch.Size]:
    """Dense shape of every weight the terms name, by (module, tensor)."""
    return {(t.module, t.tensor): getattr(model.get_submodule(t.module), t.tensor).shape for t in terms}


def _flop_terms(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[FlopTerm]:
    """The terms of one forward pass, merged where they name the same op, rows per example.

    The batch size is the first dim of the first input. MHA's fused fast path is switched off for
    the pass: it would run `nn.TransformerEncoderLayer` without calling its Linears.
    """
    emitted: list[tuple[str, FlopTerm]] = []  # (module whose rule returned it, term)
    ran: set[str] = set()

    def hook(name: str, rule: FlopRule) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            ran.add(name)
            for t in rule(module, args, kwargs, out):
                emitted.append((name, replace(t, owner=_join(name, t.owner), module=_join(name, t.module))))

        return record

    model = working_copy(model)  # hooks and flags on a copy: other threads may use the model meanwhile
    for name, m in model.named_modules():
        if (rule := ops.flops(m)) is not None:
            m.register_forward_hook(hook(name, rule), with_kwargs=True)
    with torch.no_grad(), eval_mode(model), _no_mha_fastpath(), running_model(model, inputs, "counting FLOPs"):
        model(*inputs)
    rows: dict[FlopTerm, int] = defaultdict(int)
    for name, t in emitted:
        if t.owner == name or t.owner not in ran:  # a child that ran as a module counted itself
            rows[replace(t, rows=0)] += t.rows
    batch = inputs[0].shape[0] if inputs[0].dim() > 0 else 1
    return [replace(t, rows=total // batch) for t, total in rows.items()]


_fastpath_lock = threading.Lock()
_fastpath_users = 0
_fastpath_saved = True


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """MHA's fused path off while any thread counts; the user's setting back when the last one ends.

    The switch is process-wide, so nested or concurrent counts share one save and one restore
    (a second count saving "off" and restoring it last would leave it off for good).
    """
    global _fastpath_users, _fastpath_saved
    with _fastpath_lock:
        if _fastpath_users == 0:
            _fastpath_saved = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _fastpath_users += 1
    try:
        yield
    finally:
        with _fastpath_lock:
            _fastpath_users -= 1
            if _fastpath_users == 0:
                torch.backends.mha.set_fastpath_enabled(_fastpath_saved)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _span(size: int, part: tuple[int, int]) -> tuple[int, int]:
    """[lo, hi) of the i-th of n equal slices of a dim of `size` positions."""
    i, n = part
    return i * size // n, (i + 1) * size // n


def _kept(slot: Slot, size: int, part: tuple[int, int], keep: Mapping[Slot, torch.Tensor]) -> int:
    """Positions of one dim (or of its `part` slice) left once the kept positions are selected."""
    lo, hi = _span(size, part)
    mask = keep.get(slot)
    return hi - lo if mask is None else int(mask[lo:hi].sum())


def _numel(module: str, tensor: str, param: torch.Tensor, keep: Mapping[Slot, torch.Tensor]) -> int:
    """Size of a parameter once the kept positions of every sliced dim are selected."""
    return math.prod(_kept((module, tensor, d), size, (0, 1), keep) for d, size in enumerate(param.shape))


def _fraction(part: int, whole: int) -> float:
    return part / whole if whole else math.nan


# -- latency -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Latency:
    """Seconds of one forward pass on this machine, with how far the rounds that measured it spread.

    `median_s` is the median over `rounds` of the per-pass time of each round; `spread` is half the
    interquartile range of those round times relative to the median, so the middle half of the rounds
    lie within about `median_s * (1 ± spread)`. `threads` is `torch.get_num_threads()` and `batch` the
    first input's dim 0 when it was measured.

        >>> before, after = compare_latency(model, pruned, x)
        >>> format_speedup(before, after)
        '2.31x faster (median of 7 rounds, ±4 %, 2 threads, batch 1)'
    """

    median_s: float
    spread: float
    rounds: int
    threads: int
    batch: int


MIN_ROUNDS = 3  # fewer rounds give no spread to trust: `speedup` is None
MAX_NOISE = 0.5  # a ratio uncertain by more than ±50 % (the sum of both spreads) is no ratio: None
_MAX_REPS = 100_000  # passes per round, whatever the clock says


def measure_latency(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    rounds: int = 7,
    warmup: int = 2,
    min_seconds: float = 0.05,
) -> Latency:
    """Time `model`'s forward pass (eval mode, inference mode); the model is not changed.

    After `warmup` untimed passes, each of `rounds` rounds times as many passes as it takes to last
    at least `min_seconds` (so a tiny model is not timer and scheduler noise) and records the time of
    one pass; the record holds the median and spread of the rounds.
    """
    return _measure([model], _inputs(example_inputs), rounds, warmup, min_seconds)[0]


def compare_latency(
    before: nn.Module,
    after: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    rounds: int = 7,
    warmup: int = 2,
    min_seconds: float = 0.05,
) -> tuple[Latency, Latency]:
    """`measure_latency` of two models (dense, pruned) with their rounds alternating.

    Interleaved rounds share the machine's slow spells, so a busy moment slows both models instead
    of making one look faster. This is what the CLI and the dashboard report.
    """
    first, second = _measure([before, after], _inputs(example_inputs), rounds, warmup, min_seconds)
    return first, second


def measure_latencies(
    models: Sequence[nn.Module],
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    rounds: int = 7,
    warmup: int = 2,
    min_seconds: float = 0.05,
) -> list[Latency]:
    """`compare_latency` of any number of models (dense, pruned, pruned + INT8, ...), rounds interleaved."""
    return _measure(list(models), _inputs(example_inputs), rounds, warmup, min_seconds)


def speedup(before: Latency, after: Latency) -> float | None:
    """`before.median_s / after.median_s`, or None where the timings cannot support a ratio.

    None when
    - either was measured in fewer than `MIN_ROUNDS` (3) rounds, or
    - the two were measured with different thread counts or batch sizes, or
    - the ratio's uncertainty, `before.spread + after.spread`, exceeds `MAX_NOISE` (±50 %), or
    - the bands `median_s * (1 ± spread)` of the two overlap: the difference is within the scatter.
    """
    if min(before.rounds, after.rounds) < MIN_ROUNDS or min(before.median_s, after.median_s) <= 0:
        return None
    if (before.threads, before.batch) != (after.threads, after.batch) or before.spread + after.spread > MAX_NOISE:
        return None
    if _overlap(before, after):
        return None
    return before.median_s / after.median_s


def format_speedup(before: Latency, after: Latency) -> str:
    """One line saying how much faster `after` runs than `before`, or why no ratio can be given.

    The ± is the ratio's relative uncertainty: the sum of both spreads.
    """
    ratio, noise = speedup(before, after), _percent(before.spread + after.spread)
    rounds = min(before.rounds, after.rounds)
    if rounds < MIN_ROUNDS:
        return f"no reliable speed-up: {rounds} round(s) of timing, {MIN_ROUNDS} needed"
    if (before.threads, before.batch) != (after.threads, after.batch):
        return "no reliable speed-up: the two were timed with different thread counts or batch sizes"
    if ratio is None and _overlap(before, after) and before.spread + after.spread <= MAX_NOISE:
        measured = _ratio_text(before.median_s / after.median_s) if after.median_s > 0 else "difference"
        return f"no reliable speed-up: the {measured} measured is within the timing noise (±{noise})"
    if ratio is None:
        return f"no reliable speed-up: timings too noisy (±{noise})"
    threads = f"{after.threads} thread{'s' if after.threads != 1 else ''}"
    return f"{_ratio_text(ratio)} (median of {rounds} rounds, ±{noise}, {threads}, batch {after.batch})"


def format_latency(t: Latency) -> str:
    """`'2.41 ms ±3 %'`: the median in a readable unit, and the spread."""
    unit, scale = next(((u, s) for u, s in (("s", 1.0), ("ms", 1e-3)) if t.median_s >= s), ("µs", 1e-6))
    return f"{t.median_s / scale:.3g} {unit} ±{_percent(t.spread)}"


def _overlap(a: Latency, b: Latency) -> bool:
    """Whether the bands `median_s * (1 ± spread)` of the two overlap."""
    low, high = sorted((a, b), key=lambda t: t.median_s)
    return low.median_s * (1 + low.spread) > high.median_s * (1 - high.spread)


def _ratio_text(ratio: float) -> str:
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.0f} %" if math.isfinite(fraction) else "∞ %"


def latency(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], reps: int = 10, warmup: int = 2
) -> float:
    """Median seconds of one forward pass over `reps` single passes: `measure_latency(...).median_s`.

    Kept for callers that time rounds themselves (`bench/`); prefer `measure_latency` or
    `compare_latency`, which also say how noisy the timing was.
    """
    return measure_latency(model, example_inputs, rounds=reps, warmup=warmup, min_seconds=0.0).median_s


def _measure(
    models: Sequence[nn.Module], inputs: tuple[torch.Tensor, ...], rounds: int, warmup: int, min_seconds: float
) -> list[Latency]:
    """Latency of each model, their rounds alternating; timed on working copies in eval mode.

    The copies share the models' tensors, so they run as fast; the models' own flags never change,
    which leaves them usable by other threads meanwhile (a dashboard's shared model). On CUDA inputs
    the clock stops only after the device has finished: kernels launch asynchronously, so without a
    synchronisation a round would time the launches.
    """
    if rounds < 1 or warmup < 0 or min_seconds < 0:
        raise ArgumentError(f"latency needs rounds >= 1, warmup >= 0, min_seconds >= 0; got {rounds}, {warmup}, "
                            f"{min_seconds}")  # fmt: skip
    times: list[list[float]] = [[] for _ in models]
    models = [working_copy(model) for model in models]
    with contextlib.ExitStack() as modes, torch.inference_mode():
        for model in models:
            modes.enter_context(eval_mode(model))
        sync = synchronizer(inputs)
        reps = []
        for model in models:
            with running_model(model, inputs, "timing"):
                reps.append(_repetitions(model, inputs, warmup, min_seconds, sync))
        order = list(zip(models, reps, times))
        for i in range(rounds):  # ABBA...: neither model always runs first, on caches the other left
            for model, n, record in order if i % 2 == 0 else reversed(order):
                with running_model(model, inputs, "timing"):
                    sync()
                    start = time.perf_counter()
                    for _ in range(n):
                        model(*inputs)
                    sync()
                    record.append((time.perf_counter() - start) / n)
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() > 0 else 1
    threads = torch.get_num_threads()
    return [Latency(statistics.median(t), _spread(t), rounds, threads, batch) for t in times]


def _repetitions(model: nn.Module, inputs: tuple[torch.Tensor, ...], warmup: int, min_seconds: float,
                 sync: Callable[[], None]) -> int:  # fmt: skip
    """Run the warm-up passes (one at least when calibrating); how many passes last `min_seconds`."""
    fastest = math.inf
    for _ in range(max(warmup, 1 if min_seconds > 0 else 0)):
        sync()
        start = time.perf_counter()
        model(*inputs)
        sync()
        fastest = min(fastest, time.perf_counter() - start)
    if min_seconds <= 0:
        return 1
    return max(1, min(_MAX_REPS, math.ceil(min_seconds / max(fastest, 1e-9))))


def _spread(times: Sequence[float]) -> float:
    """Half the interquartile range relative to the median; 0 for fewer than two rounds."""
    if len(times) < 2:
        return 0.0
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / (2 * median) if median > 0 else math.inf
