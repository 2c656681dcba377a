"""The one rounding rule, budgets, and the plan format: round trips, validation, its JSON Schema, `Plan.check`."""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from torch import nn

import toy_models as toys
from prunecore.cost import count
from prunecore.graph import InputSpec, trace
from prunecore.plan import (
    SCHEMA, Allocation, Budget, GroupPlan, MeasuredOn, Plan, PlanError, PredictedBy, Totals, kept_units,
)  # fmt: skip
from prunecore.prune import make_plan
from prunecore.samples import load_sample
from prunecore.surgery import apply_plan
from sample_models.nets import ResNet20

PLAN_SCHEMA = json.loads((resources.files("prunecore") / "plan.schema.json").read_text(encoding="utf-8"))
VALIDATOR = Draft202012Validator(PLAN_SCHEMA)
DTYPES = PLAN_SCHEMA["$defs"]["input"]["properties"]["dtype"]["enum"]
PROPERTY = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# -- the rounding rule ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, sparsity, round_to, kept",
    [
        (64, 0.0, 1, 64),
        (64, 0.3, 1, 45),  # 44.8 rounds half-up to 45
        (64, 0.3, 8, 48),  # 5.6 multiples of 8 -> 6
        (64, 0.5, 8, 32),
        (10, 0.25, 1, 8),  # 7.5 -> 8: half rounds up
        (10, 0.95, 1, 1),  # never emptied
        (10, 0.99, 4, 4),  # never below one multiple
        (6, 0.5, 8, 6),  # a group smaller than round_to stays whole
        (12, 0.9, 8, 8),
    ],
)
def test_kept_units(size, sparsity, round_to, kept):
    assert kept_units(size, sparsity, round_to) == kept


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_kept_units_rejects_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        kept_units(10, sparsity)


# -- Budget ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, kind, value, fraction",
    [
        ("flops=0.5", "flops", 0.5, True),
        ("params=2e5", "params", 200_000.0, False),
        ("params=0.3", "params", 0.3, True),
        (" flops = 1 ", "flops", 1.0, True),  # 1 is the whole dense model, still a fraction
        ("flops=2.5e7", "flops", 25_000_000.0, False),
        ("latency=0.8", "latency", 0.8, False),  # milliseconds, never a fraction
        ("latency = 12.5ms", "latency", 12.5, False),
    ],
)
def test_budget_parse(text, kind, value, fraction):
    budget = Budget.parse(text)
    assert (budget.kind, budget.value, budget.is_fraction) == (kind, value, fraction)
    assert budget == Budget(**{kind: value})
    assert Budget.parse(str(budget)) == budget


def test_budget_target_is_a_fraction_of_the_dense_total_or_an_absolute_amount():
    assert Budget(flops=0.5).target(2_000_000) == 1_000_000.0
    assert Budget(params=1.0).target(272_474) == 272_474.0
    assert Budget(params=150_000).target(272_474) == 150_000.0
    assert Budget(flops=1.5).target(10) == 1.5  # above 1: an absolute count, whatever the dense total
    assert Budget(latency=0.8).target(1.5) == 0.8  # milliseconds


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "budget must look like"),
        ("0.5", "budget must look like"),
        ("flops", "budget must look like"),
        ("flops:0.5", "budget must look like"),
        ("macs=0.5", "budget must look like"),
        ("FLOPS=0.5", "budget must look like"),
        ("flops=", "budget value must be a number, got ''"),
        ("flops=half", "budget value must be a number, got 'half'"),
        ("flops=0.5=1", "budget value must be a number"),
        ("flops=0", "budget flops must be a positive number"),
        ("params=-3", "budget params must be a positive number"),
        ("flops=nan", "budget flops must be a positive number"),
        ("flops=inf", "budget flops must be a positive number"),
        ("latency=fast", "budget value must be a number, got 'fast'"),
        ("latency=-2ms", "budget latency must be a positive number"),
    ],
)
def test_budget_parse_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        Budget.parse(text)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of flops=, params= or latency="),
        ({"flops": 0.5, "params": 0.5}, "exactly one of flops=, params= or latency="),
        ({"flops": 0.5, "latency": 3.0}, "exactly one of flops=, params= or latency="),
        ({"latency": 0}, "positive number"),
        ({"latency": float("inf")}, "positive number"),
        ({"flops": 0}, "positive number"),
        ({"params": -1.0}, "positive number"),
        ({"flops": True}, "positive number"),
        ({"flops": "0.5"}, "positive number"),
        ({"params": float("inf")}, "positive number"),
        ({"params": float("nan")}, "positive number"),
    ],
)
def test_budget_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Budget(**kwargs)


def test_budget_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Budget(flops=0.5).flops = 0.4  # type: ignore[misc]


# -- round trips of plans made by make_plan -------------------------------------------------------
def _traced(cls: type[toys.Toy]) -> tuple[nn.Module, Any]:
    model = toys.randomize_norms_(cls().eval())
    return model, trace(model, model.example())


