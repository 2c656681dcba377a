"""`allocate`: per-group sparsities that meet a FLOPs, params or latency budget with the least predicted damage.

The sensitivity curves say what pruning each group *alone* costs in accuracy (or loss, or
divergence); allocation assumes those effects add up and picks one sparsity per group:

    >>> curves = sweep(model, data, example, metric=["accuracy", "loss"])
    >>> plan = allocate(curves, graph, Budget(flops=0.5), method="dp", model=model)
    >>> plan.predicted, plan.totals.flops_after / plan.totals.flops_before
    ({'accuracy': 0.962, 'loss': 0.131}, 0.4994)

Cost is exact under coupling: a conv between two pruned groups costs (kept in) x (kept out), and
`CostModel` prices every candidate exactly as `count()` measures the applied model, so the
returned plan always meets its budget. A latency budget (`Budget(latency=ms)`) is priced by a measured
`prunecore.latency.LatencyModel` given to the problem, the same way. Methods live in a registry (`list_methods()`):

- `uniform`: one sparsity for every group, the smallest that meets the budget;
- `threshold`: every group takes its largest sparsity whose predicted damage stays under one
  tolerance, the smallest tolerance that meets the budget (Li et al. 2017);
- `greedy`: repeatedly take the move with the least damage per FLOP (or param) saved;
- `dp`: the multiple-choice knapsack over the curves solved exactly by dynamic programming, with
  the coupled cost re-linearised around the current solution until it settles (SPDY-style);
- `global`: one ranking of all units by the criterion, each group's scores divided by their mean,
  cut at the threshold that meets the budget (Torch-Pruning's global pruning; ignores the curves).

Curve-driven methods never go past a group's largest measured sparsity; between measured points
the curves are interpolated linearly. For repeated allocation on one model (the dashboard, a
Pareto front), build the `AllocationProblem` once and call `solve`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from prunecore.errors import ArgumentError, UserError
from prunecore.cost import CostModel, cost_model
from prunecore.evaluate import get_metric, list_metrics
from prunecore.graph import ChannelGraph
from prunecore.importance import score
from prunecore.latency import LatencyModel
from prunecore.plan import BUDGET_KINDS, Allocation, Budget, Plan, PredictedBy, Totals, kept_units
from prunecore.predict import Prediction, Predictor
from prunecore.prune import keep_top
from prunecore.sensitivity import DENSE

__all__ = [
    "AllocationError",
    "AllocationProblem",
    "Method",
    "PlanReport",
    "allocate",
    "allocation_problem",
    "list_methods",
    "pareto",
    "register_method",
    "solve",
    "with_latency",
    "with_predictor",
    "with_ties",
]

_GRID = np.round(np.arange(0.0, 1.0, 0.01), 2)  # candidate sparsities of the curve-driven methods
_METRIC_PREFERENCE = ("loss", "kl", "accuracy", "agreement")


class AllocationError(UserError, ValueError):
    """The budget cannot be met under the given bounds, or the curves do not fit the model."""


# -- the problem: curves, costs and scores of one model, precomputed --------------------------------
@dataclass(frozen=True, eq=False)
class Curve:
    """One group's measured metrics at the pruned fractions it was swept at, (0, dense) included."""

    fractions: np.ndarray  # (L,) increasing, fractions[0] == 0
    values: Mapping[str, np.ndarray]  # metric -> (L,)

    def at(self, metric: str, fraction: float | np.ndarray) -> np.ndarray:
        """Linear interpolation; flat beyond the largest measured fraction."""
        return np.interp(fraction, self.fractions, self.values[metric])


@dataclass(frozen=True)
class PlanReport:
    """What a slider state (or a plan) prices and predicts: what the dashboard and the CLI print beside it.

    `band` holds a calibrated predictor's band per metric (empty with the additive prediction);
    `predicted_by` says which of the two predicted (None: no curves, nothing predicted);
    `over_budget` compares with the budget given to `report` (False without one); `beyond` names
    the groups cut past their largest swept sparsity, where a curve holds its last measured value.
    `latency_ms` and `dense_latency_ms` are the latency model's predictions (None without one).
    """

    kept: Mapping[str, int]
    params: int
    flops: int
    dense_params: int
    dense_flops: int
    predicted: Mapping[str, float]
    band: Mapping[str, Prediction]
    predicted_by: PredictedBy | None
    over_budget: bool
    beyond: tuple[str, ...]
    latency_ms: float | None = None
    dense_latency_ms: float | None = None

    def kept_fraction(self, kind: str) -> float:
        """The fraction of the dense model's "flops" or "params" the plan keeps."""
        return self.flops / self.dense_flops if kind == "flops" else self.params / self.dense_params


