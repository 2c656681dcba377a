"""The corrected predictor: exact on a known truth, monotone, banded, serialisable, and what allocation minimises."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

import prunecore as pc
from prunecore.errors import UserError
from prunecore.predict import (
    CALIBRATION_METHODS,
    MIN_PLANS,
    Measurement,
    PredictionError,
    Predictor,
    calibrate,
    calibration_plans,
    fit,
    _weights,
    objective_problem,
)
from toy_models import TwoResiduals, randomize_norms_

pytestmark = pytest.mark.usefixtures("one_thread")
LEVELS = (0.2, 0.4, 0.6, 0.8, 0.9)
L0, A0 = 0.1, 0.98


def curves_of(graph: pc.ChannelGraph, seed: int = 0) -> pd.DataFrame:
    """Loss curves rising as a * f ** k, different per group, in sweep()'s layout (accuracy follows the loss)."""
    rng = np.random.default_rng(seed)
    rows = [{"group": pc.DENSE, "sparsity": 0.0, "kept": None, "size": None, "accuracy": A0, "loss": L0}]
    for g in graph.prunable:
        a, k = rng.uniform(0.1, 2.0), rng.uniform(1.0, 3.0)
        for s in LEVELS:
            kept = pc.kept_units(g.size, s)
            loss = L0 + a * (1 - kept / g.size) ** k
            rows.append({"group": g.name, "sparsity": s, "kept": kept, "size": g.size, "loss": loss,
                         "accuracy": accuracy_of(loss)})  # fmt: skip
    return pd.DataFrame(rows)


def accuracy_of(loss: float) -> float:
    """The truth's loss -> accuracy map: strictly decreasing, like measured plans."""
    return 0.1 + (A0 - 0.1) * float(np.exp(-(loss - L0)))


@pytest.fixture(scope="module")
def problem() -> pc.AllocationProblem:
    torch.manual_seed(0)
    model = randomize_norms_(TwoResiduals())
    graph = pc.trace(model, model.example())
    return pc.allocation_problem(curves_of(graph), graph, model)


def truth(problem: pc.AllocationProblem, sparsities: dict[str, float], q: float = 0.5, p: float = 2.0,
          noise: float = 0.0, rng: np.random.Generator | None = None,
          ceiling: float = np.inf) -> dict[str, float]:  # fmt: skip
    """Compounding truth: L = L0 + (sum_i dL_i ** q) ** p, optionally saturating and with relative noise.

    dL_i ** q is interpolated between the curve's points, as the predictor's terms are. With a
    finite `ceiling` c the rise saturates as c (1 - exp(-rise / c)), as a loss does near chance.
    """
    z = 0.0
    for name, s in sparsities.items():
        curve, size = problem.curves[name], problem.graph[name].size
        z += float(np.interp(1 - pc.kept_units(size, s) / size, curve.fractions, (curve.values["loss"] - L0) ** q))
    loss = L0 + (z**p if np.isinf(ceiling) else ceiling * -np.expm1(-(z**p) / ceiling))
    if noise:
        assert rng is not None
        loss *= float(np.exp(rng.normal(0.0, noise)))
    return {"loss": loss, "accuracy": accuracy_of(loss)}


def measured(problem: pc.AllocationProblem, n: int, seed: int, **kw) -> list[Measurement]:
    rng = np.random.default_rng(seed + 100)
    return [Measurement(s, truth(problem, s, rng=rng, **kw)) for s in calibration_plans(problem, n, seed)]


def test_recovers_a_known_compounding_truth_exactly(problem):
    plans = measured(problem, 30, seed=0)
    predictor = fit(problem, plans)
    assert (predictor.exponent, predictor.power) == (0.5, 2.0)
    deepest = max(m.metrics["loss"] for m in plans)
    for s in calibration_plans(problem, 20, seed=7, methods={}):
        want, got = truth(problem, s), predictor.predict(s)
        assert got["loss"].value == pytest.approx(want["loss"], rel=1e-6)
        if want["loss"] <= deepest:  # the accuracy map is measured knots, interpolated; extrapolated beyond them
            assert got["accuracy"].value == pytest.approx(want["accuracy"], abs=0.02)
        assert got["loss"].low <= got["loss"].value <= got["loss"].high


def test_a_saturating_truth_is_not_overshot_past_the_deepest_plan(problem):
    ceiling = 1.5
    shallow = [s for s in calibration_plans(problem, 60, seed=3) if truth(problem, s)["loss"] < L0 + 1.0]
    predictor = fit(problem, [Measurement(s, truth(problem, s, ceiling=ceiling)) for s in shallow])
    assert predictor.ceiling < 10 * ceiling  # CV picks a saturating link
    deepest = {name: 0.9 for name in problem.curves}
    want = truth(problem, deepest, ceiling=ceiling)["loss"]
    assert predictor.predict(deepest)["loss"].value == pytest.approx(want, rel=0.25)
    assert predictor.predict(deepest)["loss"].value <= L0 + predictor.ceiling