@pytest.fixture(scope="module")
def resnet20():
    sample = load_sample("resnet20")
    return sample.model, sample.example, trace(sample.model, sample.example)


def _filled_in(plan: Plan, model: nn.Module, example: torch.Tensor, graph) -> Plan:
    """`plan` with every optional part set: allocation, totals, per-group predictions, metrics, meta."""
    dense, pruned = count(model, example), count(model, example, plan=plan, graph=graph)
    groups = {
        name: dataclasses.replace(g, predicted_change=-0.001 * i) for i, (name, g) in enumerate(plan.groups.items())
    }
    return dataclasses.replace(
        plan,
        groups=groups,
        model_name=f"test:{plan.model_type}",
        allocation=Allocation("greedy", Budget(flops=0.5), "accuracy"),
        totals=Totals(dense.params, pruned.params, dense.flops, pruned.flops),
        predicted={"accuracy": 0.971, "loss": 0.12},
        band={"accuracy": (0.95, 0.98)},
        predicted_by=PredictedBy("calibrated", 24),
        measured={"accuracy": 0.9685},
        measured_on=MeasuredOn("sample digits, 500 held-out images", 50),
        meta={"note": "filled in", "levels": [0.1, 0.5], "nested": {"ok": True, "none": None}},
    )


@pytest.mark.parametrize("cls", toys.PRUNABLE_TOYS, ids=lambda c: c.__name__)
def test_round_trip_of_toy_plans(cls):
    model, graph = _traced(cls)
    plan = make_plan(model, graph, 0.5, round_to=2)
    assert plan.fingerprint == graph.fingerprint
    for indent in (2, None):
        assert Plan.from_json(plan.to_json(indent=indent)) == plan
    full = _filled_in(plan, model, model.example(), graph)
    assert Plan.from_json(full.to_json()) == full
    assert VALIDATOR.is_valid(full.to_dict())


def test_round_trip_preserves_everything():
    model = toys.Grouped().eval()
    graph = trace(model, model.example())
    plan = make_plan(model, graph, {"reduce.0": 0.5, "expand": 0.3}, criterion="l2", round_to=2)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.groups["reduce.0"].keep == plan.groups["reduce.0"].keep
    assert again.criterion == "l2" and again.round_to == 2
    # a unit of a grouped conv is a whole conv group: 4 units of 2 channels
    assert again.to_dict()["groups"]["reduce.0"]["channels_before"] == 8
    assert again.groups["reduce.0"].channels_after == 2 * len(plan.groups["reduce.0"].keep)


def test_round_trip_of_a_sample_model_plan(resnet20):
    model, example, graph = resnet20
    plan = make_plan(model, graph, 0.3, round_to=4)
    assert Plan.from_json(plan.to_json()) == plan
    full = _filled_in(plan, model, example, graph)
    text = full.to_json()
    again = Plan.from_json(text)
    assert again == full
    assert again.to_json() == text
    assert again.allocation == Allocation("greedy", Budget(flops=0.5), "accuracy")
    assert again.totals.params_after < again.totals.params_before
    assert again.measured == {"accuracy": 0.9685}
    VALIDATOR.validate(json.loads(text))


def test_schema_ships_with_the_package_and_is_valid():
    Draft202012Validator.check_schema(PLAN_SCHEMA)
    assert PLAN_SCHEMA["properties"]["schema"]["enum"] == ["prunecore.plan/1", SCHEMA]
    assert SCHEMA == "prunecore.plan/2"


def test_a_version_1_plan_still_loads_and_is_written_as_version_2(plan_dict):
    v1 = json.loads(json.dumps(plan_dict))
    v1["schema"] = "prunecore.plan/1"
    for key in ("band", "predicted_by", "measured_on"):
        del v1["metrics"][key]
    VALIDATOR.validate(v1)
    plan = Plan.from_dict(v1)
    assert (plan.band, plan.predicted_by, plan.measured_on) == ({}, None, None)
    assert plan.measured == {"accuracy": 0.9685} and plan.predicted == {"accuracy": 0.971, "loss": 0.12}
    again = plan.to_dict()
    assert again["schema"] == SCHEMA and Plan.from_dict(again) == plan


def test_a_version_1_plan_cannot_carry_version_2_fields(plan_dict):
    v1 = json.loads(json.dumps(plan_dict))
    v1["schema"] = "prunecore.plan/1"
    assert not VALIDATOR.is_valid(v1)
    with pytest.raises(PlanError, match=r"^metrics has unknown field\(s\): 'band', 'measured_on', 'predicted_by'"):
        Plan.from_dict(v1)


def test_every_dtype_the_schema_allows_is_accepted(plan_dict):
    for dtype in DTYPES:
        d = json.loads(json.dumps(plan_dict))
        d["inputs"][0]["dtype"] = dtype
        assert Plan.from_dict(d).inputs[0].dtype == dtype