@dataclass(frozen=True, eq=False)
class AllocationProblem:
    """Everything allocation needs, computed once: curves, exact cost model, unit ranking.

    `metric` is the curve allocation protects; `dense` holds the dense model's value of every
    curve metric. Without curves (`curves={}`) only `uniform` and `global` can run and plans
    carry no prediction.

    With a `predictor` (`prunecore.predict`, fitted on measured plans: `with_predictor`), predictions
    are the predictor's, which knows that damage compounds, and the curve-driven methods minimise its
    separable score: every predicted metric is monotone in it, so the least score within a budget is
    the best predicted plan. Without one, each group's change from its own curve is added up.
    `latency` (`with_latency`) prices latency budgets and reports. `ties` (`with_ties`) are sets of
    groups that every method keeps at one fraction, e.g. the MLP of every layer of a transformer
    whose config states one MLP width.
    """

    graph: ChannelGraph
    cost: CostModel
    scores: Mapping[str, torch.Tensor]
    curves: Mapping[str, Curve]
    metric: str
    dense: Mapping[str, float]
    criterion: str
    round_to: int
    model_name: str = ""
    predictor: Predictor | None = None
    latency: LatencyModel | None = None
    ties: tuple[tuple[str, ...], ...] = ()

    def kept(self, sparsities: Mapping[str, float]) -> dict[str, int]:
        """Kept units per named group, by the one rounding rule."""
        return {n: kept_units(self.graph[n].size, s, self.round_to) for n, s in sparsities.items()}

    def price(self, sparsities: Mapping[str, float]) -> tuple[int, int]:
        """(params, flops) of the model pruned to `sparsities` (other groups dense)."""
        return self.cost.price(self.kept(sparsities))

    def change(self, name: str, sparsity: float, metric: str | None = None) -> float | None:
        """Predicted change of `metric` when group `name` alone loses `sparsity`; None without a curve."""
        if name not in self.curves:
            return None
        return self._change(name, self.kept({name: sparsity})[name], metric or self.metric)

    def predict(self, sparsities: Mapping[str, float]) -> dict[str, float]:
        """Predicted metrics of the model pruned to `sparsities`, adding up the groups' changes.

        Sums are clipped to the metric's range (accuracy stays in [0, 1]). Empty when a pruned
        group has no curve: its effect cannot be predicted.
        """
        return self._predict(self.kept(sparsities))

    def predict_band(self, sparsities: Mapping[str, float]) -> dict[str, Prediction]:
        """The predictor's value and band (about 90 % of plans measure inside) per metric; {} without one."""
        return self._band(self.kept(sparsities))

    def _band(self, kept: Mapping[str, int]) -> dict[str, Prediction]:
        """`predict_band` from kept unit counts."""
        pruned = {n: k for n, k in kept.items() if k < self.graph[n].size}
        if self.predictor is None or any(n not in self.predictor.groups for n in pruned):
            return {}
        return self.predictor.predict_score(self._score(pruned))

    @property
    def predicted_by(self) -> PredictedBy | None:
        """How `predict` predicts: the calibrated predictor, adding up the curves, or nothing without curves."""
        if self.predictor is not None:
            return PredictedBy("calibrated", self.predictor.plans)
        return PredictedBy("additive") if self.curves else None

    def report(self, sparsities: Mapping[str, float], budget: Budget | None = None) -> PlanReport:
        """Price and predict `sparsities` (groups not named stay dense) and check them against `budget`."""
        kept = self.kept(sparsities)
        params, flops = self.cost.price(kept)
        dense_params, dense_flops = self.cost.dense
        ms = dense_ms = None
        if self.latency is not None:
            ms, dense_ms = self.latency.price(kept), self.latency.dense_ms
        over = budget is not None and self._over(budget, params, flops, ms)
        beyond = tuple(n for n, k in kept.items()
                       if n in self.curves and 1.0 - k / self.graph[n].size > self.curves[n].fractions[-1] + 1e-9)
        return PlanReport(kept, params, flops, dense_params, dense_flops, self._predict(kept),
                          self._band(kept), self.predicted_by, over, beyond, ms, dense_ms)  # fmt: skip

    def over_budget(self, sparsities: Mapping[str, float], budget: Budget) -> bool:
        """`report(sparsities, budget).over_budget` without the prediction: for searches that check many plans."""
        kept = self.kept(sparsities)
        ms = self.latency.price(kept) if budget.kind == "latency" and self.latency is not None else None
        return self._over(budget, *self.cost.price(kept), ms)

    def _over(self, budget: Budget, params: int, flops: int, ms: float | None) -> bool:
        """Whether a plan that spends `params`, `flops` and `ms` (None: no latency model) exceeds `budget`."""
        if budget.kind == "latency":
            if self.latency is None or ms is None:
                raise AllocationError(_NO_LATENCY_MODEL)
            return ms > budget.target(self.latency.dense_ms)
        dense_params, dense_flops = self.cost.dense
        return (flops if budget.kind == "flops" else params) > budget.target(
            dense_flops if budget.kind == "flops" else dense_params)

    def floor(self, kind: str, method: str = "dp", min_sparsity: Bound = 0.0, max_sparsity: Bound = 0.9,
              locked: Mapping[str, float] | None = None, exclude: Sequence[str] = ()) -> float:  # fmt: skip
        """The least "flops", "params" or "latency" (ms) `method` can reach within these bounds: every free
        group at its largest allowed sparsity (for a curve-driven method, also within its curve)."""
        budget = Budget(**{kind: 1.0})
        problem = _aligned(self) if kind == "latency" else self
        search = _Search.build(problem, budget, get_method(method).needs_curves, min_sparsity, max_sparsity,
                               locked or {}, exclude)  # fmt: skip
        return search.cost(search.lo)

    def by_sensitivity(self, names: Iterable[str]) -> list[str]:
        """`names`, the groups most harmed by losing half their units first; groups without a curve last."""
        def harm(name: str) -> float:
            return float(self.damage(name, np.array([self.kept({name: 0.5})[name]]))[0])

        names = list(names)
        return sorted((n for n in names if n in self.curves), key=harm, reverse=True) + [
            n for n in names if n not in self.curves]  # fmt: skip

    def _score(self, pruned: Mapping[str, int]) -> float:
        """The predictor's separable score of kept counts: the sum of each group's term."""
        return float(sum(self.predictor.term(n, 1.0 - k / self.graph[n].size) for n, k in pruned.items()))

    def _predict(self, kept: Mapping[str, int]) -> dict[str, float]:
        """`predict` from kept unit counts (each group's count rounded once, by the caller)."""
        pruned = {n: k for n, k in kept.items() if k < self.graph[n].size}
        if any(n not in self.curves for n in pruned):
            return {}
        if self.predictor is not None:
            return {m: p.value for m, p in self.predictor.predict_score(self._score(pruned)).items()}
        out = {}
        for m, dense in self.dense.items():
            low, high = get_metric(m).bounds
            out[m] = min(max(dense + sum(self._change(n, k, m) for n, k in pruned.items()), low), high)
        return out

    def _change(self, name: str, kept: int, metric: str) -> float:
        """Change of `metric` read off group `name`'s curve when it keeps `kept` units."""
        fraction = 1.0 - kept / self.graph[name].size
        return float(self.curves[name].at(metric, fraction)) - self.dense[metric]

    def plan(self, sparsities: Mapping[str, float], allocation: Allocation | None = None) -> Plan:
        """The plan keeping each named group's best-ranked units at its sparsity (others dense).

        What the dashboard builds from its sliders: same ranking, rounding, totals and prediction
        as a plan from `solve`.
        """
        for name, s in sparsities.items():
            if name not in self.cost.groups:
                raise AllocationError(f"no prunable group named {name!r} in {self.graph.model_type}")
            _check_sparsity(f"sparsity of {name!r}", s)
        kept = self.cost.kept_vector(self.kept(sparsities))
        return _plan(self, kept, allocation)

    def damage(self, name: str, kept: np.ndarray) -> np.ndarray:
        """Predicted harm (positive = worse) of group `name` keeping each of `kept` units.

        With a predictor, its term for the group (what its score adds up); else the curve's change.
        """
        size = self.graph[name].size
        if self.predictor is not None:
            return self.predictor.term(name, 1.0 - np.asarray(kept) / size)
        change = self.curves[name].at(self.metric, 1.0 - np.asarray(kept) / size) - self.dense[self.metric]
        return -change if get_metric(self.metric).higher_is_better else change


