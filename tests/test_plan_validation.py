"""Plan files prunecore would not write are refused with a PlanError naming the field; every plan it makes reads back.

Covers: the exact sparsity <-> kept-count rule, duplicate keys, kept counts against `round_to`, unknown
(NaN) metrics written as null, non-finite and out-of-range numbers, and two properties: damaged plan text
gives a plan that round-trips or a PlanError (never another exception), and plans from `make_plan` and
`allocate` pass every check and round-trip exactly.
"""

from __future__ import annotations

import functools
import json
import math
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

import prunecore as pc
import toy_models as toys
from prunecore.graph import InputSpec
from prunecore.plan import GroupPlan, Plan, PlanError, kept_units
from prunecore.prune import make_plan

VALIDATOR = Draft202012Validator(json.loads((resources.files("prunecore") / "plan.schema.json").read_text()))
PROPERTY = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_TOYS = [toys.TwoResiduals, toys.Concat, toys.Grouped, toys.Conv1dNet, toys.Depthwise]


@functools.cache
def traced(cls: type[toys.Toy]) -> tuple[torch.nn.Module, pc.ChannelGraph]:
    model = toys.randomize_norms_(cls().eval())
    return model, pc.trace(model, model.example())


def concat_dict(**plan_fields: Any) -> dict:
    """Concat's plan at sparsity 0.5 as a dict: group 'a.0' keeps 2 of 4 units, 'b.0' 3 of 6, 'fuse.0' 3 of 5."""
    model, graph = traced(toys.Concat)
    return make_plan(model, graph, 0.5, **plan_fields).to_dict()


def minimal(groups: dict, **top: Any) -> dict:
    return {"schema": pc.SCHEMA, "model": {"type": "Net"}, "inputs": [{"shape": [1, 3]}], "groups": groups, **top}


def strict_loads(text: str | bytes) -> Any:
    """A JSON parser that allows neither NaN/Infinity nor a key twice: the oracle for what from_json may accept."""

    def pairs(items: list) -> dict:
        assert len({k for k, _ in items}) == len(items), "duplicate key"
        return dict(items)

    def constant(name: str) -> None:
        raise AssertionError(f"{name} accepted")

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


# -- sparsity and kept count agree exactly ----------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.5 + 5e-5, 0.5 - 5e-5, math.nextafter(0.5, 1.0), 0.500001, 0.49999])
def test_a_sparsity_near_but_not_equal_to_the_kept_count_is_refused(sparsity):
    d = concat_dict()
    d["groups"]["a.0"]["sparsity"] = sparsity
    message = rf"groups\['a.0'\].sparsity does not match its kept units: it is {sparsity!r}, keeping 2 of 4 is 0.5"
    with pytest.raises(PlanError, match=message):
        Plan.from_json(json.dumps(d))


@pytest.mark.parametrize(
    "size, kept, written, refused",
    [
        (3, 1, 0.666667, [1 - 1 / 3, 0.66667, 0.6666667]),  # 6 decimals, no more, no fewer
        (3, 2, 0.333333, [1 - 2 / 3, 0.3333333]),
        (4, 4, 0.0, [1e-7, 0.000001]),
        (3_000_000, 1, 0.999999, [1 - 1 / 3_000_000, 0.9999997]),  # capped below 1
    ],
)
def test_the_sparsity_must_be_the_value_prunecore_writes(size, kept, written, refused):
    plan = Plan({"g": GroupPlan(size, tuple(range(kept)))}, (InputSpec((1, 3)),), "Net")
    assert plan.to_dict()["groups"]["g"]["sparsity"] == written
    d = minimal({"g": {"size": size, "keep": list(range(kept)), "sparsity": written}})
    assert Plan.from_json(json.dumps(d)) == Plan.from_dict(d)
    for value in refused:
        d["groups"]["g"]["sparsity"] = value
        with pytest.raises(PlanError, match=rf"groups\['g'\].sparsity does not match .* keeping {kept} of {size}"):
            Plan.from_json(json.dumps(d))


# -- duplicate keys -----------------------------------------------------------------------------------
def test_a_duplicate_schema_key_is_refused_whichever_comes_last():
    body = json.dumps(concat_dict())[1:]  # without its opening brace
    for first in ('"prunecore.plan/1"', '"prunecore.plan/0"'):
        with pytest.raises(PlanError, match=r"^plan is not valid JSON: plan has the key 'schema' twice$"):
            Plan.from_json('{"schema": ' + first + ", " + body)