def test_predictions_are_monotone_in_each_groups_sparsity(problem):
    predictor = fit(problem, measured(problem, 30, seed=1, noise=0.1))
    rng = np.random.default_rng(3)
    for s in calibration_plans(problem, 10, seed=5, methods={}):
        name = str(rng.choice(list(s)))
        before = predictor.predict(s)
        after = predictor.predict({**s, name: min(s[name] + 0.3, 0.9)})
        assert after["loss"].value >= before["loss"].value
        assert after["accuracy"].value <= before["accuracy"].value
        assert after["accuracy"].low <= before["accuracy"].low + 1e-12


def test_band_covers_fresh_plans_at_about_its_level(problem):
    predictor = fit(problem, measured(problem, 40, seed=2, noise=0.1))
    rng = np.random.default_rng(11)
    inside = []
    for s in calibration_plans(problem, 100, seed=9, methods={}):
        want, got = truth(problem, s, noise=0.1, rng=rng), predictor.predict(s)
        inside.append(got["loss"].low <= want["loss"] <= got["loss"].high)
    assert 0.8 <= np.mean(inside) <= 1.0
    assert predictor.bands["loss"] > 0.05  # the noise (sd 0.1 in log) shows in the band


def test_accuracy_map_keeps_falling_past_the_deepest_plan_towards_chance(problem):
    plans = measured(problem, 30, seed=0)
    predictor = fit(problem, plans)
    deepest = max(m.metrics["loss"] for m in plans)
    losses = deepest + np.array([0.0, 0.2, 0.5, 1.0, 3.0, 10.0])
    knots = predictor.maps["accuracy"]
    got = np.interp(losses, *knots)
    assert np.all(np.diff(got) < 0)  # strictly falling, not flat past the deepest measured plan
    assert got[-1] >= 0.0
    assert got[2] == pytest.approx(accuracy_of(losses[2]), abs=0.05)  # the truth's own fall, roughly
    assert np.all(np.diff(knots[0]) >= 0) and np.all(np.diff(knots[1]) <= 0)  # one monotone curve


def test_band_widens_with_depth_where_residuals_do(problem):
    rng = np.random.default_rng(5)
    plans = []
    for s in calibration_plans(problem, 40, seed=2):
        m = truth(problem, s)
        depth = m["loss"] - L0
        acc = float(np.clip(m["accuracy"] + rng.normal(0.0, 0.01 + 0.05 * depth), 0.0, 1.0))  # noise grows with depth
        plans.append(Measurement(s, {"loss": m["loss"], "accuracy": acc}))
    predictor = fit(problem, plans)
    assert predictor.scales["accuracy"] > 0.0
    shallow, deep = predictor.predict_score(0.2)["accuracy"], predictor.predict_score(1.0)["accuracy"]
    assert deep.high - deep.low > shallow.high - shallow.low
    inside = [p.low <= p.value <= p.high for p in (shallow, deep)]
    assert all(inside)


def test_a_group_cut_in_few_plans_is_pulled_harder_to_the_shared_weight():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 1.0, size=(40, 2))  # (N, G)
    x[1:, 1] = 0.0  # group 1 cut in one plan only, where it seems to cost 3x the others
    rise = x[:, 0] + 3.0 * x[:, 1]
    u = _weights(x, rise, p=1.0, ridge=0.3, ceiling=np.inf)
    x2 = x.copy()
    x2[:, 1] = np.where(np.arange(40) % 2 == 0, x[0, 1], 0.0)  # the same evidence spread over 20 plans
    u2 = _weights(x2, x2[:, 0] + 3.0 * x2[:, 1], p=1.0, ridge=0.3, ceiling=np.inf)
    assert abs(u[1] - 1.0) < abs(u2[1] - 1.0)


def test_calibration_plans_reach_the_deepest_budget_with_every_method(problem):
    plans = calibration_plans(problem, 10, seed=0)
    f0 = problem.cost.dense[1]
    kept = [problem.price(s)[1] / f0 for s in plans]
    assert all(0.3 - 1e-9 <= k <= 0.9 + 1e-9 for k in kept[:10])  # the random ones
    assert min(kept) <= min(min(b) for b in CALIBRATION_METHODS.values()) + 1e-9
    keys = [tuple(sorted(problem.kept(s).items())) for s in plans]
    assert len(set(keys)) == len(keys)  # each plan measured once
    assert 10 < len(plans) <= 10 + sum(len(b) for b in CALIBRATION_METHODS.values())