def allocation_problem(
    curves: pd.DataFrame | None,
    graph: ChannelGraph,
    model: nn.Module,
    metric: str | None = None,
    criterion: str | None = None,
    round_to: int | None = None,
    data: Iterable[Any] | None = None,
    model_name: str = "",
    device: str | torch.device | None = None,
    latency: LatencyModel | None = None,
    ties: Sequence[Sequence[str]] = (),
) -> AllocationProblem:
    """Build the `AllocationProblem` of `model` from its sweep (`curves`, as `sweep` returns them).

    The criterion and `round_to` default to the ones the curves were measured with (from
    `curves.attrs["config"]`), so the units a plan keeps are the units the curves measured;
    `metric` defaults to the first of loss, kl, accuracy, agreement the curves have. `latency`
    (`prunecore.latency.latency_model` of this model) lets plans meet `Budget(latency=ms)`; `ties`
    (see `with_ties`) keep sets of groups at one fraction.
    """
    config = dict(curves.attrs.get("config", {})) if curves is not None else {}
    criterion = _consistent("criterion", criterion, config.get("criterion"), "l1")
    round_to = _consistent("round_to", round_to, config.get("round_to"), 1)
    parsed, dense = _parse_curves(curves, graph) if curves is not None else ({}, {})
    if parsed:
        metric = metric or next((m for m in _METRIC_PREFERENCE if m in dense), None)
        if metric not in dense:
            raise AllocationError(f"the curves have no {metric!r} column; they have {', '.join(dense)}")
    else:
        metric = ""
    scores = score(model, graph, criterion, data=data, device=device)
    example = tuple(spec.example() for spec in graph.inputs)
    name = model_name or (curves.attrs.get("model_name", "") if curves is not None else "")
    problem = AllocationProblem(
        graph, cost_model(model, example, graph, scores), scores, parsed, metric, dense, criterion, round_to, name
    )
    problem = with_ties(problem, ties) if ties else problem
    return with_latency(problem, latency) if latency is not None else problem


def with_ties(problem: AllocationProblem, ties: Sequence[Sequence[str]]) -> AllocationProblem:
    """`problem` keeping each set of `ties` at one kept fraction: every method moves a set as one group.

    What a model's format can state decides this, not the curves: a HuggingFace config states one
    MLP width and one head count for all layers, and BERT-style configs a width that is the head
    count times the head size (`prunecore.hf.statable`). The set's smallest group decides, and each
    other group keeps its size over the smallest's times as many units (the groups' sizes must be
    multiples of the smallest), so the counts stay in proportion. A set's predicted damage is the sum
    of its groups' (each read off its own curve), so allocation weighs the whole set. The groups of
    a set must be prunable and in no other set.
    """
    seen: set[str] = set()
    ordered = []
    for tie in ties:
        for name in tie:
            if name not in problem.cost.groups:
                raise AllocationError(f"a tie names {name!r}, not a prunable group of {problem.graph.model_type}")
            if name in seen:
                raise AllocationError(f"group {name!r} is in more than one tie")
            seen.add(name)
        tie = sorted(tie, key=lambda n: problem.graph[n].size)  # the smallest first: it decides
        smallest = problem.graph[tie[0]].size
        if any(problem.graph[n].size % smallest for n in tie):
            sizes = [problem.graph[n].size for n in tie]
            raise AllocationError(f"tied groups must have sizes that are multiples of the smallest; {', '.join(tie)} "
                                  f"have {sizes} units")  # fmt: skip
        if len(tie) > 1:
            ordered.append(tuple(tie))
    return dataclasses.replace(problem, ties=tuple(ordered))


def with_latency(problem: AllocationProblem, latency: LatencyModel | None) -> AllocationProblem:
    """`problem` pricing latency with `latency` (built for this model: the same prunable groups and sizes)."""
    if latency is not None:
        same = latency.groups == problem.cost.groups and np.array_equal(latency.cost.sizes, problem.cost.sizes)
        if not same:
            raise AllocationError("the latency model was built for another model (its prunable groups differ); "
                                  "build it with latency_model(model, example, graph)")  # fmt: skip
    return dataclasses.replace(problem, latency=latency)


_NO_LATENCY_MODEL = ("a latency budget needs a latency model: allocation_problem(..., latency=latency_model(model, "
                     "example, graph)), or --budget latency=MS with --runtime on the command line")  # fmt: skip


