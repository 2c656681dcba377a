"""`measure_plan`: what a plan really gives, measured the one way the CLI, the dashboard and the benches share.

A plan's prediction comes from curves; its truth comes from applying it: physically remove the
channels, re-estimate BatchNorm on calibration images, evaluate the pruned and the dense model on
the same data, count the pruned model's size, and time both models in alternating rounds. Doing
that in one function keeps every report comparable (the same BatchNorm batches, the same
reference for label-free metrics, the same latency routine), and its result is plain values, so a
background job can write it and any session can read it back:

    >>> m = measure_plan(model, plan, load_data("sample"), bn_recalibration=50)
    >>> m.metrics["accuracy"], m.dense["accuracy"], m.flops / m.dense_flops, m.speedup_text()
    (0.962, 0.985, 0.4994, '1.84x faster (median of 7 rounds, ±6 %, 2 threads, batch 1)')
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from prunecore import cost
from prunecore.cost import Latency, count, format_speedup, speedup
from prunecore.datasets import EvalData
from prunecore.errors import UserError
from prunecore.evaluate import evaluate, get_metric, metrics_for, recalibrate_bn_, split_batch
from prunecore.graph import ChannelGraph, trace
from prunecore.plan import MeasuredOn, Plan
from prunecore.prune import apply_plan

__all__ = ["MeasureError", "PlanMeasurement", "default_metrics", "measure_plan"]

FORMAT = "prunecore.measurement/1"
STEPS = ("apply", "bn", "evaluate", "latency")
"""What `measure_plan` reports to `progress`, in order ("latency" only when it times the models)."""


class MeasureError(UserError, ValueError):
    """A measurement cannot be read back: another format, or missing fields."""


@dataclass(frozen=True)
class PlanMeasurement:
    """A plan measured: the pruned and dense metrics on one data set, the sizes, and (optionally) latency.

    `data` says what the metrics were measured on (`EvalData.description`), `bn_recalibration`
    how many calibration batches re-estimated BatchNorm. `latency` is (dense, pruned), timed in
    alternating rounds, or None when not timed.
    """

    metrics: Mapping[str, float]
    dense: Mapping[str, float]
    params: int
    flops: int
    dense_params: int
    dense_flops: int
    data: str = ""
    bn_recalibration: int = 0
    latency: tuple[Latency, Latency] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # e.g. the job's plan key, for callers' caches

    def speedup(self) -> float | None:
        """Dense over pruned median latency, or None when untimed or too noisy (`cost.speedup`)."""
        return None if self.latency is None else speedup(*self.latency)

    def speedup_text(self) -> str:
        """`cost.format_speedup` of the two timings: a ratio with its noise, or why there is none."""
        return "not timed" if self.latency is None else format_speedup(*self.latency)

    def record(self, plan: Plan) -> Plan:
        """`plan` carrying these measured metrics and what they were measured on (what its file then says)."""
        return dataclasses.replace(plan, measured=dict(self.metrics),
                                   measured_on=MeasuredOn(self.data, self.bn_recalibration))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe plain values, tagged with `FORMAT`."""
        out = dataclasses.asdict(self)
        out["latency"] = None if self.latency is None else [dataclasses.asdict(t) for t in self.latency]
        return {"format": FORMAT, **out}

    @classmethod
    def from_dict(cls, data: Any) -> PlanMeasurement:
        """Inverse of `to_dict`; `MeasureError` for anything else."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise MeasureError(f"not a plan measurement of format {FORMAT!r}")
        try:
            fields = {k: v for k, v in data.items() if k != "format"}
            timed = fields.pop("latency")
            latency = None if timed is None else (Latency(**timed[0]), Latency(**timed[1]))
            return cls(**fields, latency=latency)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise MeasureError(f"malformed plan measurement: {type(exc).__name__}: {exc}") from None


def default_metrics(plan: Plan | None, data: EvalData) -> list[str]:
    """What to measure when nobody says: the metrics the plan predicted, else what the data supports."""
    if plan is not None and plan.predicted:
        names = list(plan.predicted)
        if data.labelled or not any(get_metric(m).needs_labels for m in names):
            return names
    if not data.labelled:
        return ["kl", "agreement"]
    return metrics_for(split_batch(next(iter(data.evaluation)))[1])


def measure_plan(
    model: nn.Module,
    plan: Plan,
    data: EvalData,
    metrics: str | Sequence[str] | None = None,
    bn_recalibration: int = 0,
    graph: ChannelGraph | None = None,
    latency: bool = True,
    progress: Callable[[str], None] | None = None,
    pruned: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> PlanMeasurement:
    """Apply `plan` to `model` (not changed), re-estimate BatchNorm, and measure both models.

    `pruned`, when given, is measured instead of `apply_plan(model, plan)` (a copy of it: a pruned
    model loaded from a file, fine-tuned after the plan was applied); it must have the plan's shape.
    Metrics (default: `default_metrics`) are measured on `data.evaluation`, BatchNorm re-estimated
    on up to `bn_recalibration` batches of `data.calibration`; label-free metrics compare with the
    dense model. With `latency`, both models are timed with `compare_latency` on the plan's example
    inputs. `progress(step)` is called before each of `STEPS`, so a job can report and stop there.
    `device` is where the metrics are measured (default: where the model is; the models never move);
    latency is always timed on the CPU, where `compare_latency` runs.
    """
    step = progress or (lambda _: None)
    names = [metrics] if isinstance(metrics, str) else list(metrics or default_metrics(plan, data))
    needless = [m for m in names if get_metric(m).needs_labels and not data.labelled]
    if needless:
        raise MeasureError(f"metric(s) {', '.join(needless)} need labels, and {data.description or 'the data'} "
                           "has none: measure kl or agreement")  # fmt: skip
    example = tuple(spec.example() for spec in plan.inputs)
    step("apply")
    graph = graph if graph is not None else trace(model, example)
    plan.check(graph)
    pruned = apply_plan(model, plan, graph=graph) if pruned is None else copy.deepcopy(pruned)
    if bn_recalibration:
        step("bn")
        recalibrate_bn_(pruned, data.calibration, batches=int(bn_recalibration), device=device)
    step("evaluate")
    reference = model if any(get_metric(m).needs_reference for m in names) else None
    measured = evaluate(pruned, data.evaluation, names, reference=reference, device=device)
    dense = evaluate(model, data.evaluation, names, reference=reference, device=device)
    before, after = count(model, example), count(pruned, example)
    timed = None
    if latency:
        step("latency")
        timed = cost.compare_latency(model, pruned, example)  # looked up here: tests replace it
    return PlanMeasurement(measured, dense, after.params, after.flops, before.params, before.flops,
                           data.description, int(bn_recalibration), timed)  # fmt: skip