def test_calibrate_measures_two_rounds_and_reports_progress(problem):
    calls = []
    measured = []

    def measure(sparsities):
        measured.append(dict(sparsities))
        return truth(problem, dict(sparsities))

    predictor = calibrate(None, problem, [], n=16, seed=0, progress=lambda done, total: calls.append((done, total)),
                          measure=measure)  # fmt: skip
    assert predictor.plans == len(measured) > 16
    assert [done for done, _ in calls] == list(range(1, len(measured) + 1))
    assert calls[-1] == (len(measured), len(measured))
    assert all(done <= total for done, total in calls)
    keys = [tuple(sorted(problem.kept(s).items())) for s in measured]
    assert len(set(keys)) == len(keys)
    for s in calibration_plans(problem, 5, seed=8, methods={}):
        assert predictor.predict(s)["loss"].value == pytest.approx(truth(problem, s)["loss"], rel=1e-6)


def test_reference_carries_the_dense_gap_over(problem):
    reference = {"loss": 0.15, "accuracy": 0.95}
    predictor = fit(problem, measured(problem, 20, seed=0), reference=reference)
    dense = predictor.predict({})
    assert dense["loss"].value == pytest.approx(0.15)
    assert dense["accuracy"].value == pytest.approx(0.95)


def test_round_trips_through_json(problem):
    predictor = fit(problem, measured(problem, 20, seed=4, noise=0.05), reference={"loss": 0.2, "accuracy": 0.9})
    again = Predictor.from_dict(json.loads(json.dumps(predictor.to_dict())))
    assert again.to_dict() == predictor.to_dict()
    for s in calibration_plans(problem, 5, seed=6, methods={}):
        assert again.predict(s) == predictor.predict(s)


def test_clear_errors(problem):
    plans = measured(problem, MIN_PLANS, seed=0)
    with pytest.raises(PredictionError, match=f"at least {MIN_PLANS}"):
        fit(problem, plans[: MIN_PLANS - 1])
    with pytest.raises(PredictionError, match="lacks metric"):
        fit(problem, [Measurement(m.sparsities, {"loss": m.metrics["loss"]}) for m in plans])
    predictor = fit(problem, plans)
    with pytest.raises(PredictionError, match="no curve for group"):
        predictor.predict({"no.such.group": 0.5})
    with pytest.raises(PredictionError, match="format"):
        Predictor.from_dict({"format": "something else"})
    with pytest.raises(PredictionError, match="malformed"):
        Predictor.from_dict({**predictor.to_dict(), "groups": {"x": {"size": 3}}})
    assert issubclass(PredictionError, UserError)