def with_predictor(problem: AllocationProblem, predictor: Predictor | None) -> AllocationProblem:
    """`problem` predicting (and allocating) with `predictor`; None goes back to adding up the curves.

    The predictor must cover every curve of the problem (it was fitted on these curves).
    """
    if predictor is not None:
        missing = sorted(set(problem.curves) - set(predictor.groups))
        if missing or predictor.round_to != problem.round_to:
            what = f"no term for group(s) {', '.join(missing[:5])}" if missing else f"round_to {predictor.round_to}"
            raise AllocationError(f"the predictor was fitted on other curves ({what}); fit it on this sweep")
    return dataclasses.replace(problem, predictor=predictor)


def _consistent(what: str, given: Any, measured: Any, default: Any) -> Any:
    if given is not None and measured is not None and given != measured:
        raise AllocationError(
            f"the curves were measured with {what} {measured!r}; allocate with the same, not {given!r}"
        )
    return given if given is not None else measured if measured is not None else default


def _parse_curves(curves: pd.DataFrame, graph: ChannelGraph) -> tuple[dict[str, Curve], dict[str, float]]:
    metrics = [m for m in list_metrics() if m in curves.columns]
    if not metrics:
        raise AllocationError(f"the curves have no metric column ({', '.join(list_metrics())})")
    base = curves[curves.group == DENSE]
    if base.empty:
        raise AllocationError(f"the curves have no {DENSE!r} row: pass the whole frame sweep() returned")
    dense = {m: float(base[m].iloc[0]) for m in metrics}
    parsed = {}
    for name, rows in curves[curves.group != DENSE].groupby("group", sort=False):
        if name not in graph:
            raise AllocationError(f"the curves are for another model: it has no group named {name!r}")
        size = graph[name].size
        if (rows["size"] != size).any():
            raise AllocationError(f"the curves give group {name!r} {int(rows['size'].iloc[0])} units, the model {size}")
        if not graph[name].prunable:
            raise AllocationError(f"the curves prune group {name!r}, which cannot be pruned: it {graph[name].reason}")
        fractions = 1.0 - rows["kept"].to_numpy(dtype=float) / size
        table = pd.DataFrame({"f": fractions, **{m: rows[m].to_numpy(dtype=float) for m in metrics}})
        table = pd.concat([pd.DataFrame([{"f": 0.0, **dense}]), table]).groupby("f", sort=True).mean()
        parsed[name] = Curve(table.index.to_numpy(), {m: table[m].to_numpy() for m in metrics})
    return parsed, dense


# -- the registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[_Search], np.ndarray]
    needs_curves: bool
    doc: str


_METHODS: dict[str, Method] = {}