def test_optional_fields_take_their_defaults():
    minimal = {
        "schema": SCHEMA,
        "model": {"type": "Net"},
        "inputs": [{"shape": [1, 3, 8, 8]}],
        "groups": {"conv": {"size": 4, "keep": [3, 1]}},
    }
    VALIDATOR.validate(minimal)
    plan = Plan.from_dict(minimal)
    assert plan.groups["conv"] == GroupPlan(4, (1, 3), 4, None)  # keep comes back sorted
    assert plan.inputs == (InputSpec((1, 3, 8, 8), "float32"),)
    assert (plan.criterion, plan.round_to, plan.model_name, plan.fingerprint) == ("l1", 1, "", "")
    assert (plan.allocation, plan.totals, plan.predicted, plan.measured, plan.meta) == (None, None, {}, {}, {})


# -- random valid plans ---------------------------------------------------------------------------
FINITE = st.floats(allow_nan=False, allow_infinity=False)
JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | FINITE | st.text(max_size=8)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
NAMES = st.text(min_size=1, max_size=16) | st.from_regex(r"[a-z_]{1,6}(\.[0-9a-z_]{1,4}){0,3}", fullmatch=True)


@st.composite
def group_plans(draw, round_to: int = 1) -> GroupPlan:
    """A group keeping a count `kept_units` can give: a multiple of `round_to`, or all its units."""
    size = draw(st.integers(1, 300))
    per_unit = draw(st.integers(1, 4))  # channels per unit (conv groups)
    kept = draw(st.sampled_from([size, *range(round_to, size, round_to)]))
    keep = draw(st.permutations(range(size)))[:kept]
    change = draw(st.none() | FINITE)
    return GroupPlan(size, tuple(sorted(keep)), size * per_unit, change)


BUDGETS = st.builds(
    lambda kind, value: Budget(**{kind: value}),
    st.sampled_from(["flops", "params"]),
    st.floats(0, 1, exclude_min=True) | st.floats(1, 1e15),
)


@st.composite
def plans(draw) -> Plan:
    shapes = st.lists(st.integers(1, 1024), min_size=1, max_size=5).map(tuple)
    inputs = st.builds(InputSpec, shapes, st.sampled_from(DTYPES))
    metrics = st.dictionaries(st.text(max_size=10), FINITE, max_size=3)
    bands = st.dictionaries(st.text(max_size=10), st.lists(FINITE, min_size=2, max_size=2).map(sorted).map(tuple),
                            max_size=3)  # fmt: skip
    counts = st.integers(0, 2**63 - 1)
    round_to = draw(st.integers(1, 64))
    return Plan(
        groups=draw(st.dictionaries(NAMES, group_plans(round_to), max_size=5)),
        inputs=tuple(draw(st.lists(inputs, min_size=1, max_size=3))),
        model_type=draw(st.text(max_size=12)),
        criterion=draw(st.sampled_from(["l1", "l2", "taylor"]) | st.text(max_size=8)),
        round_to=round_to,
        meta=draw(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3)),
        model_name=draw(st.text(max_size=12)),
        fingerprint=draw(st.text("0123456789abcdef", min_size=16, max_size=16) | st.just("")),
        allocation=draw(st.none() | st.builds(Allocation, st.text(max_size=8), BUDGETS, st.text(max_size=8))),
        totals=draw(st.none() | st.builds(Totals, *[st.integers(0, 10**12)] * 4)),
        predicted=draw(metrics),
        measured=draw(metrics),
        band=draw(bands),
        predicted_by=draw(st.none() | st.builds(PredictedBy, st.sampled_from(["additive", "calibrated"]), counts)),
        measured_on=draw(st.none() | st.builds(MeasuredOn, st.text(max_size=12), counts)),
        version=draw(st.text(max_size=8)),
        created=draw(st.text(max_size=25)),
    )


@PROPERTY
@given(plans())
def test_random_plans_round_trip_and_match_the_schema(plan):
    text = plan.to_json()
    assert Plan.from_json(text) == plan
    assert Plan.from_json(plan.to_json(indent=None).encode()) == plan
    VALIDATOR.validate(json.loads(text))


# -- malformed plans ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plan_dict():
    model, graph = _traced(toys.Concat)
    return _filled_in(make_plan(model, graph, 0.5), model, model.example(), graph).to_dict()


class RawJSON(str):
    """A value written into the JSON text as is (`NaN`), not as a JSON string."""


def mutate(d: dict, path: tuple, value: Any) -> str:
    d = json.loads(json.dumps(d))
    target = d
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = "@literal@" if isinstance(value, RawJSON) else value
    text = json.dumps(d)
    return text.replace('"@literal@"', value) if isinstance(value, RawJSON) else text


A0 = ("groups", "a.0")  # Concat's first group: 4 units, keeps 2, one channel per unit

