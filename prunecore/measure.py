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

With `int8=True` the pruned model also goes the way it deploys (`deploy.deploy_onnx`: ONNX, then
INT8 in ONNX Runtime), measured on the same data and timed in the same interleaved rounds as the
other two, so the three rows of a report compare:

    >>> m = measure_plan(model, plan, data, bn_recalibration=50, int8=True)
    >>> m.int8.metrics["accuracy"], m.int8.mode, m.int8_error
    (0.958, 'static, calibrated on sample held-out digits (...)', None)
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from prunecore import cost, deploy
from prunecore.cost import Latency, count, format_speedup, speedup
from prunecore.datasets import EvalData
from prunecore.devices import on_device
from prunecore.errors import UserError
from prunecore.evaluate import evaluate, get_metric, metrics_for, recalibrate_bn_, split_batch
from prunecore.graph import ChannelGraph, trace
from prunecore.plan import MeasuredOn, Plan
from prunecore.prune import apply_plan

__all__ = ["Int8Measurement", "MeasureError", "PlanMeasurement", "default_metrics", "measure_plan"]

FORMAT = "prunecore.measurement/1"
STEPS = ("apply", "bn", "evaluate", "int8", "latency")
"""What `measure_plan` reports to `progress`, in order ("bn" only when it re-estimates BatchNorm, "int8" only
when it quantises, "latency" only when it times the models)."""


class MeasureError(UserError, ValueError):
    """A measurement cannot be read back: another format, or missing fields."""


@dataclass(frozen=True)
class Int8Measurement:
    """The pruned model exported to ONNX and quantised to INT8, measured in ONNX Runtime.

    `metrics` on the same data as the float models, `latency` from the same interleaved rounds,
    `mode` how it was quantised (`Deployment.mode`), `max_abs_diff` the float export's largest
    |ONNX Runtime - PyTorch| difference (what says the export itself is faithful).
    """

    metrics: Mapping[str, float]
    latency: Latency
    mode: str
    max_abs_diff: float

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Int8Measurement:
        """Inverse of `dataclasses.asdict`: plain values back, `latency` a `Latency` again."""
        return cls(**{**data, "latency": Latency(**data["latency"])})


@dataclass(frozen=True)
class PlanMeasurement:
    """A plan measured: the pruned and dense metrics on one data set, the sizes, and (optionally) latency.

    `data` says what the metrics were measured on (`EvalData.description`), `bn_recalibration`
    how many calibration batches re-estimated BatchNorm. `latency` is (dense, pruned), timed in
    alternating rounds, or None when not timed. `int8` is the pruned model as INT8 in ONNX Runtime
    when asked for, or None; `int8_error` why it is None although asked for (the float results stand).
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
    int8: Int8Measurement | None = None
    int8_error: str | None = None

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
        """JSON-safe plain values, tagged with `FORMAT`; `int8` and `int8_error` only when set, so a
        measurement without INT8 writes what it did before they existed."""
        out = dataclasses.asdict(self)
        out["latency"] = None if self.latency is None else [dataclasses.asdict(t) for t in self.latency]
        for name in ("int8", "int8_error"):
            if out[name] is None:
                del out[name]
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
            int8 = fields.pop("int8", None)
            return cls(**fields, latency=latency, int8=None if int8 is None else Int8Measurement.from_dict(int8))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
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
    int8: bool = False,
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

    With `int8` (it needs `latency`), the pruned model is also exported and quantised
    (`deploy.deploy_onnx`, in a temporary folder), its metrics measured in ONNX Runtime on the CPU,
    and the three models timed together (`cost.measure_latencies`). When that fails (no ONNX
    Runtime, an op without an ONNX translation), `int8_error` says why and the rest is measured.
    """
    step = progress or (lambda _: None)
    names = [metrics] if isinstance(metrics, str) else list(metrics or default_metrics(plan, data))
    if int8 and not latency:
        raise MeasureError("int8 times the INT8 model beside the float ones: it needs latency=True")
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
    onnx, failed = None, None
    if int8:
        step("int8")
        try:
            onnx, deployed, int8_metrics = _int8(pruned, example, data, names, reference)
        except Exception as exc:  # whatever the exporter or ONNX Runtime raise: the float results stand
            failed = _reason(exc)
    timed, quantised = None, None
    if latency:
        step("latency")
        if onnx is None:
            timed = cost.compare_latency(model, pruned, example)  # looked up here: tests replace it
        else:  # one call: the three share their rounds, and (dense, pruned) is the pair it timed
            dense_t, pruned_t, int8_t = cost.measure_latencies([model, pruned, onnx], example)
            timed = (dense_t, pruned_t)
            quantised = Int8Measurement(int8_metrics, int8_t, deployed.mode, deployed.max_abs_diff)
    return PlanMeasurement(measured, dense, after.params, after.flops, before.params, before.flops,
                           data.description, int(bn_recalibration), timed, int8=quantised,
                           int8_error=failed)  # fmt: skip


def _int8(
    pruned: nn.Module,
    example: tuple[torch.Tensor, ...],
    data: EvalData,
    names: Sequence[str],
    reference: nn.Module | None,
) -> tuple[nn.Module, deploy.Deployment, dict[str, float]]:
    """The pruned model as INT8 in an ONNX Runtime session, how it was made, and its metrics.

    The files live in a temporary folder: a session holds its model in memory once created.
    """
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="prunecore-int8-") as tmp:
        folder = Path(tmp)
        deployed = deploy.deploy_onnx(on_device(pruned, cpu), example, folder / "pruned.onnx",
                                      folder / "pruned.int8.onnx", data)  # looked up here: tests replace it
        module = deploy.OnnxModule(deployed.int8)
    return module, deployed, evaluate(module, data.evaluation, names, reference=reference, device=cpu)


def _reason(exc: Exception) -> str:
    """Why INT8 failed, on one line: a `DeployError`'s own message, else the exception's type and message."""
    text = " ".join(str(exc).split())[:400]
    return text if isinstance(exc, deploy.DeployError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")