def register_method(name: str, needs_curves: bool = True):
    """Register `fn(search) -> kept vector` as an allocation method (see the built-in ones)."""

    def wrap(fn: Callable[[_Search], np.ndarray]):
        _METHODS[name] = Method(name, fn, needs_curves, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ArgumentError(f"unknown allocation method {name!r}; choose one of {', '.join(list_methods())}")
    return _METHODS[name]


# -- solving --------------------------------------------------------------------------------------
Bound = float | Mapping[str, float]


def allocate(
    curves: pd.DataFrame | None,
    graph: ChannelGraph,
    budget: Budget,
    method: str = "dp",
    *,
    model: nn.Module,
    min_sparsity: Bound = 0.0,
    max_sparsity: Bound = 0.9,
    locked: Mapping[str, float] | None = None,
    exclude: Sequence[str] = (),
    metric: str | None = None,
    criterion: str | None = None,
    round_to: int | None = None,
    data: Iterable[Any] | None = None,
    model_name: str = "",
    device: str | torch.device | None = None,
    latency: LatencyModel | None = None,
    ties: Sequence[Sequence[str]] = (),
) -> Plan:
    """The plan of `method` that keeps at most `budget` of the model's FLOPs or params, or its latency.

    `model` ranks the units to keep (by the criterion the curves were measured with) and gives
    the layer shapes the cost is computed from. `min_sparsity` / `max_sparsity` bound every group
    (a number) or the named ones (a mapping); `locked` pins groups to a sparsity and `exclude`
    keeps groups dense. Raises `AllocationError` when no plan within the bounds meets the budget.
    `device` is where a data-driven criterion (Taylor) scores the units; default, where the model is.
    `latency` prices a `Budget(latency=ms)`; `ties` keep sets of groups at one fraction (`with_ties`).
    """
    problem = allocation_problem(curves, graph, model, metric, criterion, round_to, data, model_name, device, latency,
                                 ties)  # fmt: skip
    return solve(problem, budget, method, min_sparsity, max_sparsity, locked, exclude)


def solve(
    problem: AllocationProblem,
    budget: Budget,
    method: str = "dp",
    min_sparsity: Bound = 0.0,
    max_sparsity: Bound = 0.9,
    locked: Mapping[str, float] | None = None,
    exclude: Sequence[str] = (),
    guide: str = "flops",
) -> Plan:
    """`allocate` on a prepared problem: no model pass, no scoring, milliseconds for small models.

    A latency budget is met, as the problem's latency model predicts, one of two ways (`guide`):
    "flops" (default) takes the method's plan for the largest FLOPs budget whose predicted latency
    fits; "latency" lets the method trade damage against predicted milliseconds directly. The
    second can only be as good as the model's errors are small and unstructured: searching for the
    plans it predicts cheapest also finds where it errs, and in `bench/bench_latency.py` it chose
    less accurate plans than the first at equal measured latency on most samples.
    """
    m = get_method(method)
    if m.needs_curves and not problem.curves:
        raise AllocationError(
            f"method {method!r} needs sensitivity curves; run a sweep first, or use uniform or global"
        )
    if guide not in ("flops", "latency"):
        raise AllocationError(f"guide must be 'flops' or 'latency', got {guide!r}")
    bounds = (min_sparsity, max_sparsity, locked or {}, exclude)
    if budget.kind == "latency":
        problem = _aligned(problem)
    if budget.kind == "latency" and guide == "flops":
        kept = _latency_by_flops(problem, budget, m, *bounds)
        return _plan(problem, kept, Allocation(method, budget, problem.metric))
    search = _Search.build(problem, budget, m.needs_curves, *bounds)
    if search.needs_pruning():
        search.check_feasible(budget)
        kept = search.expand(m.fn(search))
    else:
        kept = search.hi.copy()
    if search.cost(kept) > search.target + search.slack:  # a method bug, never the user's fault
        raise AssertionError(f"method {method!r} returned a plan over budget")
    return _plan(problem, kept, Allocation(method, budget, problem.metric))


def _aligned(problem: AllocationProblem) -> AllocationProblem:
    """`problem` keeping widths the latency model's runtime runs on its fast path: `round_to` becomes a
    multiple of its alignment. On ONNX Runtime a width not divisible by 4 leaves its blocked convolutions,
    so a plan of odd widths can run slower than the dense model; allowed them, a search under a latency
    budget escapes that cost only by cutting far deeper (sample ResNet-20, 0.45 ms: to 9 % of the MACs,
    against 24 % with 4-aligned widths). Aligned widths are a subset of the curves', so the curves apply."""
    align = problem.latency.align if problem.latency is not None else 1
    round_to = math.lcm(problem.round_to, align)
    return problem if round_to == problem.round_to else dataclasses.replace(problem, round_to=round_to)


def _latency_by_flops(problem: AllocationProblem, budget: Budget, m: Method, *bounds: Any) -> np.ndarray:
    """The method's kept units for the largest FLOPs budget whose predicted latency meets `budget`.

    Bisection on the FLOPs fraction between the deepest plan the bounds allow and the dense model;
    every plan tried is priced by the latency model, and the best one that fits is kept (so a
    latency that is not monotone in the FLOPs fraction still yields a plan within the budget).
    """
    if problem.latency is None:
        raise AllocationError(_NO_LATENCY_MODEL)
    ms = problem.latency.evaluate

    def kept_at(fraction: float) -> np.ndarray:
        search = _Search.build(problem, Budget(flops=fraction), m.needs_curves, *bounds)
        return search.expand(m.fn(search)) if search.needs_pruning() else search.hi.copy()

    deepest = _Search.build(problem, budget, m.needs_curves, *bounds)
    if not deepest.needs_pruning():
        return deepest.hi.copy()
    deepest.check_feasible(budget)  # the floor: every free group at its largest sparsity
    dense_flops = problem.cost.dense[1]
    low = float(problem.cost.evaluate(deepest.lo)[1][0]) / dense_flops
    best, high = deepest.lo.copy(), 1.0
    for _ in range(20):
        middle = (low + high) / 2
        kept = kept_at(middle)
        if float(ms(kept)[0]) <= budget.value:
            best, low = kept, middle
        else:
            high = middle
    return best


def pareto(
    problem: AllocationProblem,
    budgets: Sequence[float] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3),
    methods: Sequence[str] | None = None,
    kind: str = "flops",
    **bounds: Any,
) -> pd.DataFrame:
    """Predicted metric against cost over a range of budget fractions, per method.

    `budgets` are what `Budget` takes for flops and params (a fraction, or a count above 1), and
    fractions of the latency model's dense ms for "latency", so one range sweeps any kind. One row
    per (method, budget) that could be met: method, budget, params, flops, latency_ms (with a
    latency model) and the predicted value of each curve metric. Feeds the dashboard's Pareto chart
    and the CLI.
    """
    if kind not in BUDGET_KINDS:
        raise AllocationError(f"unknown budget kind {kind!r}; expected one of {', '.join(BUDGET_KINDS)}")
    scale = 1.0
    if kind == "latency":
        if problem.latency is None:
            raise AllocationError(_NO_LATENCY_MODEL)
        bad = [b for b in budgets if not 0 < b <= 1]
        if bad:
            raise AllocationError(f"latency budgets for pareto are fractions of the dense ms in (0, 1]; got {bad}")
        scale = problem.latency.dense_ms
    methods = list(methods) if methods is not None else [
        n for n in list_methods() if problem.curves or not get_method(n).needs_curves
    ]  # fmt: skip
    rows = []
    for name in methods:
        for b in budgets:
            try:
                plan = solve(problem, Budget(**{kind: b * scale}), name, **bounds)
            except AllocationError:
                continue
            assert plan.totals is not None
            ms = {} if problem.latency is None else {"latency_ms": problem.latency.predict(plan)}
            rows.append({"method": name, "budget": b, "params": plan.totals.params_after,
                         "flops": plan.totals.flops_after, **ms, **plan.predicted})  # fmt: skip
    return pd.DataFrame(rows)


