"""`Plan`: which units of which groups a pruned model keeps, as a closed, versioned JSON format.

A plan is keyed by group names (stable strings from `trace`) and unit indices, never by module
objects, so it serialises, survives a reload and can be re-applied to a fresh copy of the model.
Beside the kept units it records where it came from (the model's channel-structure fingerprint,
the criterion, the budget and allocation method) and what it is expected to do (params and FLOPs
before and after, the predicted metrics with their band and how they were predicted, and the
measured ones with the data they were measured on, once `measure_plan` has run). The
format is closed: `Plan.from_json` rejects unknown fields, duplicate keys, numbers JSON cannot hold
and counts prunecore would not have written, and `plan.schema.json` in this package is its JSON Schema.
A metric that could not be computed (NaN: a sweep of a diverged model) is written as `null`.

Example:
    >>> plan = make_plan(model, graph, 0.5)
    >>> text = plan.to_json()
    >>> Plan.from_json(text) == plan
    True
"""

from __future__ import annotations

import json
import math
import numbers
import dataclasses
import functools
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata, resources
from typing import Any, Mapping

from prunecore.errors import ArgumentError, UserError
from prunecore.graph import ChannelGraph, InputSpec

__all__ = [
    "SCHEMA", "Allocation", "Budget", "GroupPlan", "MeasuredOn", "Plan", "PlanError", "PredictedBy", "Totals",
    "compose", "json_schema", "kept_units",
]  # fmt: skip

SCHEMA = "prunecore.plan/2"
"""What `Plan.to_json` writes. Version 2 added the prediction's band and method and the measurement's data."""
READABLE = ("prunecore.plan/1", SCHEMA)
"""What `Plan.from_json` reads: a version-1 plan loads with no band and no provenance of its metrics."""


class PlanError(UserError, ValueError):
    """A plan that is malformed or does not fit the model; the message says which part."""


def kept_units(size: int, sparsity: float, round_to: int = 1) -> int:
    """How many of `size` units survive `sparsity`: the one rounding rule of prunecore.

    The kept count is rounded half-up to a multiple of `round_to`, never below one multiple (a
    group is never emptied) and never above `size`.

    >>> kept_units(64, 0.3), kept_units(64, 0.3, round_to=8), kept_units(10, 0.95)
    (45, 48, 1)
    """
    if not 0.0 <= sparsity < 1.0:
        raise ArgumentError(f"sparsity must be in [0, 1), got {sparsity}")
    if round_to < 1:
        raise ArgumentError(f"round_to must be a positive integer, got {round_to}")
    if sparsity == 0.0:
        return size
    exact = size * (1.0 - sparsity) / round_to
    kept = math.floor(exact + 0.5) * round_to
    return max(min(kept, size), min(round_to, size))


def _written_sparsity(kept: int, size: int) -> float:
    """The sparsity a plan file records for `kept` of `size` units: `1 - kept/size` to 6 decimals.

    Capped at 0.999999, so a huge group keeping one unit stays below 1; `Plan.from_json` requires
    exactly this value.

    >>> _written_sparsity(2, 3), _written_sparsity(1, 3_000_000)
    (0.333333, 0.999999)
    """
    return min(round(1.0 - kept / size, 6), 0.999999)


def _rounding_problem(kept: int, size: int, round_to: int) -> str | None:
    """Why `kept` of `size` units cannot come from `kept_units(size, s, round_to)`; None when it can.

    `kept_units` gives a multiple of `round_to`, or the whole group (never emptied, never above size).
    """
    if kept == size or kept % round_to == 0:
        return None
    return (f"keeps {kept} of {size} units, which is not a multiple of round_to ({round_to}); "
            "prunecore keeps a multiple of round_to or the whole group")  # fmt: skip


_UNKNOWN = float("nan")  # the one NaN a plan holds for a metric it cannot know (see `_known`)