@pytest.mark.parametrize(
    "container, key, where",
    [
        (("groups", "a.0"), "keep", r"groups\['a.0'\]"),
        (("groups",), "a.0", "groups"),
        (("model",), "type", "model"),
        (("meta",), "note", "meta"),
        (("metrics", "predicted"), "accuracy", "metrics.predicted"),
        (("allocation", "budget"), "flops", r"allocation.budget"),
    ],
)
def test_a_duplicate_key_is_refused_naming_where(container, key, where):
    d = concat_dict()
    d["meta"] = {"note": "x"}
    d["metrics"]["predicted"] = {"accuracy": 0.5}
    d["allocation"] = {"method": "dp", "budget": {"flops": 0.5}, "metric": "accuracy"}
    target = d
    for step in container:
        target = target[step]
    marker = "@@twice@@"
    target[marker] = None
    value = json.dumps(target[key])
    text = json.dumps(d).replace(f'"{marker}": null', f'"{key}": {value}')
    with pytest.raises(PlanError, match=rf"^plan is not valid JSON: {where} has the key '{key}' twice$"):
        Plan.from_json(text)


def test_a_duplicate_key_inside_a_dropped_duplicate_is_still_reported():
    text = json.dumps(concat_dict())[:-1] + ', "meta": {"a": 1, "a": 2}, "meta": {}}'
    with pytest.raises(PlanError, match="twice"):
        Plan.from_json(text)


# -- kept counts and round_to -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, kept, round_to, ok",
    [
        (64, 48, 8, True),
        (64, 45, 8, False),
        (6, 6, 8, True),  # smaller than round_to: kept whole
        (12, 8, 8, True),
        (12, 12, 8, True),  # the whole group, not a multiple
        (12, 4, 8, False),  # below one multiple
        (10, 3, 1, True),
        (10, 5, 2, False),
    ],
)
def test_kept_counts_must_be_what_kept_units_can_give(size, kept, round_to, ok):
    reachable = {kept_units(size, s / 1000, round_to) for s in range(1000)}
    assert (kept in reachable) == ok  # the rule is exactly the rounding rule's range
    d = minimal({"g": {"size": size, "keep": list(range(kept))}}, round_to=round_to)
    if ok:
        assert len(Plan.from_dict(d).groups["g"].keep) == kept
        return
    message = rf"groups\['g'\] keeps {kept} of {size} units, which is not a multiple of round_to \({round_to}\)"
    with pytest.raises(PlanError, match=message):
        Plan.from_json(json.dumps(d))


def test_changing_round_to_of_a_written_plan_is_refused():
    d = concat_dict(round_to=2)  # a.0 keeps 2 of 4, b.0 4 of 6, fuse.0 2 of 5
    Plan.from_dict(d)
    d["round_to"] = 4
    with pytest.raises(PlanError, match=r"not a multiple of round_to \(4\)"):
        Plan.from_dict(d)


def test_check_refuses_a_hand_built_plan_off_its_round_to():
    model, graph = traced(toys.Concat)
    plan = Plan({"b.0": GroupPlan(6, (0, 1, 2))}, graph.inputs, "Concat", round_to=2, fingerprint=graph.fingerprint)
    with pytest.raises(PlanError, match=r"plan group 'b.0' keeps 3 of 6 units, which is not a multiple of round_to"):
        plan.check(graph)


# -- unknown metrics: NaN is written as null -----------------------------------------------------------
def test_unknown_metrics_are_written_as_null_and_read_back_as_nan():
    model, graph = traced(toys.Concat)
    plan = make_plan(model, graph, 0.5)
    groups = {name: GroupPlan(g.size, g.keep, g.channels, math.nan) for name, g in plan.groups.items()}
    plan = Plan(groups, plan.inputs, plan.model_type, predicted={"accuracy": math.nan, "loss": np.float32("inf")},
                measured={"accuracy": float("-inf"), "kl": 0.25})  # fmt: skip
    text = plan.to_json()
    data = strict_loads(text)  # strict JSON
    assert data["metrics"]["predicted"] == {"accuracy": None, "loss": None}
    assert data["metrics"]["measured"] == {"accuracy": None, "kl": 0.25}
    assert all(g["predicted_change"] is None for g in data["groups"].values())
    VALIDATOR.validate(data)
    again = Plan.from_json(text)
    assert again == plan and again.to_json() == text
    assert math.isnan(again.predicted["accuracy"]) and math.isnan(again.predicted["loss"])
    assert math.isnan(again.measured["accuracy"]) and again.measured["kl"] == 0.25
    assert all(g.predicted_change is None for g in again.groups.values())