def test_allocation_on_the_objective_maximises_the_corrected_prediction(problem):
    predictor = fit(problem, measured(problem, 30, seed=0))
    corrected = objective_problem(problem, predictor)
    name = next(iter(predictor.groups))
    kept = np.array([problem.graph[name].size // 2])
    fraction = 1 - kept / problem.graph[name].size
    np.testing.assert_allclose(corrected.damage(name, kept), predictor.term(name, fraction))
    for budget in (0.7, 0.5):
        new = pc.solve(corrected, pc.Budget(flops=budget), "dp")
        old = pc.solve(problem, pc.Budget(flops=budget), "dp")
        assert new.totals.flops_after <= budget * new.totals.flops_before
        assert predictor.score(new.sparsities) <= predictor.score(old.sparsities) + 1e-9
        better, worse = predictor.predict(new.sparsities), predictor.predict(old.sparsities)
        assert better["accuracy"].value >= worse["accuracy"].value


def test_a_problem_with_a_predictor_predicts_and_plans_with_it_and_refuses_one_for_other_curves(problem):
    predictor = fit(problem, measured(problem, 30, seed=0))
    corrected = pc.with_predictor(problem, predictor)
    plan = pc.solve(corrected, pc.Budget(flops=0.5), "greedy")
    band = corrected.predict_band(plan.sparsities)
    assert plan.predicted == corrected.predict(plan.sparsities) == {m: p.value for m, p in band.items()}
    assert band == predictor.predict(plan.sparsities) and problem.predict_band(plan.sparsities) == {}
    assert problem.predict(plan.sparsities) != corrected.predict(plan.sparsities)  # the additive sum differs
    assert pc.with_predictor(corrected, None).predict(plan.sparsities) == problem.predict(plan.sparsities)
    assert plan.band == {m: (p.low, p.high) for m, p in band.items()}  # the plan file carries the band
    assert plan.predicted_by == pc.PredictedBy("calibrated", predictor.plans)
    additive = pc.solve(problem, pc.Budget(flops=0.5), "greedy")
    assert (additive.band, additive.predicted_by) == ({}, pc.PredictedBy("additive"))
    assert pc.Plan.from_json(plan.to_json()) == plan
    groups = dict(list(predictor.to_dict()["groups"].items())[1:])  # one group's term left out
    fewer = Predictor.from_dict({**predictor.to_dict(), "groups": groups})
    with pytest.raises(pc.AllocationError, match="fitted on other curves .no term for group"):
        pc.with_predictor(problem, fewer)


def test_report_prices_predicts_and_flags_a_slider_state(problem):
    predictor = fit(problem, measured(problem, 30, seed=0))
    corrected = pc.with_predictor(problem, predictor)
    names = list(problem.curves)
    deep = {n: 0.6 for n in names}
    report = corrected.report(deep, pc.Budget(flops=0.99))
    assert (report.params, report.flops) == corrected.price(deep)
    assert report.kept == corrected.kept(deep) and report.dense_flops == problem.cost.dense[1]
    assert report.predicted == corrected.predict(deep) and report.band == corrected.predict_band(deep)
    assert report.predicted_by == pc.PredictedBy("calibrated", predictor.plans)
    assert not report.over_budget and report.beyond == ()  # 0.6 is inside every curve (swept to 0.9)
    assert report.kept_fraction("flops") == report.flops / report.dense_flops
    assert corrected.report(deep, pc.Budget(flops=report.kept_fraction("flops") / 2)).over_budget
    assert corrected.report(deep, pc.Budget(params=report.params)).over_budget is False  # exactly at the budget
    assert not problem.report(deep).over_budget  # no budget: nothing to be over

    torch.manual_seed(0)
    model = randomize_norms_(TwoResiduals())
    graph = pc.trace(model, model.example())
    curves = curves_of(graph)
    shallow = pc.allocation_problem(curves[curves.sparsity <= 0.4], graph, model)  # swept to 0.4 only
    light = shallow.report({names[0]: 0.2, names[1]: 0.6})
    assert light.beyond == (names[1],) and light.band == {}
    assert light.predicted_by == pc.PredictedBy("additive")


def test_by_sensitivity_puts_the_groups_half_a_cut_harms_most_first(problem):
    names = list(problem.cost.groups)
    ranked = problem.by_sensitivity(reversed(names))
    harm = [problem.change(n, 0.5, "loss") for n in ranked if n in problem.curves]
    assert sorted(ranked) == sorted(names) and harm == sorted(harm, reverse=True)


def test_accuracy_map_follows_the_predicted_loss_where_measured_loss_is_noisy(problem, monkeypatch):
    """Accuracy follows the plan's true damage, the measured loss is that plus noise: the map on fitted loss wins."""
    rng = np.random.default_rng(21)

    def noisy(s: dict[str, float]) -> dict[str, float]:
        exact = truth(problem, s)
        return {"loss": exact["loss"] * float(np.exp(rng.normal(0.0, 0.15))), "accuracy": exact["accuracy"]}

    plans = [Measurement(s, noisy(s)) for s in calibration_plans(problem, 40, seed=2)]
    fresh = calibration_plans(problem, 30, seed=12, methods={})

    def error(predictor: Predictor) -> float:
        errors = [abs(predictor.predict(s)["accuracy"].value - truth(problem, s)["accuracy"]) for s in fresh]
        return float(np.mean(errors))

    chosen = fit(problem, plans)
    monkeypatch.setattr("prunecore.predict._MAP_ON_FIT", (False,))
    on_measured = fit(problem, plans)
    assert error(chosen) < 0.8 * error(on_measured)
    assert chosen.maps["accuracy"] != on_measured.maps["accuracy"]



def test_calibrate_measures_plans_the_way_the_sweep_measured_its_points(problem, monkeypatch):
    """The sweep's device, autocast and layout reach every `evaluate_plan` of the calibration."""
    seen = []

    def evaluate_plan(model, plan, data, metrics, **how):
        seen.append({k: how[k] for k in ("device", "autocast", "channels_last")})
        return truth(problem, {n: g.sparsity for n, g in plan.groups.items()})

    monkeypatch.setattr(importlib.import_module("prunecore.evaluate"), "evaluate_plan", evaluate_plan)
    calibrate(None, problem, [], n=12, device="cpu", autocast="bf16", channels_last=True)
    assert len(seen) > 12 and all(s == {"device": "cpu", "autocast": "bf16", "channels_last": True} for s in seen)