def _known(value: Any) -> Any:
    """`value`, or `_UNKNOWN` for NaN and infinities, which a plan file writes as null.

    Sharing one NaN object lets plans holding it compare equal (NaN != NaN, but dict and tuple
    equality accept the identical object), so a plan with unknown metrics round-trips exactly.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
        return _UNKNOWN
    return value


@dataclass(frozen=True)
class Budget:
    """What a pruned model may keep: FLOPs or params, as a fraction in (0, 1] or an absolute amount, or
    its latency in milliseconds (always absolute, as a `prunecore.latency.LatencyModel` predicts it).

    >>> Budget(flops=0.5).target(2_000_000)      # keep half the MACs
    1000000.0
    >>> Budget(params=150_000).target(272_474)   # an absolute parameter count
    150000.0
    >>> Budget(latency=0.8).target(1.5)          # at most 0.8 ms per forward pass
    0.8
    """

    flops: float | None = None
    params: float | None = None
    latency: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.flops, self.params, self.latency) if v is not None]
        if len(given) != 1:
            raise ArgumentError("a budget names exactly one of flops=, params= or latency= (milliseconds)")
        value = given[0]
        if not _is_number(value) or value <= 0 or not math.isfinite(value):
            raise ArgumentError(f"budget {self.kind} must be a positive number, got {value!r}")

    @property
    def kind(self) -> str:
        return "flops" if self.flops is not None else "params" if self.params is not None else "latency"

    @property
    def value(self) -> float:
        return float(next(v for v in (self.flops, self.params, self.latency) if v is not None))

    @property
    def is_fraction(self) -> bool:
        return self.kind != "latency" and self.value <= 1.0

    def target(self, dense: float) -> float:
        """The most FLOPs, params or milliseconds a plan may keep, given the dense model's."""
        return self.value * dense if self.is_fraction else self.value

    def __str__(self) -> str:
        return f"latency={self.value:g} ms" if self.kind == "latency" else f"{self.kind}={self.value:g}"

    @classmethod
    def parse(cls, text: str) -> Budget:
        """`"flops=0.5"`, `"params=0.3"`, `"flops=2.5e7"` or `"latency=12.5"` / `"latency=12.5ms"` (the CLI's
        --budget)."""
        kind, sep, value = text.partition("=")
        kind = kind.strip()
        if not sep or kind not in BUDGET_KINDS:
            raise ArgumentError(f"budget must look like flops=0.5, params=0.3 or latency=12.5 (ms), got {text!r}")
        value = value.strip()
        if kind == "latency" and value.endswith("ms"):
            value = value[:-2]
        try:
            number = float(value)
        except ValueError:
            raise ArgumentError(f"budget value must be a number, got {value!r}") from None
        return cls(**{kind: number})


BUDGET_KINDS = ("flops", "params", "latency")


@dataclass(frozen=True)
class Allocation:
    """How a plan's sparsities were chosen: the method, the budget it met, the metric it protected."""

    method: str
    budget: Budget
    metric: str = ""


@dataclass(frozen=True)
class Totals:
    """Params and FLOPs (MACs per example) of the dense and of the pruned model."""

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


@dataclass(frozen=True)
class PredictedBy:
    """How a plan's `predicted` metrics were computed.

    `method` is "additive" (each group's curve change added up: optimistic where plans cut deep) or
    "calibrated" (`prunecore.predict`, fitted on `plans` measured plans, which gives a band).
    """

    method: str
    plans: int = 0

    def __post_init__(self) -> None:
        if self.method not in PREDICTION_METHODS:
            raise PlanError(f"predicted_by.method must be one of {', '.join(PREDICTION_METHODS)}, got {self.method!r}")


PREDICTION_METHODS = ("additive", "calibrated")


@dataclass(frozen=True)
class MeasuredOn:
    """What a plan's `measured` metrics were measured on: the data (its description) and the BatchNorm batches."""

    data: str
    bn_recalibration: int = 0


