"""`refine`: improve an allocated plan by measuring neighbouring plans on data, within the same budget.

Every allocation method optimises a prediction, and predictions are least trustworthy exactly where
users cut deep (`bench/bench_truth.py`: random plans at 30-90 % of the FLOPs are predicted 3-5
accuracy points off on the samples). `refine` stops trusting the prediction for the last step: it
moves a slice of the budget from one group to another, measures the resulting plan on data
(BatchNorm re-estimated, as the sweep measured its points), and keeps the move when the measured
objective improves. It is a first-improvement local search with a fixed budget of measurements,
so it costs `steps` plan evaluations (about 0.5 s each for the sample ResNet-20 on 500 images).

A move raises one group's (or tie's) sparsity by `step` and lowers another's by as much as the
budget then allows, up to `step`, so every candidate meets the budget (a group too small for
`step` to change its count, such as 4 heads, moves by one unit, or by one `round_to` multiple).
Moves are drawn at random (seeded), so a refinement is reproducible; groups without a curve,
`frozen` groups and ties whose members are not all free stay as they are. The search selects on
the data it measures: measure the result on other data to see what it is worth there.

    >>> plan = pc.solve(problem, pc.Budget(flops=0.4), "dp")
    >>> refined = refine(model, problem, plan, data.calibration, steps=60)
    >>> refined.metrics["loss"] < refined.start["loss"]   # or no move helped, and it is the start
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from prunecore.allocate import AllocationError, AllocationProblem
from prunecore.evaluate import get_metric
from prunecore.plan import Allocation, Budget, Plan

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunecore.graph import ChannelGraph

__all__ = ["FORMAT", "Refined", "Trial", "refine"]

FORMAT = "prunecore.refined/1"

_PROPOSALS_PER_STEP = 50  # draws allowed per measurement before giving up: most draws are cheap no-ops
_BISECTIONS = 14  # halvings of the amount given back: finer than one unit of any group of up to ~16k units


@dataclass(frozen=True)
class Trial:
    """One measured candidate: its sparsities, what it measured, and whether the search moved to it."""

    sparsities: Mapping[str, float]
    metrics: Mapping[str, float]
    accepted: bool


@dataclass(frozen=True)
class Refined:
    """A refinement: the best measured plan, the start's and its metrics on the data, every trial in order."""

    plan: Plan
    objective: str
    start: Mapping[str, float]
    metrics: Mapping[str, float]
    trials: tuple[Trial, ...]

    @property
    def moves(self) -> int:
        """How many trials the search moved to (0: no measured neighbour beat the start)."""
        return sum(t.accepted for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict tagged with `FORMAT`: what a refinement job writes as its result."""
        return {
            "format": FORMAT, "plan": self.plan.to_dict(), "objective": self.objective, "start": dict(self.start),
            "metrics": dict(self.metrics),
            "trials": [{"sparsities": dict(t.sparsities), "metrics": dict(t.metrics), "accepted": t.accepted}
                       for t in self.trials],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any) -> Refined:
        """Inverse of `to_dict`; anything else raises `AllocationError` naming what is wrong."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise AllocationError(f"not a refinement of format {FORMAT!r}")
        try:
            trials = tuple(Trial(_floats(t["sparsities"]), _floats(t["metrics"]), bool(t["accepted"]))
                           for t in data["trials"])  # fmt: skip
            return cls(Plan.from_dict(data["plan"]), str(data["objective"]), _floats(data["start"]),
                       _floats(data["metrics"]), trials)  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AllocationError(f"malformed refinement: {type(exc).__name__}: {exc}") from exc


def _floats(values: Any) -> dict[str, float]:
    return {str(k): float(v) for k, v in values.items()}


def refine(
    model: nn.Module,
    problem: AllocationProblem,
    plan: Plan,
    data: Iterable[Any],
    budget: Budget | None = None,
    steps: int = 60,
    step: float = 0.1,
    objective: str | None = None,
    frozen: Sequence[str] = (),
    max_sparsity: float = 0.9,
    seed: int = 0,
    bn_recalibration: bool | int = True,
    bn_data: Iterable[Any] | None = None,
    graph: ChannelGraph | None = None,
    device: str | torch.device | None = None,
    autocast: str | None = None,
    channels_last: bool = False,
    measure: Callable[[Mapping[str, float]], Mapping[str, float]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Refined:
    """Refine `plan` (from `solve` on `problem`) by at most `steps` measured moves; the best plan and its record.

    `budget` defaults to the plan's own (`plan.allocation.budget`). `objective` is the metric the
    search improves: default the loss where the curves have one (smoother than accuracy, so fewer
    moves are kept by luck), else the problem's metric. Plans are measured with
    `prunecore.evaluate_plan` on `data` (BatchNorm re-estimated as `bn_recalibration` says on
    `bn_data`, default `data`; `device`, `autocast` and `channels_last` as there), or with
    `measure` (sparsities -> metrics) where given. A plan measured once is not measured again.
    `progress(done, steps + 1)` is called after each measurement (the start's is the first).
    """
    budget = _budget_of(plan, budget)
    if not problem.curves:
        raise AllocationError("refine moves the budget between swept groups: the problem has no sensitivity curves")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise AllocationError(f"steps must be a whole number >= 0, got {steps!r}")
    if not 0.0 < step <= 0.5:
        raise AllocationError(f"step must be in (0, 0.5] (a fraction of a group's units), got {step!r}")
    if not 0.0 < max_sparsity < 1.0:
        raise AllocationError(f"max_sparsity must be in (0, 1), got {max_sparsity!r}")
    objective = objective or ("loss" if "loss" in problem.dense else problem.metric)
    sign = -1.0 if get_metric(objective).higher_is_better else 1.0  # the search minimises sign * value
    unknown = sorted(set(frozen) - set(problem.cost.groups))
    if unknown:
        raise AllocationError(f"frozen names no prunable group: {', '.join(map(repr, unknown[:5]))}")
    current = {n: float(s) for n, s in plan.sparsities.items()}
    if problem.over_budget(current, budget):
        raise AllocationError(f"the plan to refine does not meet the budget {budget}; refine keeps it, so it must")
    if measure is None:
        measure = _evaluator(model, problem, data, objective, bn_recalibration, bn_data, graph, device, autocast,
                             channels_last)  # fmt: skip
    units = _units(problem, frozen)
    measured: dict[tuple[tuple[str, int], ...], Mapping[str, float]] = {}

    def metrics_of(sparsities: Mapping[str, float], key: tuple[tuple[str, int], ...]) -> Mapping[str, float]:
        values = dict(measure(sparsities))
        if objective not in values or not math.isfinite(float(values[objective])):
            raise AllocationError(f"measuring a plan gave no finite {objective!r}: {values}")
        measured[key] = values
        if progress is not None:
            progress(len(measured), steps + 1)
        return values

    start = metrics_of(current, _key(problem, current))
    best = start
    trials: list[Trial] = []
    rng = np.random.default_rng(seed)
    for _ in range(_PROPOSALS_PER_STEP * steps):
        if len(measured) - 1 >= steps or len(units) < 2:
            break
        candidate = _move(problem, budget, current, units, step, max_sparsity, rng)
        key = None if candidate is None else _key(problem, candidate)
        if key is None or key in measured:
            continue
        values = metrics_of(candidate, key)
        accepted = sign * float(values[objective]) < sign * float(best[objective])
        trials.append(Trial(candidate, values, accepted))
        if accepted:
            current, best = candidate, values
    method = plan.allocation.method if plan.allocation is not None else "plan"
    refined = problem.plan(current, Allocation(f"{method}+refine", budget, problem.metric))
    return Refined(refined, objective, dict(start), dict(best), tuple(trials))


def _budget_of(plan: Plan, budget: Budget | None) -> Budget:
    if budget is not None:
        return budget
    if plan.allocation is None:
        raise AllocationError("this plan records no budget (it was not allocated): give refine a budget")
    return plan.allocation.budget


def _units(problem: AllocationProblem, frozen: Sequence[str]) -> list[tuple[str, ...]]:
    """What a move shifts: each tie whole, each other swept group alone; frozen and unswept groups never."""
    free = set(problem.curves) - set(frozen)
    tied = {n for tie in problem.ties for n in tie}
    units = [tuple(tie) for tie in problem.ties if set(tie) <= free]
    return units + [(n,) for n in problem.curves if n in free and n not in tied]


def _key(problem: AllocationProblem, sparsities: Mapping[str, float]) -> tuple[tuple[str, int], ...]:
    """A plan's identity: its kept unit counts (two sparsities that round alike are one plan)."""
    return tuple(sorted((n, k) for n, k in problem.kept(sparsities).items() if k < problem.graph[n].size))


def _move(
    problem: AllocationProblem, budget: Budget, current: Mapping[str, float], units: Sequence[tuple[str, ...]],
    step: float, max_sparsity: float, rng: np.random.Generator,
) -> dict[str, float] | None:
    """`current` with a random unit pruned `step` deeper and another given back what the budget allows; None if
    the draw changes nothing (the first is at the bound, the second is dense or nothing can be given back)."""
    first, second = (units[i] for i in rng.choice(len(units), size=2, replace=False))
    deeper = current.get(first[0], 0.0) + _stride(problem, first, step)
    given = current.get(second[0], 0.0)
    if deeper > max_sparsity + 1e-9 or given <= 0.0:
        return None
    moved = dict(current) | {n: deeper for n in first}
    low, high = 0.0, min(_stride(problem, second, step), given)  # how much to give back: the most that fits
    for _ in range(_BISECTIONS):
        mid = (low + high) / 2
        if problem.over_budget(moved | {n: given - mid for n in second}, budget):
            high = mid
        else:
            low = mid
    candidate = moved | {n: max(given - low, 0.0) for n in second}
    if problem.kept(candidate)[second[0]] == problem.kept(current)[second[0]]:
        return None  # nothing given back: only a deeper cut, which cannot be better
    return candidate


def _stride(problem: AllocationProblem, unit: tuple[str, ...], step: float) -> float:
    """`step`, or one rounding step of the unit's smallest group where that is more: a move on 4 heads or on
    channels kept in multiples of 8 must change a count, or every draw on it would be a no-op."""
    return max(step, problem.round_to / min(problem.graph[n].size for n in unit))


def _evaluator(
    model: nn.Module, problem: AllocationProblem, data: Iterable[Any], objective: str, bn_recalibration: bool | int,
    bn_data: Iterable[Any] | None, graph: ChannelGraph | None, device: str | torch.device | None,
    autocast: str | None, channels_last: bool,
) -> Callable[[Mapping[str, float]], Mapping[str, float]]:
    """sparsities -> metrics measured as the sweep measured its points (`evaluate_plan`)."""
    from prunecore.evaluate import evaluate_plan

    metrics = list(dict.fromkeys([objective, *problem.dense]))

    def measure(sparsities: Mapping[str, float]) -> Mapping[str, float]:
        return evaluate_plan(model, problem.plan(dict(sparsities)), data, metrics, bn_recalibration=bn_recalibration,
                             calibration=data if bn_data is None else bn_data, graph=graph, device=device,
                             autocast=autocast, channels_last=channels_last)  # fmt: skip

    return measure
