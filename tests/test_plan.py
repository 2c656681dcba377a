"""The one rounding rule, and the plan format's validation."""

import json

import pytest

import toy_models as toys
from prunecore.graph import trace
from prunecore.plan import Plan, PlanError, kept_units
from prunecore.prune import make_plan


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


@pytest.fixture(scope="module")
def plan_dict():
    model = toys.Concat().eval()
    graph = trace(model, model.example())
    return make_plan(model, graph, 0.5).to_dict()


def mutate(d, path, value):
    d = json.loads(json.dumps(d))
    target = d
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(d)


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("schema",), "prunecore.plan/0", "schema must be"),
        (("model_type",), KeyError, "missing 'model_type'"),
        (("extra",), 1, "unknown field"),
        (("inputs",), [], "inputs must be a non-empty list"),
        (("inputs", 0, "shape"), [1, -3], "positive integers"),
        (("round_to",), 0, "round_to"),
        (("groups",), [], "groups must be an object"),
        (("groups", "a.0", "keep"), [0, 0], "duplicate"),
        (("groups", "a.0", "keep"), [0, 9], "outside"),
        (("groups", "a.0", "keep"), [], "at least one"),
        (("groups", "a.0", "keep"), ["0"], "list of integers"),
        (("groups", "a.0", "size"), True, "positive integer"),
        (("groups", "a.0", "sparsity"), 1.0, r"sparsity must be in \[0, 1\)"),
        (("groups", "a.0", "sparsity"), 0.9, "does not match"),
        (("groups", "a.0", "colour"), "red", "unknown field"),
    ],
)
def test_malformed_plans_are_rejected_with_a_reason(plan_dict, path, value, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_json(mutate(plan_dict, path, value))


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"plan"', "{'schema': 1}"])
def test_non_json_or_non_object_is_rejected(text):
    with pytest.raises(PlanError):
        Plan.from_json(text)


def test_plan_names_unknown_group():
    model = toys.Concat().eval()
    graph = trace(model, model.example())
    d = make_plan(model, graph, 0.5).to_dict()
    d["groups"]["nope"] = d["groups"].pop("a.0")
    with pytest.raises(PlanError, match="group 'nope', which the model does not have"):
        Plan.from_dict(d).check(graph)


def test_plan_with_wrong_group_size():
    model = toys.Concat().eval()
    graph = trace(model, model.example())
    d = make_plan(model, graph, 0.5).to_dict()
    d["groups"]["a.0"] = {"size": 5, "keep": [0, 1]}
    with pytest.raises(PlanError, match="5 units, the model has 4"):
        Plan.from_dict(d).check(graph)


def test_round_trip_preserves_everything():
    model = toys.Grouped().eval()
    graph = trace(model, model.example())
    plan = make_plan(model, graph, {"reduce.0": 0.5, "expand": 0.3}, criterion="l2", round_to=2)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.groups["reduce.0"].keep == plan.groups["reduce.0"].keep
    assert again.criterion == "l2" and again.round_to == 2