MALFORMED = [
    # schema version
    (("schema",), "prunecore.plan/0",
     r"schema must be 'prunecore.plan/1' or 'prunecore.plan/2', got 'prunecore.plan/0'"),
    (("schema",), KeyError, r"schema must be 'prunecore.plan/1' or 'prunecore.plan/2', got None"),
    (("schema",), 1, "schema must be"),
    # unknown fields, at every level
    (("extra",), 1, r"^plan has unknown field\(s\): 'extra'"),
    (("model_type",), "Concat", r"^plan has unknown field\(s\): 'model_type'"),  # the old layout
    (("model", "colour"), "red", r"^model has unknown field\(s\): 'colour'"),
    (("inputs", 0, "layout"), "NCHW", r"^inputs\[0\] has unknown field\(s\): 'layout'"),
    ((*A0, "colour"), "red", r"^groups\['a.0'\] has unknown field\(s\): 'colour'"),
    (("allocation", "seed"), 0, r"^allocation has unknown field\(s\): 'seed'"),
    (("totals", "params"), 1, r"^totals has unknown field\(s\): 'params'"),
    (("metrics", "estimated"), {}, r"^metrics has unknown field\(s\): 'estimated'"),
    (("metrics", "predicted_by", "seed"), 0, r"^metrics.predicted_by has unknown field\(s\): 'seed'"),
    (("metrics", "measured_on", "when"), "", r"^metrics.measured_on has unknown field\(s\): 'when'"),
    # missing required fields
    (("model",), KeyError, "plan is missing 'model'"),
    (("inputs",), KeyError, "plan is missing 'inputs'"),
    (("groups",), KeyError, "plan is missing 'groups'"),
    (("model", "type"), KeyError, "model.type must be a string"),
    (("inputs", 0, "shape"), KeyError, r"inputs\[0\].shape must be a non-empty list of positive integers"),
    ((*A0, "size"), KeyError, r"groups\['a.0'\].size must be a positive integer"),
    ((*A0, "keep"), KeyError, r"groups\['a.0'\].keep must be a list of integers"),
    (("allocation", "method"), KeyError, "allocation.method must be a string"),
    (("allocation", "budget"), KeyError, "allocation.budget must be"),
    (("totals", "flops_after"), KeyError, "totals.flops_after must be a non-negative integer"),
    # wrong types of the plain fields
    (("model",), "Concat", "model must be an object"),
    (("model", "type"), 3, "model.type must be a string"),
    (("model", "name"), 3, "model.name must be a string"),
    (("model", "fingerprint"), None, "model.fingerprint must be a string"),
    (("criterion",), 1, "criterion must be a string"),
    (("prunecore_version",), None, "prunecore_version must be a string"),
    (("created",), 0, "created must be a string"),
    (("meta",), [], "meta must be an object"),
    (("meta",), None, "meta must be an object"),
    (("round_to",), 0, "round_to must be a positive integer"),
    (("round_to",), 1.5, "round_to must be a positive integer"),
    (("round_to",), 8.0, "round_to must be a positive integer"),
    (("round_to",), True, "round_to must be a positive integer"),
    (("round_to",), "8", "round_to must be a positive integer"),
    # groups
    (("groups",), [], "groups must be an object keyed by group name"),
    (A0, [2, 3], r"groups\['a.0'\] must be an object"),
    ((*A0, "size"), 0, "size must be a positive integer"),
    ((*A0, "size"), -4, "size must be a positive integer"),
    ((*A0, "size"), 4.0, "size must be a positive integer"),
    ((*A0, "size"), "4", "size must be a positive integer"),
    ((*A0, "size"), True, "size must be a positive integer"),
    ((*A0, "keep"), [0, 0], r"groups\['a.0'\].keep has duplicate indices"),
    ((*A0, "keep"), [0, 4], r"groups\['a.0'\].keep has indices outside \[0, 4\)"),
    ((*A0, "keep"), [-1, 2], r"keep has indices outside \[0, 4\)"),
    ((*A0, "keep"), [], "keep must keep at least one unit"),
    ((*A0, "keep"), ["0", "1"], "keep must be a list of integers"),
    ((*A0, "keep"), [1.0, 2.0], "keep must be a list of integers"),
    ((*A0, "keep"), [True, 2], "keep must be a list of integers"),
    ((*A0, "keep"), "2,3", "keep must be a list of integers"),
    ((*A0, "keep"), None, "keep must be a list of integers"),
    ((*A0, "sparsity"), 1.0, r"groups\['a.0'\].sparsity must be a number in \[0, 1\)"),
    ((*A0, "sparsity"), 1.5, r"sparsity must be a number in \[0, 1\)"),
    ((*A0, "sparsity"), -0.1, r"sparsity must be a number in \[0, 1\)"),
    ((*A0, "sparsity"), "0.5", r"sparsity must be a number in \[0, 1\)"),
    ((*A0, "sparsity"), False, r"sparsity must be a number in \[0, 1\)"),
    ((*A0, "sparsity"), None, r"sparsity must be a number in \[0, 1\)"),
    ((*A0, "sparsity"), 0.25, r"groups\['a.0'\].sparsity does not match its kept units"),
    ((*A0, "sparsity"), 0.0, "sparsity does not match its kept units"),
    ((*A0, "channels_before"), 6, r"groups\['a.0'\].channels_before must be a positive multiple of size \(4\)"),
    ((*A0, "channels_before"), 2, r"channels_before must be a positive multiple of size \(4\)"),
    ((*A0, "channels_before"), 0, r"channels_before must be a positive multiple of size \(4\)"),
    ((*A0, "channels_before"), 4.0, r"channels_before must be a positive multiple of size \(4\)"),
    ((*A0, "channels_before"), True, r"channels_before must be a positive multiple of size \(4\)"),
    ((*A0, "channels_before"), "4", r"channels_before must be a positive multiple of size \(4\)"),
    ((*A0, "channels_after"), 3, r"groups\['a.0'\].channels_after must be 2 for its kept units"),
    ((*A0, "channels_after"), 4, "channels_after must be 2 for its kept units"),
    ((*A0, "channels_after"), "2", "channels_after must be 2 for its kept units"),
    ((*A0, "channels_after"), None, "channels_after must be 2 for its kept units"),
    ((*A0, "predicted_change"), "0.1", r"groups\['a.0'\].predicted_change must be a number or null"),
    ((*A0, "predicted_change"), True, "predicted_change must be a number or null"),
    ((*A0, "predicted_change"), [], "predicted_change must be a number or null"),
    # NaN and Infinity are not JSON
    ((*A0, "sparsity"), RawJSON("NaN"), r"plan is not valid JSON: groups\['a.0'\].sparsity is NaN, which JSON does"),
    ((*A0, "predicted_change"), RawJSON("Infinity"), r"groups\['a.0'\].predicted_change is Infinity, which JSON"),
    (("metrics", "predicted", "loss"), RawJSON("-Infinity"), "metrics.predicted.loss is -Infinity, which JSON does"),
    (("meta", "x"), RawJSON("NaN"), "plan is not valid JSON: meta.x is NaN, which JSON does not allow"),
    # allocation and budget
    (("allocation",), "greedy", "allocation must be an object or null"),
    (("allocation",), [], "allocation must be an object or null"),
    (("allocation", "method"), None, "allocation.method must be a string"),
    (("allocation", "metric"), 3, "allocation.metric must be a string"),
    (("allocation", "budget"), {"flops": 1, "params": 1}, r'budget must be \{"flops": x\}, \{"params": x\} or \{"latency": ms\}'),
    (("allocation", "budget"), {}, r"allocation.budget must be \{"),
    (("allocation", "budget"), {"macs": 0.5}, r"allocation.budget must be \{"),
    (("allocation", "budget"), "flops=0.5", r"allocation.budget must be \{"),
    (("allocation", "budget"), 0.5, r"allocation.budget must be \{"),
    (("allocation", "budget"), {"flops": -0.5}, "allocation.budget.flops must be a positive number"),
    (("allocation", "budget"), {"flops": 0}, "allocation.budget.flops must be a positive number"),
    (("allocation", "budget"), {"params": "0.5"}, "allocation.budget.params must be a positive number"),
    (("allocation", "budget"), {"params": True}, "allocation.budget.params must be a positive number"),
    (("allocation", "budget"), {"params": None}, "allocation.budget.params must be a positive number"),
    # totals
    (("totals",), [], "totals must be an object or null"),
    (("totals",), 100, "totals must be an object or null"),
    (("totals", "params_after"), -1, "totals.params_after must be a non-negative integer"),
    (("totals", "params_after"), 1.5, "totals.params_after must be a non-negative integer"),
    (("totals", "flops_before"), True, "totals.flops_before must be a non-negative integer"),
    (("totals", "flops_before"), "10", "totals.flops_before must be a non-negative integer"),
    (("totals", "params_before"), None, "totals.params_before must be a non-negative integer"),
    # metrics
    (("metrics",), [], "metrics must be an object"),
    (("metrics",), None, "metrics must be an object"),
    (("metrics", "predicted"), [0.9], "metrics.predicted must be an object of metric name: number or null"),
    (("metrics", "measured"), None, "metrics.measured must be an object of metric name: number"),
    (("metrics", "predicted", "accuracy"), "high", "metrics.predicted.accuracy must be a number or null"),
    (("metrics", "measured", "accuracy"), [], "metrics.measured.accuracy must be a number or null"),
    (("metrics", "measured", "accuracy"), True, "metrics.measured.accuracy must be a number"),
    (("metrics", "band"), [], "metrics.band must be an object of metric name"),
    (("metrics", "band", "accuracy"), [0.9, 0.95], "metrics.band.accuracy must be an object with low and high"),
    (("metrics", "band", "accuracy", "low"), "x", r"metrics.band.accuracy.low and .high must be numbers or null"),
    (("metrics", "band", "accuracy", "low"), 0.99, r"metrics.band.accuracy.low must not be above .high"),
    (("metrics", "predicted_by"), "additive", "metrics.predicted_by must be an object or null"),
    (("metrics", "predicted_by", "method"), "magic", "metrics.predicted_by.method must be one of additive, calibrated"),
    (("metrics", "predicted_by", "method"), KeyError, "metrics.predicted_by is missing 'method'"),
    (("metrics", "predicted_by", "plans"), -1, "metrics.predicted_by.plans must be a non-negative integer"),
    (("metrics", "measured_on", "data"), 3, "metrics.measured_on.data must be a string"),
    (("metrics", "measured_on", "bn_recalibration"), 1.5, "metrics.measured_on.bn_recalibration must be a non-neg"),
    # inputs
    (("inputs",), [], "inputs must be a non-empty list"),
    (("inputs",), {}, "inputs must be a non-empty list"),
    (("inputs",), None, "inputs must be a non-empty list"),
    (("inputs", 0), "2x3x8x8", r"inputs\[0\] must be an object"),
    (("inputs", 0, "shape"), [], r"inputs\[0\].shape must be a non-empty list of positive integers"),
    (("inputs", 0, "shape"), [1, -3], "positive integers"),
    (("inputs", 0, "shape"), [2, 0, 8, 8], "positive integers"),
    (("inputs", 0, "shape"), [2, 3.0, 8, 8], "positive integers"),
    (("inputs", 0, "shape"), [True, 3, 8, 8], "positive integers"),
    (("inputs", 0, "shape"), "2,3,8,8", "positive integers"),
    (("inputs", 0, "dtype"), "float8", r"inputs\[0\].dtype must be one of float32, .*, got 'float8'"),
    (("inputs", 0, "dtype"), "torch.float32", r"inputs\[0\].dtype must be one of"),
    (("inputs", 0, "dtype"), None, r"inputs\[0\].dtype must be one of"),
    (("inputs", 0, "dtype"), 32, r"inputs\[0\].dtype must be one of"),
]