def test_an_allocation_from_all_nan_curves_round_trips():
    model, graph = traced(toys.TwoResiduals)
    curves = synthetic_curves(graph, round_to=1, nan=True)
    for method in pc.list_methods():
        plan = pc.allocate(curves, graph, pc.Budget(flops=0.6), method, model=model)
        assert plan.predicted and all(math.isnan(v) for v in plan.predicted.values()), method
        text = plan.to_json()
        assert Plan.from_json(text) == plan and VALIDATOR.is_valid(strict_loads(text)), method


def test_a_non_finite_meta_value_cannot_be_written_and_the_error_names_it():
    plan = Plan({}, (InputSpec((1, 3)),), "Net", meta={"run": {"scores": [1.0, math.inf]}})
    with pytest.raises(PlanError, match=r"plan cannot be written: meta.run.scores\[1\] is inf"):
        plan.to_json()


# -- non-finite and out-of-range numbers name the field ------------------------------------------------
BIG_INT = "9" * 30  # fits no int64 (and 400 digits fit no float)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
@pytest.mark.parametrize(
    "path, where",
    [
        (("groups", "a.0", "sparsity"), r"groups\['a.0'\].sparsity"),
        (("groups", "a.0", "size"), r"groups\['a.0'\].size"),
        (("groups", "a.0", "keep", 1), r"groups\['a.0'\].keep\[1\]"),
        (("groups", "a.0", "predicted_change"), r"groups\['a.0'\].predicted_change"),
        (("round_to",), "round_to"),
        (("inputs", 0, "shape", 1), r"inputs\[0\].shape\[1\]"),
        (("allocation", "budget", "flops"), "allocation.budget.flops"),
        (("totals", "params_after"), "totals.params_after"),
        (("metrics", "measured", "accuracy"), "metrics.measured.accuracy"),
        (("meta", "my key"), r"meta\['my key'\]"),
    ],
)
def test_a_non_finite_literal_is_refused_naming_the_field(literal, path, where):
    with pytest.raises(PlanError, match=rf"^plan is not valid JSON: {where} is {literal}, which"):
        Plan.from_json(with_literal(filled_dict(), path, literal))


@pytest.mark.parametrize(
    "path, message",
    [
        (("groups", "a.0", "size"), r"groups\['a.0'\].size is out of range: above 2\*\*63 - 1"),
        (("groups", "a.0", "channels_before"), r"groups\['a.0'\].channels_before"),
        (("round_to",), r"round_to is out of range"),
        (("inputs", 0, "shape", 0), r"inputs\[0\].shape\[0\] is out of range"),
        (("totals", "flops_before"), r"totals.flops_before is out of range"),
    ],
)
@pytest.mark.parametrize("literal", [BIG_INT, "9" * 400, str(2**63)])
def test_an_integer_out_of_range_is_refused_naming_the_field(path, message, literal):
    with pytest.raises(PlanError, match=message):
        Plan.from_json(with_literal(filled_dict(), path, literal))