@dataclass(eq=False)
class _Search:
    """The search space of one `solve` call, in kept units over the cost model's groups.

    `free` groups are allocated between `lo` and `hi` kept units (their max and min sparsity);
    every other group stays at `hi` (dense, or where it is locked). `options[g]` are the kept
    counts a curve-driven method may choose, `hi` first, and `harm[g]` their predicted damage.
    A tie (`problem.ties`) is one free group, its first (`tied[g]`: all its groups); its other groups
    follow it in every cost (`expand`, `scale[t]` units per unit of the first), and its harm is the
    sum of theirs, so methods need not know.
    """

    problem: AllocationProblem
    kind: str
    target: float
    free: list[int]
    lo: np.ndarray
    hi: np.ndarray
    options: dict[int, np.ndarray] = field(default_factory=dict)
    harm: dict[int, np.ndarray] = field(default_factory=dict)
    tied: dict[int, list[int]] = field(default_factory=dict)
    scale: dict[int, int] = field(default_factory=dict)

    @classmethod
    def build(cls, problem: AllocationProblem, budget: Budget, curve_driven: bool, min_s: Bound, max_s: Bound,
              locked: Mapping[str, float], exclude: Sequence[str]) -> _Search:  # fmt: skip
        cm, graph, r = problem.cost, problem.graph, problem.round_to
        pinned = {**{n: 0.0 for n in exclude}, **locked}
        for name, s in pinned.items():
            if name not in graph:
                raise AllocationError(f"no channel group named {name!r} in {graph.model_type}")
            if s > 0 and not graph[name].prunable:
                raise AllocationError(f"group {name!r} cannot be pruned: it {graph[name].reason}")
            _check_sparsity(f"locked sparsity of {name!r}", s)
        for bound in (min_s, max_s):
            for name in bound if isinstance(bound, Mapping) else ():
                if name not in cm.groups:
                    raise AllocationError(f"sparsity bound names {name!r}, which is not a prunable group")
        hi, lo = cm.sizes.copy(), cm.sizes.copy()
        free = []
        for g, name in enumerate(cm.groups):
            size = int(cm.sizes[g])
            if name in pinned:
                hi[g] = lo[g] = kept_units(size, pinned[name], r)
                continue
            if curve_driven and name not in problem.curves:
                continue  # no curve: it stays dense
            smin, smax = _bound(min_s, name, "min_sparsity"), _bound(max_s, name, "max_sparsity")
            if smin > smax:
                raise AllocationError(f"min_sparsity {smin} exceeds max_sparsity {smax} for group {name!r}")
            hi[g], lo[g] = kept_units(size, smin, r), kept_units(size, smax, r)
            if curve_driven:
                measured = problem.curves[name].fractions[-1]
                lo[g] = max(lo[g], math.ceil(size * (1 - measured) - 1e-9))
            if lo[g] < hi[g]:
                free.append(g)
        tied, scale = _tie(problem, free, lo, hi, pinned)
        if budget.kind == "latency" and problem.latency is None:
            raise AllocationError(_NO_LATENCY_MODEL)
        search = cls(problem, budget.kind, budget.target(cls._dense(problem, budget.kind)), free, lo, hi, tied=tied,
                     scale=scale)  # fmt: skip
        if curve_driven:
            for g in free:
                size = int(cm.sizes[g])
                grid = {kept_units(size, float(s), r) for s in _GRID}
                kept = sorted({k for k in grid if lo[g] <= k <= hi[g]} | {int(lo[g]), int(hi[g])}, reverse=True)
                search.options[g] = np.array(kept, dtype=np.int64)
                search.harm[g] = sum(problem.damage(cm.groups[t], search.options[g] * scale.get(t, 1))
                                     for t in tied.get(g, [g]))  # fmt: skip
        return search

    def expand(self, kept: np.ndarray) -> np.ndarray:
        """`kept` (`(G,)` or `(G, N)`) with every tied group at its tie's first group's count, in proportion."""
        if not self.tied:
            return kept
        kept = kept.copy()
        for g, members in self.tied.items():
            for t in members[1:]:
                kept[t] = kept[g] * self.scale[t]
        return kept

    def coupled(self) -> dict[int, set[int]]:
        """Per free group, the free groups whose cost changes with it (through any group of its tie)."""
        pairs = self.problem.cost.coupled()
        leader = {t: g for g, members in self.tied.items() for t in members}
        out = {}
        for g in self.free:
            near = set().union(*(pairs[t] for t in self.tied.get(g, [g])))
            out[g] = {leader.get(h, h) for h in near} - {g}
        return out

    @staticmethod
    def _dense(problem: AllocationProblem, kind: str) -> float:
        if kind == "latency":
            return problem.latency.dense_ms  # type: ignore[union-attr]  # checked in build
        return problem.cost.dense[0 if kind == "params" else 1]

    @property
    def slack(self) -> float:
        """How far over the target a cost may land by rounding: half a unit of a count, nothing of a time."""
        return 1e-9 * self.target if self.kind == "latency" else 0.5

    def costs(self, kept: np.ndarray) -> np.ndarray:
        """The budgeted quantity for kept vectors `(G,)` or `(G, N)`: `(N,)`."""
        kept = self.expand(kept)
        if self.kind == "latency":
            return self.problem.latency.evaluate(kept)  # type: ignore[union-attr]
        params, flops = self.problem.cost.evaluate(kept)
        return flops if self.kind == "flops" else params

    def cost(self, kept: np.ndarray) -> float:
        return float(self.costs(kept)[0])

    def needs_pruning(self) -> bool:
        return self.cost(self.hi) > self.target

    def check_feasible(self, budget: Budget) -> None:
        floor = self.cost(self.lo)
        if floor > self.target:
            dense = self._dense(self.problem, self.kind)
            if self.kind == "latency":
                runtime = self.problem.latency.runtime  # type: ignore[union-attr]
                raise AllocationError(
                    f"budget {budget} cannot be met: the smallest reachable latency is {floor:.4g} ms "
                    f"({floor / dense:.1%} of the dense {dense:.4g} ms, predicted on {runtime}) with every allowed "
                    "group at its largest sparsity; raise max_sparsity, unlock groups, sweep to higher sparsities, "
                    "or loosen the budget"
                )  # fmt: skip
            raise AllocationError(
                f"budget {budget} cannot be met: with every allowed group at its largest sparsity the model keeps "
                f"{floor:.4g} {self.kind} ({floor / dense:.1%} of dense); raise max_sparsity, unlock groups, "
                "sweep to higher sparsities, or loosen the budget"
            )

    def with_group(self, kept: np.ndarray, g: int, values: np.ndarray) -> np.ndarray:
        """Columns of `kept` with group `g` set to each of `values`: `(G, len(values))`."""
        out = np.repeat(kept[:, None], len(values), axis=1)
        out[g] = values
        return out