@pytest.mark.parametrize("path, value, message", MALFORMED, ids=lambda x: x if isinstance(x, str) else None)
def test_malformed_plans_are_rejected_with_a_reason(plan_dict, path, value, message):
    text = mutate(plan_dict, path, value)
    with pytest.raises(PlanError, match=message):
        Plan.from_json(text)
    if not isinstance(value, RawJSON):  # the same dict handed over directly
        with pytest.raises(PlanError, match=message):
            Plan.from_dict(json.loads(text))


def test_the_unmutated_plan_dict_is_valid(plan_dict):
    assert VALIDATOR.is_valid(plan_dict)
    assert Plan.from_dict(plan_dict).to_dict() == plan_dict


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "plan is not valid JSON"),
        ("{", "plan is not valid JSON"),
        ("{'schema': 1}", "plan is not valid JSON"),
        ('{"schema": "prunecore.plan/1",}', "plan is not valid JSON"),
        ("\ufeff{}", "plan is not valid JSON"),  # a BOM in a str
        (b"\xff\xfe\x00", "plan is not valid JSON"),  # not valid UTF-16 either
        (b'{"a": "\xc3\x28"}', "plan is not valid JSON"),  # invalid UTF-8
        ("[" * 100_000, "plan is not valid JSON: nested too deeply"),
        ("[]", "plan must be a JSON object"),
        ("null", "plan must be a JSON object"),
        ('"plan"', "plan must be a JSON object"),
        ("3.5", "plan must be a JSON object"),
        ("{}", "plan schema must be"),
    ],
)
def test_non_json_or_non_object_is_rejected(text, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_json(text)


def test_from_dict_rejects_non_objects():
    for data in (None, [], "plan", 1, ({"schema": SCHEMA},)):
        with pytest.raises(PlanError, match="plan must be a JSON object"):
            Plan.from_dict(data)


# -- random damage: PlanError or a valid plan, never another exception; parser and schema agree ----
def _paths(obj: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*path, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += _paths(value, (*path, i))
    return out


def _at(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _mutate_once(data: st.DataObject, d: dict) -> None:
    """Delete a key or item, replace a value by a JSON value of another type, or add a key."""
    op = data.draw(st.sampled_from(["delete", "replace", "add"]))
    paths = _paths(d)
    if op == "add":
        where = data.draw(st.sampled_from([p for p in paths if isinstance(_at(d, p), dict)]))
        _at(d, where)[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
        return
    path = data.draw(st.sampled_from(paths[1:]))
    parent, key = _at(d, path[:-1]), path[-1]
    if op == "delete":
        del parent[key]
    else:
        old = parent[key]
        parent[key] = data.draw(JSON_VALUES.filter(lambda v: type(v) is not type(old)))


@PROPERTY
@given(plans(), st.data())
def test_damaged_plans_are_rejected_or_valid_and_the_schema_agrees(plan, data):
    d = json.loads(plan.to_json())
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate_once(data, d)
    try:
        parsed = Plan.from_dict(d)
    except PlanError:
        return  # the schema may accept what the parser's cross-field checks reject
    # accepted by from_dict => valid under the schema (so: schema-invalid => from_dict rejects)
    assert VALIDATOR.is_valid(d), list(VALIDATOR.iter_errors(d))
    VALIDATOR.validate(parsed.to_dict())
    assert Plan.from_json(parsed.to_json()) == parsed


@st.composite
def damaged_texts(draw) -> str:
    """A valid plan's JSON text with a few characters deleted, inserted or replaced."""
    text = draw(plans()).to_json(indent=None)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        char = draw(st.sampled_from('{}[]",:0123456789.-+eE truefalsnNaIfiy\\') | st.characters())
        op = draw(st.sampled_from(["delete", "insert", "replace"]))
        text = text[:i] + ("" if op == "delete" else char) + text[i + (op != "insert") :]
    return text


@PROPERTY
@given(st.binary(max_size=300) | st.text(max_size=300) | damaged_texts() | damaged_texts().map(str.encode))
def test_any_text_gives_a_plan_or_a_plan_error(text):
    try:
        parsed = Plan.from_json(text)
    except PlanError:
        return
    assert isinstance(parsed, Plan)
    assert VALIDATOR.is_valid(parsed.to_dict())


# -- plan.py bugs, pinned until fixed -------------------------------------------------------------
BIG = "9" * 400  # an integer literal too large for a float


def test_an_integer_literal_python_will_not_parse_is_a_plan_error(plan_dict):
    with pytest.raises(PlanError, match="plan is not valid JSON"):
        Plan.from_json(mutate(plan_dict, ("meta", "x"), RawJSON("1" * 5000)))


@pytest.mark.parametrize(
    "path",
    [(*A0, "predicted_change"), (*A0, "sparsity"), ("allocation", "budget", "flops"), ("metrics", "measured", "acc")],
)
def test_an_integer_too_large_for_a_float_is_a_plan_error(plan_dict, path):
    with pytest.raises(PlanError, match="must be a"):
        Plan.from_json(mutate(plan_dict, path, RawJSON(BIG)))


@pytest.mark.parametrize("path", [("meta", "x"), (*A0, "predicted_change")])
@pytest.mark.parametrize("literal", ["1e400", "-1e400"])
def test_a_float_literal_that_overflows_is_not_valid_json(plan_dict, path, literal):
    with pytest.raises(PlanError, match="plan is not valid JSON"):
        Plan.from_json(mutate(plan_dict, path, RawJSON(literal)))


def test_a_null_channels_before_is_rejected(plan_dict):
    with pytest.raises(PlanError, match="channels_before must be"):
        Plan.from_json(mutate(plan_dict, (*A0, "channels_before"), None))


def test_a_boolean_channels_after_is_rejected():
    d = {"schema": SCHEMA, "model": {"type": "Net"}, "inputs": [{"shape": [1, 3]}], "groups": {}}
    d["groups"]["g"] = {"size": 4, "keep": [0], "channels_after": True}
    with pytest.raises(PlanError, match="channels_after must be 1"):
        Plan.from_dict(d)


def test_a_huge_group_keeping_one_unit_round_trips():
    plan = Plan({"g": GroupPlan(3_000_000, (0,))}, (InputSpec((1, 3)),), "Net")
    assert Plan.from_json(plan.to_json()) == plan


def test_a_plan_made_with_unsorted_keep_round_trips():
    plan = Plan({"g": GroupPlan(4, (3, 1))}, (InputSpec((1, 3)),), "Net")
    assert Plan.from_json(plan.to_json()) == plan


# -- Plan.check -----------------------------------------------------------------------------------
def test_plan_names_unknown_group():
    model, graph = _traced(toys.Concat)
    d = make_plan(model, graph, 0.5).to_dict()
    d["groups"]["nope"] = d["groups"].pop("a.0")
    with pytest.raises(PlanError, match="group 'nope', which the model does not have"):
        Plan.from_dict(d).check(graph)


def test_plan_with_wrong_group_size():
    model, graph = _traced(toys.Concat)
    d = make_plan(model, graph, 0.5).to_dict()
    d["groups"]["a.0"] = {"size": 5, "keep": [0, 1]}
    with pytest.raises(PlanError, match="5 units, the model has 4"):
        Plan.from_dict(d).check(graph, force=True)  # force skips the fingerprint only


def test_plan_pruning_a_group_that_cannot_be_pruned():
    model, graph = _traced(toys.Concat)
    assert not graph["head"].prunable
    d = make_plan(model, graph, 0.5).to_dict()
    d["groups"]["head"] = {"size": 3, "keep": [0, 2]}
    with pytest.raises(PlanError, match="prunes group 'head', which cannot be pruned: it reaches the model output"):
        Plan.from_dict(d).check(graph)
    d["groups"]["head"] = {"size": 3, "keep": [0, 1, 2]}  # keeping every unit is no pruning
    Plan.from_dict(d).check(graph)


def test_plan_for_another_model_class_is_refused_even_with_force():
    model, graph = _traced(toys.Concat)
    other, other_graph = _traced(toys.Chunk)
    plan = make_plan(model, graph, 0.5)
    for force in (False, True):
        with pytest.raises(PlanError, match="plan is for a Concat, the model is a Chunk"):
            plan.check(other_graph, force=force)


def test_plan_for_another_width_of_the_same_class_is_refused_by_fingerprint(resnet20):
    model, example, graph = resnet20
    plan = make_plan(model, graph, 0.3)
    narrow = ResNet20(widths=(8, 16, 32)).eval()
    narrow_graph = trace(narrow, example)
    assert narrow_graph.model_type == graph.model_type and narrow_graph.fingerprint != graph.fingerprint
    both = f"fingerprint is {graph.fingerprint}, this model's is {narrow_graph.fingerprint}"
    with pytest.raises(PlanError, match=both):
        plan.check(narrow_graph)
    with pytest.raises(PlanError, match="16 units, the model has 8"):
        plan.check(narrow_graph, force=True)  # the group sizes do not fit either


def test_force_accepts_another_structure_when_group_sizes_fit():
    model, graph = _traced(toys.Concat)
    plan = make_plan(model, graph, 0.5)
    changed = toys.Concat().eval()
    changed.fuse[1] = nn.Identity()  # no BatchNorm after fuse: same groups and sizes, other members
    changed_graph = trace(changed, changed.example())
    assert [(g.name, g.size) for g in changed_graph] == [(g.name, g.size) for g in graph]
    assert changed_graph.fingerprint != graph.fingerprint
    with pytest.raises(PlanError, match="made for another model: its fingerprint is .*pass force=True"):
        plan.check(changed_graph)
    plan.check(changed_graph, force=True)
    dataclasses.replace(plan, fingerprint="").check(changed_graph)  # no fingerprint recorded: not compared


def test_the_same_architecture_has_the_same_fingerprint(resnet20):
    model, example, graph = resnet20
    fresh = ResNet20().eval()  # other weights, same structure
    assert trace(fresh, example).fingerprint == graph.fingerprint
    make_plan(model, graph, 0.5).check(trace(fresh, torch.zeros(3, 1, 28, 28)))


# -- re-applying a plan's JSON --------------------------------------------------------------------
def _assert_identical(a: nn.Module, b: nn.Module, example: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape and torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(a.eval()(example), b.eval()(example))


REAPPLIED_TOYS = [toys.TwoResiduals, toys.Concat, toys.Depthwise, toys.Grouped, toys.SqueezeExcite, toys.Conv1dNet]


@pytest.mark.parametrize("cls", REAPPLIED_TOYS, ids=lambda c: c.__name__)
def test_reapplying_plan_json_to_a_fresh_copy_gives_the_same_model(cls):
    model, graph = _traced(cls)
    plan = make_plan(model, graph, 0.5)
    pruned = apply_plan(model, plan, graph=graph)
    fresh = cls()
    fresh.load_state_dict(model.state_dict())
    _assert_identical(pruned, apply_plan(fresh.eval(), Plan.from_json(plan.to_json())), model.example())


def test_rebuilding_a_sample_model_from_plan_and_state_dict(resnet20, tmp_path):
    model, example, graph = resnet20
    plan = make_plan(model, graph, 0.3)
    pruned = apply_plan(model, plan, graph=graph)
    fresh = ResNet20()
    fresh.load_state_dict(model.state_dict())
    _assert_identical(pruned, apply_plan(fresh.eval(), Plan.from_json(plan.to_json())), example)
    # the README recipe: plan JSON + the pruned state_dict rebuild the model from a randomly initialised one
    (tmp_path / "plan.json").write_text(plan.to_json())
    torch.save(pruned.state_dict(), tmp_path / "pruned.pt")
    rebuilt = apply_plan(ResNet20().eval(), Plan.from_json((tmp_path / "plan.json").read_text()))
    rebuilt.load_state_dict(torch.load(tmp_path / "pruned.pt", weights_only=True))
    _assert_identical(pruned, rebuilt, example)
    assert sum(p.numel() for p in rebuilt.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_plan_json_for_another_width_is_refused_by_apply_plan(resnet20):
    model, example, graph = resnet20
    text = make_plan(model, graph, 0.3).to_json()
    with pytest.raises(PlanError, match="fingerprint"):
        apply_plan(ResNet20(widths=(8, 16, 32)).eval(), Plan.from_json(text))


def test_nan_is_never_written():
    plan = Plan({}, (InputSpec((1, 3)),), "Net", predicted={"loss": math.nan})
    assert json.loads(plan.to_json())["metrics"]["predicted"] == {"loss": None}  # an unknown metric is null
    with pytest.raises(PlanError, match=r"plan cannot be written: meta.x is nan, which JSON cannot hold"):
        dataclasses.replace(plan, meta={"x": math.nan}).to_json()