@pytest.mark.parametrize(
    "path, message",
    [
        (("groups", "a.0", "predicted_change"), r"groups\['a.0'\].predicted_change must be a number"),
        (("metrics", "predicted", "accuracy"), "metrics.predicted.accuracy must be a number or null"),
        (("allocation", "budget", "flops"), "allocation.budget.flops must be a positive number"),
    ],
)
def test_an_integer_too_large_for_a_float_field_is_refused_naming_it(path, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_json(with_literal(filled_dict(), path, "9" * 400))


def test_the_largest_int64_is_in_range():
    top = 2**63 - 1
    d = minimal({"g": {"size": top, "keep": [0], "channels_before": top}}, round_to=1)
    d["totals"] = {"params_before": top, "params_after": 0, "flops_before": top, "flops_after": 0}
    plan = Plan.from_dict(d)
    assert plan.groups["g"].size == top and Plan.from_json(plan.to_json()) == plan
    VALIDATOR.validate(plan.to_dict())


def filled_dict() -> dict:
    """Concat's plan with every optional part present."""
    d = concat_dict()
    d["groups"]["a.0"]["predicted_change"] = -0.01
    d["allocation"] = {"method": "dp", "budget": {"flops": 0.5}, "metric": "accuracy"}
    d["totals"] = {"params_before": 10, "params_after": 5, "flops_before": 100, "flops_after": 50}
    d["metrics"] = {"predicted": {"accuracy": 0.9}, "measured": {"accuracy": 0.8}}
    d["meta"] = {"my key": 1}
    return d


def with_literal(d: dict, path: tuple, literal: str) -> str:
    target = d
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = "@@literal@@"
    return json.dumps(d).replace('"@@literal@@"', literal)


# -- property: damaged plan text is a PlanError or a plan that round-trips ------------------------------
class Obj:
    """A JSON object as a list of [key, value] pairs, so that a key can occur twice."""

    def __init__(self, pairs: list[list]) -> None:
        self.pairs = pairs


class Raw(str):
    """A token written as is (NaN, 1e400), not as a JSON string."""


def to_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return Obj([[k, to_tree(v)] for k, v in value.items()])
    if isinstance(value, list):
        return [to_tree(v) for v in value]
    return value


def render(node: Any) -> str:
    if isinstance(node, Obj):
        return "{" + ", ".join(f"{json.dumps(k)}: {render(v)}" for k, v in node.pairs) + "}"
    if isinstance(node, list):
        return "[" + ", ".join(render(v) for v in node) + "]"
    if isinstance(node, Raw):
        return str(node)
    return json.dumps(node)


def children(node: Any) -> list:
    """(container, slot) of each child: a pair [key, value] of an object (slot 1), or a list index."""
    if isinstance(node, Obj):
        return [(pair, 1) for pair in node.pairs]
    if isinstance(node, list):
        return [(node, i) for i in range(len(node))]
    return []


def slots(tree: Any) -> list[tuple[Any, Any, Any]]:
    """Every (parent, container, slot) below the root, without recursion."""
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        for container, slot in children(node):
            out.append((node, container, slot))
            stack.append(container[slot])
    return out


NUMBERS = st.sampled_from(
    [Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-1e400"), Raw("9" * 400), Raw("-0.0"),
     -1, -0.5, 0, 0.5 + 5e-5, 1e-300, 2**63, 2**63 - 1, 10**30, 1.0, 3.5]
)  # fmt: skip
OTHER_TYPES = st.sampled_from(["x", "", None, True, False, 1.5, 3, "prunecore.plan/1"])
OTHER_TYPES |= st.builds(list) | st.builds(Obj, st.builds(list))  # fresh containers: mutate() edits in place


def mutate(data: st.DataObject, tree: Obj) -> None:
    """Drop or duplicate a key, break a number, change a type, or damage a keep list; in place."""
    op = data.draw(st.sampled_from(["drop", "duplicate", "number", "type", "keep"]))
    places = slots(tree)
    if op == "drop":
        parent, container, slot = data.draw(st.sampled_from(places))
        if isinstance(parent, Obj):
            parent.pairs.remove(container)
        else:
            del container[slot]
    elif op == "duplicate":
        objects = [tree] + [c[s] for _, c, s in places if isinstance(c[s], Obj) and c[s].pairs]
        obj = data.draw(st.sampled_from(objects))
        key, value = data.draw(st.sampled_from(obj.pairs))
        copy = value if data.draw(st.booleans()) else data.draw(OTHER_TYPES | NUMBERS)
        obj.pairs.insert(data.draw(st.integers(0, len(obj.pairs))), [key, copy])
    elif op == "number":
        numbers = [(c, s) for _, c, s in places if type(c[s]) in (int, float)]
        if numbers:
            container, slot = data.draw(st.sampled_from(numbers))
            container[slot] = data.draw(NUMBERS)
    elif op == "type":
        _, container, slot = data.draw(st.sampled_from(places))
        container[slot] = data.draw(OTHER_TYPES.filter(lambda v: type(v) is not type(container[slot])))
    else:
        keeps = [c[s] for p, c, s in places if isinstance(p, Obj) and c[0] == "keep" and isinstance(c[s], list)]
        if keeps:
            keep = data.draw(st.sampled_from(keeps))
            how = data.draw(st.sampled_from(["shuffle", "out", "repeat", "empty"]))
            if how == "shuffle":
                keep[:] = data.draw(st.permutations(keep))
            elif how == "out":
                keep.append(data.draw(st.sampled_from([4, 5, 6, 8, 10**6, -1, 2**63, Raw("1e400")])))  # sizes: 4-8
            elif how == "repeat" and keep:
                keep.append(keep[0])
            else:
                keep.clear()


@functools.cache
def base_texts() -> tuple[str, ...]:
    """Valid plans to damage: plain, with round_to, with every optional part and unknown (null) metrics."""
    out = []
    for cls, round_to in [(toys.Concat, 1), (toys.TwoResiduals, 2), (toys.Grouped, 2)]:
        model, graph = traced(cls)
        out.append(make_plan(model, graph, 0.5, round_to=round_to).to_json())
    full = filled_dict()
    full["metrics"]["predicted"]["loss"] = None
    out.append(json.dumps(full))
    return tuple(out)


@PROPERTY
@given(st.integers(0, 3), st.data())
def test_damaged_plan_text_gives_a_plan_that_round_trips_or_a_plan_error(base, data):
    tree = to_tree(json.loads(base_texts()[base]))
    for _ in range(data.draw(st.integers(1, 3))):
        mutate(data, tree)
    text = render(tree)
    if data.draw(st.booleans()):
        text = text.encode()
    try:
        plan = Plan.from_json(text)
    except PlanError:
        return
    strict_loads(text)  # what was accepted had no NaN, no Infinity and no key twice
    again = plan.to_json()
    assert Plan.from_json(again) == plan
    assert Plan.from_json(again).to_json() == again
    VALIDATOR.validate(strict_loads(again))


# -- property: every plan prunecore makes passes the checks and round-trips exactly --------------------
@st.composite
def made_plans(draw) -> tuple[Plan, pc.ChannelGraph, dict[str, float]]:
    model, graph = traced(draw(st.sampled_from(SMALL_TOYS)))
    fractions = st.floats(0.0, 0.999, exclude_max=True) | st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9, 0.99])
    sparsities = {g.name: draw(fractions) for g in graph.prunable if draw(st.booleans())}
    round_to = draw(st.integers(1, 8))
    return make_plan(model, graph, sparsities, round_to=round_to), graph, sparsities