def _tie(problem: AllocationProblem, free: list[int], lo: np.ndarray, hi: np.ndarray,
         pinned: Mapping[str, float]) -> tuple[dict[int, list[int]], dict[int, int]]:  # fmt: skip
    """Fold each tie of `problem` into its first (smallest) group, in place: the tie is free only if every
    group is, between the tightest of their bounds; a pinned group pins the tie. Returns (first group ->
    all its groups, group -> its size over the first's)."""
    index = {name: g for g, name in enumerate(problem.cost.groups)}
    sizes = problem.cost.sizes
    tied: dict[int, list[int]] = {}
    scale: dict[int, int] = {}
    for tie in problem.ties:
        members = [index[n] for n in tie]
        k = {g: int(sizes[g]) // int(sizes[members[0]]) for g in members}
        pins = {pinned[n] for n in tie if n in pinned}
        if len(pins) > 1:
            raise AllocationError(f"tied groups {', '.join(tie)} are pinned to different sparsities {sorted(pins)}")
        low = max(-(-int(lo[g]) // k[g]) for g in members)  # in units of the first group
        high = min(int(hi[g]) // k[g] for g in members)
        if pins:  # every group of the tie where the pinned one is
            g = index[next(n for n in tie if n in pinned)]
            if hi[g] % k[g]:
                raise AllocationError(f"group {problem.cost.groups[g]!r} is pinned to keep {int(hi[g])} units, not a "
                                      f"multiple of {k[g]} as its tie needs")  # fmt: skip
            low = high = int(hi[g]) // k[g]
        elif any(g not in free for g in members) or low > high:  # one group cannot move: none can
            lo[members] = hi[members]
            for g in members:
                if g in free:
                    free.remove(g)
            continue
        for g in members:
            lo[g], hi[g] = low * k[g], high * k[g]
            if g in free:
                free.remove(g)
        scale.update(k)
        if low < high:
            free.append(members[0])
            tied[members[0]] = members
    free.sort()
    return tied, scale


def _bound(bound: Bound, name: str, what: str) -> float:
    value = bound.get(name, 0.0 if what == "min_sparsity" else 0.9) if isinstance(bound, Mapping) else bound
    _check_sparsity(what, value)
    return float(value)


def _check_sparsity(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise AllocationError(f"{what} must be a number in [0, 1), got {value!r}")


def _plan(problem: AllocationProblem, kept: np.ndarray, allocation: Allocation | None) -> Plan:
    graph, cm = problem.graph, problem.cost
    counts = {name: int(k) for name, k in zip(cm.groups, kept)}
    groups = {}
    for name, k in counts.items():
        size = graph[name].size
        change = 0.0 if k == size else problem._change(name, k, problem.metric) if name in problem.curves else None
        top = keep_top(problem.scores.get(name), size, k, graph[name].channels or None)
        groups[name] = dataclasses.replace(top, predicted_change=change)
    (p0, f0), (params, flops) = cm.dense, cm.evaluate(kept)
    predicted = problem._predict(counts)
    band = problem._band(counts) if predicted else {}
    return Plan(
        groups, graph.inputs, graph.model_type, problem.criterion, problem.round_to,
        model_name=problem.model_name, fingerprint=graph.fingerprint, allocation=allocation,
        totals=Totals(p0, int(params[0]), f0, int(flops[0])), predicted=predicted,
        band={m: (b.low, b.high) for m, b in band.items()}, predicted_by=problem.predicted_by if predicted else None,
    )  # fmt: skip


# -- the methods ----------------------------------------------------------------------------------
@register_method("uniform", needs_curves=False)
def _uniform(search: _Search) -> np.ndarray:
    """One sparsity for every free group: the smallest that meets the budget."""
    sizes, r = search.problem.cost.sizes, search.problem.round_to

    def kept_at(s: float) -> np.ndarray:
        kept = search.hi.copy()
        for g in search.free:
            kept[g] = min(max(kept_units(int(sizes[g]), s, r), search.lo[g]), search.hi[g])
        return kept

    low, high = 0.0, 0.999999
    for _ in range(50):  # kept_units is monotone in s: bisect for the smallest s that meets the budget
        mid = (low + high) / 2
        low, high = (low, mid) if search.cost(kept_at(mid)) <= search.target else (mid, high)
    return kept_at(high)


@register_method("threshold")
def _threshold(search: _Search) -> np.ndarray:
    """Each group takes its largest sparsity with damage under one tolerance; the least tolerance that fits."""

    def kept_at(tolerance: float) -> np.ndarray:
        kept = search.hi.copy()
        for g in search.free:
            over = np.flatnonzero(search.harm[g] > tolerance)
            last = (over[0] - 1) if over.size else len(search.options[g]) - 1  # the prefix under tolerance
            kept[g] = search.options[g][max(last, 0)]
        return kept

    candidates = np.unique(np.concatenate([search.harm[g] for g in search.free]))
    low, high = 0, len(candidates) - 1  # the largest candidate prunes every group to its lowest option
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if search.cost(kept_at(candidates[mid])) <= search.target else (mid + 1, high)
    return kept_at(candidates[high])


@register_method("greedy")
def _greedy(search: _Search) -> np.ndarray:
    """Repeatedly take the move with the least predicted damage per unit of cost saved."""
    start = search.hi.copy()
    return _greedy_from(search, start, {g: 0 for g in search.free})


def _greedy_from(search: _Search, kept: np.ndarray, at: dict[int, int]) -> np.ndarray:
    """Greedy descent from `kept` (group g at option index `at[g]`) until the budget is met.

    A group's possible moves are to any of its sparser options, so a curve with a bump (damage
    that falls again at higher sparsity) is not a wall. Only the moved group and the groups
    coupled to it (sharing a weight) need their moves re-priced after a step. The last step takes
    the least harmful move that reaches the budget, so the plan does not overshoot it needlessly.
    """
    coupled = search.coupled()
    kept = kept.copy()
    current = search.cost(kept)
    moves: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # g -> (option idx, harm, saving)

    def price(g: int) -> None:
        idx = np.arange(at[g] + 1, len(search.options[g]))
        if idx.size == 0:
            moves.pop(g, None)
            return
        after = search.costs(search.with_group(kept, g, search.options[g][idx]))
        moves[g] = (idx, search.harm[g][idx] - search.harm[g][at[g]], current - after)

    for g in search.free:
        price(g)
    while current > search.target:
        needed = current - search.target
        best: tuple[float, int, int, bool] | None = None  # (ratio, group, option, reaches the budget)
        finish: tuple[float, int, int] | None = None  # the least harmful move that reaches the budget
        for g, (idx, harm, saving) in moves.items():
            useful = saving > 0
            if not useful.any():
                continue
            ratio = np.where(useful, harm / np.where(useful, saving, 1.0), np.inf)
            j = int(np.argmin(ratio))
            if best is None or ratio[j] < best[0]:
                best = (float(ratio[j]), g, int(idx[j]), bool(saving[j] >= needed))
            done = saving >= needed
            if done.any():
                k = int(np.argmin(np.where(done, harm, np.inf)))
                if finish is None or harm[k] < finish[0]:
                    finish = (float(harm[k]), g, int(idx[k]))
        if best is None:
            raise AllocationError("greedy allocation ran out of moves before meeting the budget")
        # the best-ratio move normally; once it would reach the budget, the cheapest move that does
        _, g, j = finish if best[3] and finish is not None else best[:3]
        at[g] = j
        kept[g] = search.options[g][j]
        current = search.cost(kept)
        for h in ({g} | coupled[g]) & set(at):
            price(h)
    return kept


@register_method("dp")
def _dp(search: _Search, bins: int = 2000, rounds: int = 6) -> np.ndarray:
    """The least total damage within the budget: a multiple-choice knapsack solved by DP.

    The knapsack is exact when the cost is a sum over groups. Here it is not (a conv between two
    pruned groups costs their product), so each round linearises the cost around the current
    solution, exactly along each group, and solves the knapsack there. Rounds start from the dense
    model and from the greedy solution; the least harmful candidate that really meets the budget
    wins, so `dp` is never worse than `greedy`.
    """
    greedy = _greedy(search)
    best = (_harm(search, greedy), greedy)
    for start in (search.hi.copy(), greedy):
        kept, seen = start, set()
        for _ in range(rounds):
            choice = _knapsack(search, kept, bins)
            kept = search.hi.copy()
            for g, j in choice.items():
                kept[g] = search.options[g][j]
            harm = _harm(search, kept)
            if search.cost(kept) <= search.target and harm < best[0]:
                best = (harm, kept.copy())
            if kept.tobytes() in seen:
                break
            seen.add(kept.tobytes())
    return best[1]


def _harm(search: _Search, kept: np.ndarray) -> float:
    """Total predicted damage of a kept vector (all free groups are at one of their options)."""
    return sum(float(search.harm[g][np.flatnonzero(search.options[g] == kept[g])[0]]) for g in search.free)


def _knapsack(search: _Search, around: np.ndarray, bins: int) -> dict[int, int]:
    """Option index per free group minimising total harm with the cost linearised at `around`."""
    base = search.cost(around)
    deltas = {g: search.costs(search.with_group(around, g, search.options[g])) - base for g in search.free}
    floor = {g: float(d.min()) for g, d in deltas.items()}
    capacity = search.target - base - sum(floor.values())
    if capacity <= 0:  # even the sparsest options look over budget from here: take them
        return {g: len(search.options[g]) - 1 for g in search.free}
    unit = capacity / bins
    best = np.zeros(bins + 1)  # best[c]: least harm of the groups so far within weight c
    picks = []
    for g in search.free:
        weight = np.ceil((deltas[g] - floor[g]) / unit - 1e-9).astype(np.int64)  # rounded up: never optimistic
        # ties in harm go to the less sparse option (listed first), so flat curves are not cut for nothing
        new = np.full(bins + 1, np.inf)
        pick = np.zeros(bins + 1, dtype=np.int64)
        for j, (w, h) in enumerate(zip(weight, search.harm[g])):
            if w > bins:
                continue
            candidate = np.full(bins + 1, np.inf)
            candidate[w:] = best[: bins + 1 - w] + h
            better = candidate < new
            new[better], pick[better] = candidate[better], j
        best = new
        picks.append(pick)
    choice, c = {}, bins
    for g, pick in zip(reversed(search.free), reversed(picks)):
        j = int(pick[c])
        choice[g] = j
        c -= int(np.ceil((deltas[g][j] - floor[g]) / unit - 1e-9))
    return choice


@register_method("global", needs_curves=False)
def _global(search: _Search) -> np.ndarray:
    """One ranking of all units by the criterion (scores divided by their group's mean); cut to fit."""
    cm, r = search.problem.cost, search.problem.round_to
    normalised = {}
    for g in search.free:
        pooled = []  # a tie ranks the units of all its groups together
        for t in search.tied.get(g, [g]):
            s = search.problem.scores[cm.groups[t]].double()
            mean = float(s.mean())
            pooled.append((s / mean if mean > 0 else torch.ones_like(s)).numpy())
        normalised[g] = np.sort(np.concatenate(pooled))  # ascending

    def kept_at(threshold: float) -> np.ndarray:
        kept = search.hi.copy()
        for g, s in normalised.items():
            size = int(cm.sizes[g])
            above = len(s) - int(np.searchsorted(s, threshold, side="right"))  # scores above threshold
            survivors = round(above * size / len(s))  # per group of a tie
            k = kept_units(size, 1.0 - max(survivors, 1) / size, r)
            kept[g] = min(max(k, search.lo[g]), search.hi[g])
        return kept

    candidates = np.unique(np.concatenate([[-np.inf], *normalised.values()]))
    low, high = 0, len(candidates) - 1
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if search.cost(kept_at(candidates[mid])) <= search.target else (mid + 1, high)
    return kept_at(candidates[high])