@dataclass(frozen=True)
class GroupPlan:
    """Kept unit indices (sorted) of one group of `size` units.

    `channels` is the group's width in channels (a unit is several channels where a grouped conv
    forces whole conv groups out); `predicted_change` is the metric change the sensitivity curve
    predicts for this group alone, when the plan came from `allocate` (None: no prediction, also
    what a NaN or infinite change becomes).
    """

    size: int
    keep: tuple[int, ...]
    channels: int | None = None
    predicted_change: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", tuple(sorted(self.keep)))
        if self.channels is None:
            object.__setattr__(self, "channels", self.size)  # one channel per unit
        if _known(self.predicted_change) is _UNKNOWN:
            object.__setattr__(self, "predicted_change", None)

    @property
    def sparsity(self) -> float:
        return 1.0 - len(self.keep) / self.size

    @property
    def removed(self) -> tuple[int, ...]:
        kept = set(self.keep)
        return tuple(i for i in range(self.size) if i not in kept)

    @property
    def channels_before(self) -> int:
        return self.channels  # type: ignore[return-value]  # never None after __post_init__

    @property
    def channels_after(self) -> int:
        return self.channels_before // self.size * len(self.keep)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the plan file (`plan.schema.json`, shipped in the package)."""
    return json.loads((resources.files("prunecore") / "plan.schema.json").read_text(encoding="utf-8"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@functools.cache
def _version() -> str:
    """The installed prunecore version; cached, as every Plan asks and a metadata lookup reads files (~2 ms)."""
    try:
        return metadata.version("prunecore")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Plan:
    """Per-group kept units, what is needed to re-trace the model they belong to, and provenance.

    `fingerprint` is `ChannelGraph.fingerprint` of the model the plan was made for (empty: not
    recorded); `predicted` and `measured` map metric names to values of the pruned model (NaN when
    unknown: curves that were all NaN; infinities become NaN too, as the file has only null for them).
    `band` maps a predicted metric to (low, high), where about 90 % of plans measure (only a
    calibrated prediction has one); `predicted_by` and `measured_on` say where the numbers came from
    (None: not recorded, as in every version-1 plan).
    """

    groups: Mapping[str, GroupPlan]
    inputs: tuple[InputSpec, ...]
    model_type: str
    criterion: str = "l1"
    round_to: int = 1
    meta: Mapping[str, Any] = field(default_factory=dict)
    model_name: str = ""
    fingerprint: str = ""
    allocation: Allocation | None = None
    totals: Totals | None = None
    predicted: Mapping[str, float] = field(default_factory=dict)
    measured: Mapping[str, float] = field(default_factory=dict)
    band: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    predicted_by: PredictedBy | None = None
    measured_on: MeasuredOn | None = None
    version: str = field(default_factory=_version)
    created: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        for name in ("predicted", "measured"):
            values = getattr(self, name)
            if any(_known(v) is _UNKNOWN and v is not _UNKNOWN for v in values.values()):
                object.__setattr__(self, name, {k: _known(v) for k, v in values.items()})
        if self.band:  # (low, high) tuples of floats, NaN as the one _UNKNOWN, so equal plans compare equal
            band = {k: (_known(float(lo)), _known(float(hi))) for k, (lo, hi) in self.band.items()}
            object.__setattr__(self, "band", band)

    @property
    def sparsities(self) -> dict[str, float]:
        return {name: g.sparsity for name, g in self.groups.items()}

    def to_dict(self) -> dict[str, Any]:
        alloc = self.allocation
        return {
            "schema": SCHEMA,
            "prunecore_version": self.version,
            "created": self.created,
            "model": {"name": self.model_name, "type": self.model_type, "fingerprint": self.fingerprint},
            "inputs": [{"shape": list(s.shape), "dtype": s.dtype} for s in self.inputs],
            "criterion": self.criterion,
            "round_to": self.round_to,
            "allocation": None
            if alloc is None
            else {"method": alloc.method, "budget": {alloc.budget.kind: alloc.budget.value}, "metric": alloc.metric},
            "groups": {
                name: {
                    "size": g.size,
                    "channels_before": g.channels_before,
                    "channels_after": g.channels_after,
                    "sparsity": _written_sparsity(len(g.keep), g.size),
                    "keep": list(g.keep),
                    "predicted_change": _null_if_unknown(g.predicted_change),
                }
                for name, g in self.groups.items()
            },
            "totals": None if self.totals is None else dict(vars(self.totals)),
            "metrics": {
                "predicted": {k: _null_if_unknown(v) for k, v in self.predicted.items()},
                "band": {k: {"low": _null_if_unknown(lo), "high": _null_if_unknown(hi)}
                         for k, (lo, hi) in self.band.items()},
                "predicted_by": None if self.predicted_by is None else dict(vars(self.predicted_by)),
                "measured": {k: _null_if_unknown(v) for k, v in self.measured.items()},
                "measured_on": None if self.measured_on is None else dict(vars(self.measured_on)),
            },
            "meta": dict(self.meta),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Strict JSON (no NaN, no Infinity); `PlanError` naming the field where `meta` or a count is not finite."""
        data = self.to_dict()
        try:
            return json.dumps(data, indent=indent, allow_nan=False)
        except ValueError:
            path = _find(data, lambda v: isinstance(v, float) and not math.isfinite(v))
            if path is None:
                raise  # not a number problem (a circular meta): a bug of the caller
            value = _at(data, path)
            raise PlanError(f"plan cannot be written: {_where(path)} is {value}, which JSON cannot hold") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """Parse and validate a plan file; any problem is a `PlanError` that names the field."""
        return cls.from_dict(_loads(text))

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        _expect(isinstance(data, dict), "plan must be a JSON object")
        schema = data.get("schema")
        _expect(schema in READABLE, f"plan schema must be {' or '.join(map(repr, READABLE))}, got {schema!r}")
        _no_unknown(data, set(_TOP_LEVEL), "plan")
        for key in ("model", "inputs", "groups"):
            _expect(key in data, f"plan is missing {key!r}")
        model = data["model"]
        _expect(isinstance(model, dict), "model must be an object")
        _no_unknown(model, {"name", "type", "fingerprint"}, "model")
        _expect(isinstance(model.get("type"), str), "model.type must be a string")
        for key in ("name", "fingerprint"):
            _expect(isinstance(model.get(key, ""), str), f"model.{key} must be a string")
        round_to = data.get("round_to", 1)
        _expect(_is_int(round_to) and round_to >= 1, "round_to must be a positive integer")
        _in_range(round_to, "round_to")
        criterion = data.get("criterion", "l1")
        _expect(isinstance(criterion, str), "criterion must be a string")
        version, created = data.get("prunecore_version", "unknown"), data.get("created", "")
        _expect(isinstance(version, str), "prunecore_version must be a string")
        _expect(isinstance(created, str), "created must be a string")
        meta = data.get("meta", {})
        _expect(isinstance(meta, dict), "meta must be an object")
        raw = data["groups"]
        _expect(isinstance(raw, dict), "groups must be an object keyed by group name")
        metrics = _metrics_from_dict(data.get("metrics", {}), version=READABLE.index(schema) + 1)
        groups = {name: _group_from_dict(name, g) for name, g in raw.items()}
        for name, g in groups.items():
            problem = _rounding_problem(len(g.keep), g.size, round_to)
            _expect(problem is None, f"groups[{name!r}] {problem}")
        return cls(
            groups=groups,
            inputs=_inputs_from_list(data["inputs"]),
            model_type=model["type"],
            criterion=criterion,
            round_to=round_to,
            meta=meta,
            model_name=model.get("name", ""),
            fingerprint=model.get("fingerprint", ""),
            allocation=_allocation_from_dict(data.get("allocation")),
            totals=_totals_from_dict(data.get("totals")),
            **metrics,
            version=version,
            created=created,
        )

    def check(self, graph: ChannelGraph, force: bool = False) -> None:
        """Raise `PlanError` unless this plan fits the traced model (and keeps counts `kept_units` can give).

        A recorded fingerprint that differs from the model's means the plan was made for another
        architecture; `force=True` skips that test (the per-group checks still run).
        """
        if self.model_type != graph.model_type:
            raise PlanError(f"plan is for a {self.model_type}, the model is a {graph.model_type}")
        if self.fingerprint and not force and self.fingerprint != graph.fingerprint:
            raise PlanError(
                f"plan was made for another model: its fingerprint is {self.fingerprint}, this model's is "
                f"{graph.fingerprint} (same class, different channel structure); pass force=True to try anyway"
            )
        for name, g in self.groups.items():
            if name not in graph:
                raise PlanError(f"plan names group {name!r}, which the model does not have")
            group = graph[name]
            if g.size != group.size:
                raise PlanError(f"plan gives group {name!r} {g.size} units, the model has {group.size}")
            if len(g.keep) < g.size and not group.prunable:
                raise PlanError(f"plan prunes group {name!r}, which cannot be pruned: it {group.reason}")
            problem = _rounding_problem(len(g.keep), g.size, self.round_to)
            if problem is not None:
                raise PlanError(f"plan group {name!r} {problem}")


def compose(first: Plan, second: Plan) -> Plan:
    """One plan for `first` then `second`: kept units in the original model's numbering.

    `first` prunes the original model into A; `second` was made on A (its group sizes are the
    units A kept). The composed plan keeps unit `first.keep[j]` for every `j` in `second.keep`, so
    `apply_plan(original, compose(first, second))` equals `apply_plan(apply_plan(original, first),
    second)`, architecture and weights. It carries the original's fingerprint, inputs and "before"
    totals, and `second`'s predictions, measurements and "after" totals (both describe the final
    model). `PlanError` when `second` does not fit what `first` keeps.
    """
    if (second.model_type, second.round_to) != (first.model_type, first.round_to):
        raise PlanError(f"the second plan is for a {second.model_type} with round_to {second.round_to}, the first "
                        f"for a {first.model_type} with round_to {first.round_to}: they do not compose")  # fmt: skip
    groups = dict(first.groups)
    for name, g in second.groups.items():
        before = first.groups.get(name)
        if before is None:  # the first plan left it whole: its numbering is the original's
            groups[name] = g
            continue
        if g.size != len(before.keep):
            raise PlanError(f"the second plan gives group {name!r} {g.size} units, but the first keeps "
                            f"{len(before.keep)} of its {before.size}: was it made on the model the first one "
                            "pruned?")  # fmt: skip
        per_unit = before.channels_before // before.size
        groups[name] = GroupPlan(before.size, tuple(before.keep[i] for i in g.keep), before.size * per_unit,
                                 g.predicted_change)  # fmt: skip
    totals = None
    if first.totals is not None and second.totals is not None:
        t1, t2 = first.totals, second.totals
        totals = Totals(t1.params_before, t2.params_after, t1.flops_before, t2.flops_after)
    return dataclasses.replace(
        second, groups=groups, inputs=first.inputs,
        model_name=first.model_name or second.model_name, fingerprint=first.fingerprint, totals=totals,
        allocation=None, meta={**first.meta, **second.meta, "composed": int(first.meta.get("composed", 1)) + 1},
    )  # fmt: skip


_TOP_LEVEL = (
    "schema", "prunecore_version", "created", "model", "inputs", "criterion", "round_to", "allocation",
    "groups", "totals", "metrics", "meta",
)  # fmt: skip


def _inputs_from_list(inputs: Any) -> tuple[InputSpec, ...]:
    _expect(isinstance(inputs, list) and inputs, "inputs must be a non-empty list")
    specs = []
    for i, spec in enumerate(inputs):
        _expect(isinstance(spec, dict), f"inputs[{i}] must be an object")
        _no_unknown(spec, {"shape", "dtype"}, f"inputs[{i}]")
        shape = spec.get("shape")
        _expect(
            isinstance(shape, list) and bool(shape) and all(_is_int(s) and s > 0 for s in shape),
            f"inputs[{i}].shape must be a non-empty list of positive integers",
        )
        for j, s in enumerate(shape):
            _in_range(s, f"inputs[{i}].shape[{j}]")
        dtype = spec.get("dtype", "float32")
        _expect(dtype in _DTYPES, f"inputs[{i}].dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        specs.append(InputSpec(tuple(shape), dtype))
    return tuple(specs)


_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool")


def _group_from_dict(name: str, g: Any) -> GroupPlan:
    where = f"groups[{name!r}]"
    _expect(isinstance(g, dict), f"{where} must be an object")
    _no_unknown(g, {"size", "keep", "sparsity", "channels_before", "channels_after", "predicted_change"}, where)
    size, keep = g.get("size"), g.get("keep")
    _expect(_is_int(size) and size >= 1, f"{where}.size must be a positive integer")
    _in_range(size, f"{where}.size")
    _expect(isinstance(keep, list) and all(_is_int(i) for i in keep), f"{where}.keep must be a list of integers")
    _expect(len(keep) >= 1, f"{where}.keep must keep at least one unit")
    _expect(all(0 <= i < size for i in keep), f"{where}.keep has indices outside [0, {size})")
    _expect(len(set(keep)) == len(keep), f"{where}.keep has duplicate indices")
    if "sparsity" in g:
        s = g["sparsity"]
        _expect(_is_number(s) and 0 <= s < 1, f"{where}.sparsity must be a number in [0, 1)")
        written = _written_sparsity(len(keep), size)
        _expect(s == written, f"{where}.sparsity does not match its kept units: it is {s!r}, keeping {len(keep)} of "
                              f"{size} is {written!r} (1 - kept/size, rounded to 6 decimals)")  # fmt: skip
    channels = g.get("channels_before")
    if "channels_before" in g:
        _expect(_is_int(channels) and channels >= size and channels % size == 0,
                f"{where}.channels_before must be a positive multiple of size ({size})")  # fmt: skip
        _in_range(channels, f"{where}.channels_before")
    plan = GroupPlan(size, tuple(sorted(keep)), channels, None)
    if "channels_after" in g:
        _expect(_is_int(g["channels_after"]) and g["channels_after"] == plan.channels_after,
                f"{where}.channels_after must be {plan.channels_after} for its kept units")  # fmt: skip
    change = g.get("predicted_change")
    _expect(change is None or _is_number(change), f"{where}.predicted_change must be a number or null")
    return GroupPlan(size, plan.keep, channels, None if change is None else float(change))


def _allocation_from_dict(a: Any) -> Allocation | None:
    if a is None:
        return None
    _expect(isinstance(a, dict), "allocation must be an object or null")
    _no_unknown(a, {"method", "budget", "metric"}, "allocation")
    _expect(isinstance(a.get("method"), str), "allocation.method must be a string")
    _expect(isinstance(a.get("metric", ""), str), "allocation.metric must be a string")
    budget = a.get("budget")
    shape = 'allocation.budget must be {"flops": x}, {"params": x} or {"latency": ms}'
    _expect(isinstance(budget, dict) and len(budget) == 1, shape)
    (kind, value), = budget.items()
    _expect(kind in BUDGET_KINDS, shape)
    _expect(_is_number(value) and value > 0, f"allocation.budget.{kind} must be a positive number")
    return Allocation(a["method"], Budget(**{kind: float(value)}), a.get("metric", ""))


def _totals_from_dict(t: Any) -> Totals | None:
    if t is None:
        return None
    _expect(isinstance(t, dict), "totals must be an object or null")
    fields = ("params_before", "params_after", "flops_before", "flops_after")
    _no_unknown(t, set(fields), "totals")
    for key in fields:
        _expect(_is_int(t.get(key)) and t[key] >= 0, f"totals.{key} must be a non-negative integer")
        _in_range(t[key], f"totals.{key}")
    return Totals(*(t[key] for key in fields))


def _metrics_from_dict(m: Any, version: int) -> dict[str, Any]:
    """The `Plan` fields of the metrics object; version 1 has only predicted and measured."""
    _expect(isinstance(m, dict), "metrics must be an object")
    _no_unknown(m, {"predicted", "measured"} | ({"band", "predicted_by", "measured_on"} if version >= 2 else set()),
                "metrics")  # fmt: skip
    out: dict[str, Any] = {}
    for key in ("predicted", "measured"):
        values = m.get(key, {})
        _expect(isinstance(values, dict), f"metrics.{key} must be an object of metric name: number or null")
        for name, v in values.items():
            _expect(v is None or _is_number(v), f"metrics.{key}.{name} must be a number or null (unknown)")
        out[key] = {name: _UNKNOWN if v is None else float(v) for name, v in values.items()}
    band = m.get("band", {})
    _expect(isinstance(band, dict), "metrics.band must be an object of metric name: {low, high}")
    out["band"] = {}
    for name, b in band.items():
        where = f"metrics.band.{name}"
        _expect(isinstance(b, dict) and set(b) == {"low", "high"}, f"{where} must be an object with low and high")
        _expect(all(x is None or _is_number(x) for x in b.values()), f"{where}.low and .high must be numbers or null")
        low, high = (_UNKNOWN if b[k] is None else float(b[k]) for k in ("low", "high"))
        _expect(not low > high, f"{where}.low must not be above .high")
        out["band"][name] = (low, high)
    out["predicted_by"] = _record_from_dict(m.get("predicted_by"), "predicted_by", {"method": str, "plans": int})
    out["measured_on"] = _record_from_dict(m.get("measured_on"), "measured_on", {"data": str, "bn_recalibration": int})
    return out


def _record_from_dict(r: Any, key: str, fields: Mapping[str, type]) -> Any:
    """`PredictedBy` or `MeasuredOn` from its object (None stays None); every field checked by type."""
    if r is None:
        return None
    where = f"metrics.{key}"
    _expect(isinstance(r, dict), f"{where} must be an object or null")
    _no_unknown(r, set(fields), where)
    first = next(iter(fields))
    _expect(first in r, f"{where} is missing {first!r}")
    for name, kind in fields.items():
        if name in r:
            ok = isinstance(r[name], str) if kind is str else _is_int(r[name]) and 0 <= r[name] <= _INT_MAX
            _expect(ok, f"{where}.{name} must be {'a string' if kind is str else 'a non-negative integer'}")
    if key == "predicted_by":
        _expect(r["method"] in PREDICTION_METHODS, f"{where}.method must be one of {', '.join(PREDICTION_METHODS)}")
        return PredictedBy(**r)
    return MeasuredOn(**r)


_INT_MAX = 2**63 - 1  # every count and size of a plan fits a signed 64-bit integer


def _in_range(value: int, where: str) -> None:
    _expect(value <= _INT_MAX, f"{where} is out of range: above 2**63 - 1")


def _null_if_unknown(value: Any) -> Any:
    return None if _known(value) is _UNKNOWN else value


class _Refused:
    """A value `_loads` refuses (NaN, an overflowing float, an object with a key twice), kept in place
    until parsing ends so that the error can say where it is."""

    def __init__(self, message: str) -> None:
        self.message = message


def _loads(text: str | bytes) -> Any:
    """`json.loads` that refuses what Python's parser lets through: NaN and Infinity, floats that
    overflow, and duplicate keys (where the last would silently win), naming where each one is."""
    refused: list[tuple[object, str]] = []  # (the value or object in the tree, message)

    def constant(name: str) -> _Refused:
        hint = "; write null for an unknown metric" if name == "NaN" else ""
        value = _Refused(f"is {name}, which JSON does not allow{hint}")
        refused.append((value, value.message))
        return value

    def number(literal: str) -> float | _Refused:
        value = float(literal)
        if math.isfinite(value):
            return value
        bad = _Refused(f"is {literal}, which does not fit a float")
        refused.append((bad, bad.message))
        return bad

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) < len(items):
            seen: set[str] = set()
            twice = next(k for k, _ in items if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            refused.append((obj, f"has the key {twice!r} twice"))
        return obj

    try:
        data = json.loads(text, parse_constant=constant, parse_float=number, object_pairs_hook=pairs)
    except ValueError as exc:  # bad syntax or encoding, an integer literal over 4300 digits
        raise PlanError(f"plan is not valid JSON: {exc}") from None
    except RecursionError:
        raise PlanError("plan is not valid JSON: nested too deeply") from None
    for value, message in refused:  # the first one still in the tree (a duplicate key may have dropped some)
        path = _find(data, lambda v, target=value: v is target)
        if path is not None:
            raise PlanError(f"plan is not valid JSON: {_where(path)} {message}")
    return data


def _find(tree: Any, match: Any) -> tuple | None:
    """Path (keys and indices) of the first value in `tree` that `match`es, without recursion."""
    stack: list[tuple[tuple, Any]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        if match(node):
            return path
        if isinstance(node, dict):
            stack.extend(((*path, k), v) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(node))))
    return None


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _where(path: tuple) -> str:
    """`("groups", "a.0", "keep", 3)` as `groups['a.0'].keep[3]`, the way messages name fields."""
    out = ""
    for i, key in enumerate(path):
        if isinstance(key, int):
            out += f"[{key}]"
        elif key.isidentifier() and not (i == 1 and path[0] == "groups"):
            out += f".{key}" if out else key
        else:
            out += f"[{key!r}]"
    return out or "plan"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise PlanError(message)


def _no_unknown(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise PlanError(f"{where} has unknown field(s): {', '.join(map(repr, unknown))}")