@settings(PROPERTY, max_examples=100)
@given(made_plans())
def test_every_plan_make_plan_makes_passes_the_checks_and_round_trips(made):
    plan, graph, sparsities = made
    for name, s in sparsities.items():
        assert len(plan.groups[name].keep) == kept_units(graph[name].size, s, plan.round_to)
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan and again.to_json() == text
    again.check(graph)
    VALIDATOR.validate(strict_loads(text))


def synthetic_curves(graph: pc.ChannelGraph, round_to: int, nan: bool = False) -> pd.DataFrame:
    """Curves in sweep()'s layout, measured at kept counts of `round_to` (all NaN when `nan`)."""
    rows = [{"group": pc.DENSE, "sparsity": 0.0, "kept": None, "size": None, "accuracy": 0.98, "loss": 0.1}]
    for i, g in enumerate(graph.prunable):
        for s in (0.2, 0.4, 0.6, 0.8, 0.9):
            f = 1 - kept_units(g.size, s, round_to) / g.size
            rows.append({"group": g.name, "sparsity": s, "kept": kept_units(g.size, s, round_to), "size": g.size,
                         "accuracy": 0.98 - (i + 1) * 0.1 * f**2, "loss": 0.1 + (i + 1) * f**2})  # fmt: skip
    frame = pd.DataFrame(rows)
    if nan:
        frame[["accuracy", "loss"]] = math.nan
    frame.attrs["config"] = {"criterion": "l1", "round_to": round_to}
    return frame


@pytest.mark.parametrize("round_to", [1, 2, 4])
@pytest.mark.parametrize("method", pc.list_methods())
def test_every_plan_allocate_makes_passes_the_checks_and_round_trips(method, round_to):
    model, graph = traced(toys.TwoResiduals)
    problem = pc.allocation_problem(synthetic_curves(graph, round_to), graph, model)
    for budget in (0.9, 0.6, 0.4):
        try:
            plan = pc.solve(problem, pc.Budget(flops=budget), method)
        except pc.AllocationError:
            continue  # a budget below what the bounds allow
        text = plan.to_json()
        again = Plan.from_json(text)
        assert again == plan and again.to_json() == text
        again.check(graph)
