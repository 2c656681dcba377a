"""Allocation: exact coupled cost, every method meets its budget, bounds hold, dp is optimal, predictions add up."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

import prunecore as pc
from prunecore.allocate import AllocationError, _Search
from prunecore.cost import cost_model
from prunecore.datasets import load_data
from prunecore.prune import keep_top
from toy_models import PRUNABLE_TOYS, Concat, Depthwise, SharedInput, TwoResiduals, randomize_norms_

LEVELS = (0.2, 0.4, 0.6, 0.8, 0.9)


def synthetic_curves(graph: pc.ChannelGraph, seed: int = 0, levels=LEVELS) -> pd.DataFrame:
    """Curves shaped like real ones (damage grows as f**p), different per group, in sweep()'s layout."""
    rng = np.random.default_rng(seed)
    rows = [{"group": pc.DENSE, "sparsity": 0.0, "kept": None, "size": None, "accuracy": 0.98, "loss": 0.1}]
    for g in graph.prunable:
        a, p = rng.uniform(0.1, 3.0), rng.uniform(1.0, 3.0)
        for s in levels:
            f = 1 - pc.kept_units(g.size, s) / g.size
            rows.append({"group": g.name, "sparsity": s, "kept": pc.kept_units(g.size, s), "size": g.size,
                         "accuracy": 0.98 - 0.3 * a * f**p, "loss": 0.1 + a * f**p})  # fmt: skip
    return pd.DataFrame(rows)


def kept_plan(graph: pc.ChannelGraph, scores, kept: dict[str, int]) -> pc.Plan:
    """The plan keeping the `kept[name]` best-scored units of each named group."""
    return pc.Plan({n: keep_top(scores[n], graph[n].size, k) for n, k in kept.items()}, graph.inputs, graph.model_type)


def toy_problem(toy, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = randomize_norms_(toy())
    graph = pc.trace(model, model.example())
    return model, graph, pc.allocation_problem(synthetic_curves(graph, seed), graph, model, **kw)


def harm(problem: pc.AllocationProblem, plan: pc.Plan) -> float:
    """Total predicted damage of a plan under the problem's metric."""
    return sum(
        float(problem.damage(n, np.array([len(g.keep)]))[0]) for n, g in plan.groups.items() if n in problem.curves
    )


# -- the cost model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("toy", PRUNABLE_TOYS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_cost_model_prices_every_kept_vector_as_count_measures_it(toy, criterion):
    torch.manual_seed(0)
    model = toy()
    x = model.example()
    graph = pc.trace(model, x)
    scores = pc.score(model, graph, criterion)
    cm = cost_model(model, x, graph, scores)
    dense = pc.count(model, x)
    assert cm.dense == (dense.params, dense.flops)
    rng = np.random.default_rng(0)
    for _ in range(5):
        kept = {g.name: int(rng.integers(1, g.size + 1)) for g in graph.prunable}
        plan = kept_plan(graph, scores, kept)
        pruned = pc.count(pc.apply_plan(model, plan, graph=graph), x)
        assert cm.price(kept) == (pruned.params, pruned.flops)


def test_cost_model_is_exact_where_units_own_unequal_positions():
    """DenseNet: concatenated inputs; ShuffleNet: shuffled units. Ranking order decides which positions go."""
    for model in (torchvision.models.densenet121(), torchvision.models.shufflenet_v2_x0_5()):
        x = torch.randn(1, 3, 64, 64)
        graph = pc.trace(model, x)
        scores = pc.score(model, graph, "random")
        cm = cost_model(model, x, graph, scores)
        kept = {g.name: max(1, g.size // 3) for g in graph.prunable}
        plan = kept_plan(graph, scores, kept)
        measured = pc.count(model, x, plan=plan, graph=graph)
        assert cm.price(kept) == (measured.params, measured.flops)


def test_cost_model_evaluates_many_kept_vectors_at_once():
    model, graph, problem = toy_problem(TwoResiduals)
    cm = problem.cost
    columns = np.stack([cm.sizes, np.maximum(cm.sizes // 2, 1), np.ones_like(cm.sizes)], axis=1)
    params, flops = cm.evaluate(columns)
    for i in range(3):
        assert (params[i], flops[i]) == cm.price(dict(zip(cm.groups, columns[:, i].tolist())))


# -- every method meets its budget, on toys and on every sample model --------------------------------
@pytest.mark.parametrize("method", pc.list_methods())
@pytest.mark.parametrize("toy", [TwoResiduals, Concat, SharedInput, Depthwise], ids=lambda t: t.__name__)
@pytest.mark.parametrize("budget", [pc.Budget(flops=0.7), pc.Budget(flops=0.4), pc.Budget(params=0.5)], ids=str)
def test_every_method_meets_the_budget_as_count_measures_the_applied_model(method, toy, budget):
    model, graph, problem = toy_problem(toy)
    plan = pc.solve(problem, budget, method)
    x = model.example()
    pruned, dense = pc.count(pc.apply_plan(model, plan), x), pc.count(model, x)
    assert (pruned.params, pruned.flops) == (plan.totals.params_after, plan.totals.flops_after)
    value, whole = (pruned.flops, dense.flops) if budget.kind == "flops" else (pruned.params, dense.params)
    assert value <= budget.target(whole)
    assert pc.Plan.from_json(plan.to_json()) == plan
    assert plan.allocation == pc.Allocation(method, budget, problem.metric)


@pytest.fixture(scope="module")
def sample_problems():
    """Per sample model: (sample, graph, problem) with curves from a real (short) sweep."""
    out = {}
    for name in pc.list_samples():
        s = pc.load_sample(name)
        data = load_data("sample", input_shape=tuple(s.example.shape), limit=64)  # digits, or tinylm's text
        graph = pc.trace(s.model, s.example)
        curves = pc.sweep(s.model, data.evaluation, s.example, levels=[0.45, 0.9], metric=["accuracy", "loss"],
                          graph=graph, progress=False)  # fmt: skip
        out[name] = (s, graph, pc.allocation_problem(curves, graph, s.model))
    return out


@pytest.mark.parametrize("sample", pc.list_samples())
def test_every_method_meets_flops_budgets_on_every_sample_model(sample_problems, sample):
    s, graph, problem = sample_problems[sample]
    dense = pc.count(s.model, s.example)
    for method in pc.list_methods():
        for fraction in (0.7, 0.5):
            plan = pc.solve(problem, pc.Budget(flops=fraction), method)
            pruned = pc.count(pc.apply_plan(s.model, plan, graph=graph), s.example)
            assert pruned.flops <= fraction * dense.flops, (method, fraction)
            assert pruned.flops == plan.totals.flops_after
            assert set(plan.predicted) == {"accuracy", "loss"}


def test_sensitivity_methods_predict_less_damage_than_uniform(sample_problems):
    _, _, problem = sample_problems["resnet20"]
    uniform = harm(problem, pc.solve(problem, pc.Budget(flops=0.5), "uniform"))
    for method in ("dp", "greedy", "threshold"):
        assert harm(problem, pc.solve(problem, pc.Budget(flops=0.5), method)) <= uniform + 1e-12


# -- dp is the optimum; the others are not better ---------------------------------------------------
def brute_force_harm(search: _Search) -> float:
    """Least total damage over every combination of options that meets the budget exactly."""
    combos = list(itertools.product(*(range(len(search.options[g])) for g in search.free)))
    kept = np.repeat(search.hi[:, None], len(combos), axis=1)
    total = np.zeros(len(combos))
    for i, g in enumerate(search.free):
        idx = np.array([c[i] for c in combos])
        kept[g] = search.options[g][idx]
        total += search.harm[g][idx]
    return float(total[search.costs(kept) <= search.target].min())


@pytest.mark.parametrize("toy", [TwoResiduals, SharedInput, Depthwise], ids=lambda t: t.__name__)
@pytest.mark.parametrize("seed", range(4))
def test_dp_finds_the_brute_force_optimum(toy, seed):
    model, graph, problem = toy_problem(toy, seed)
    for fraction in (0.8, 0.6, 0.4):
        budget = pc.Budget(flops=fraction)
        search = _Search.build(problem, budget, True, 0.0, 0.9, {}, ())
        best = brute_force_harm(search)
        assert harm(problem, pc.solve(problem, budget, "dp")) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_dp_is_never_worse_than_the_other_curve_methods(seed):
    for toy in (TwoResiduals, Concat, SharedInput, Depthwise):
        model, graph, problem = toy_problem(toy, seed)
        for fraction in (0.8, 0.6, 0.4):
            budget = pc.Budget(flops=fraction)
            dp = harm(problem, pc.solve(problem, budget, "dp"))
            for other in ("greedy", "threshold", "uniform"):
                assert dp <= harm(problem, pc.solve(problem, budget, other)) + 1e-9, (toy.__name__, fraction, other)


# -- bounds, locks, exclusions ----------------------------------------------------------------------
@pytest.mark.parametrize("method", pc.list_methods())
def test_bounds_locks_and_exclusions_hold(method):
    model, graph, problem = toy_problem(TwoResiduals)
    names = [g.name for g in graph.prunable]
    locked, excluded = names[0], names[1]
    plan = pc.solve(problem, pc.Budget(flops=0.6), method, min_sparsity=0.1, max_sparsity=0.7,
                    locked={locked: 0.5}, exclude=[excluded])  # fmt: skip
    g = plan.groups
    assert len(g[locked].keep) == pc.kept_units(graph[locked].size, 0.5)
    assert len(g[excluded].keep) == graph[excluded].size
    for name in names[2:]:
        size = graph[name].size
        assert pc.kept_units(size, 0.7) <= len(g[name].keep) <= pc.kept_units(size, 0.1)


# -- ties ------------------------------------------------------------------------------------------
class Chain(torch.nn.Module):
    """Four hidden layers of 16: four coupled groups of one size, for ties."""

    def __init__(self) -> None:
        super().__init__()
        widths = (8, 16, 16, 16, 16, 4)
        self.body = torch.nn.Sequential(*[m for a, b in zip(widths, widths[1:]) for m in (torch.nn.Linear(a, b),
                                                                                         torch.nn.ReLU())][:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def chain_problem(seed: int = 0) -> tuple[torch.nn.Module, pc.ChannelGraph, pc.AllocationProblem, list[str]]:
    torch.manual_seed(seed)
    model = Chain()
    graph = pc.trace(model, torch.randn(2, 8))
    names = [g.name for g in graph.prunable]
    assert len(names) == 4
    return model, graph, pc.allocation_problem(synthetic_curves(graph, seed), graph, model), names


@pytest.mark.parametrize("method", pc.list_methods())
def test_tied_groups_keep_one_count_and_the_budget_holds(method):
    """Equal sizes: one count. (Proportional ties: `test_a_tie_keeps_one_fraction_of_groups_of_multiple_sizes`.)"""
    model, graph, problem, names = chain_problem()
    tied = pc.with_ties(problem, [(names[0], names[2])])
    for fraction in (0.8, 0.3):  # 0.3 cannot be met without the tie
        plan = pc.solve(tied, pc.Budget(flops=fraction), method)
        kept = {n: len(plan.groups[n].keep) for n in names}
        assert kept[names[0]] == kept[names[2]], kept
        assert fraction > 0.5 or kept[names[0]] < 16
        pruned = pc.count(pc.apply_plan(model, plan, graph=graph), torch.randn(1, 8))
        assert pruned.flops == plan.totals.flops_after <= fraction * problem.cost.dense[1]


@pytest.mark.parametrize("seed", range(3))
def test_dp_finds_the_brute_force_optimum_under_ties(seed):
    """A tie is one choice whose damage is its groups' sum: dp's optimum over those choices."""
    _, _, problem, names = chain_problem(seed)
    tied = pc.with_ties(problem, [(names[0], names[3]), (names[1], names[2])])
    for fraction in (0.7, 0.4):
        budget = pc.Budget(flops=fraction)
        search = _Search.build(tied, budget, True, 0.0, 0.9, {}, ())
        assert len(search.free) == 2
        plan = pc.solve(tied, budget, "dp")
        assert harm(problem, plan) == pytest.approx(brute_force_harm(search), abs=1e-9)


class Widths(torch.nn.Module):
    """Hidden layers of 4, 8 and 16: a tie of all three keeps one fraction, as BERT's heads and width do."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(8, 4), torch.nn.Linear(4, 8), torch.nn.Linear(8, 16),
                                          torch.nn.Linear(16, 2))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


@pytest.mark.parametrize("method", pc.list_methods())
def test_a_tie_keeps_one_fraction_of_groups_of_multiple_sizes(method):
    torch.manual_seed(0)
    model = Widths()
    graph = pc.trace(model, torch.randn(2, 8))
    names = sorted((g.name for g in graph.prunable), key=lambda n: graph[n].size)
    assert [graph[n].size for n in names] == [4, 8, 16]
    problem = pc.with_ties(pc.allocation_problem(synthetic_curves(graph), graph, model), [names[::-1]])
    assert problem.ties == (tuple(names),)  # the smallest first: it decides
    plan = pc.solve(problem, pc.Budget(flops=0.5), method)
    kept = [len(plan.groups[n].keep) for n in names]
    assert kept[0] < 4 and kept == [kept[0], 2 * kept[0], 4 * kept[0]]
    assert pc.count(pc.apply_plan(model, plan, graph=graph), torch.randn(1, 8)).flops <= 0.5 * problem.cost.dense[1]


def test_a_pinned_group_pins_its_tie_and_bad_ties_are_refused():
    _, graph, problem, names = chain_problem()
    tied = pc.with_ties(problem, [(names[0], names[1])])
    plan = pc.solve(tied, pc.Budget(flops=0.7), "dp", locked={names[1]: 0.25})
    assert len(plan.groups[names[0]].keep) == len(plan.groups[names[1]].keep) == 12
    plan = pc.solve(tied, pc.Budget(flops=0.7), "dp", exclude=[names[0]])
    assert len(plan.groups[names[0]].keep) == len(plan.groups[names[1]].keep) == 16
    with pytest.raises(AllocationError, match="pinned to different sparsities"):
        pc.solve(tied, pc.Budget(flops=0.7), "dp", locked={names[0]: 0.25, names[1]: 0.5})
    with pytest.raises(AllocationError, match="more than one tie"):
        pc.with_ties(problem, [(names[0], names[1]), (names[1], names[2])])
    with pytest.raises(AllocationError, match="not a prunable group"):
        pc.with_ties(problem, [(names[0], "nope")])
    model, graph, other = toy_problem(TwoResiduals)
    sizes = {g.size: g.name for g in graph.prunable}
    assert {6, 8} <= set(sizes)
    with pytest.raises(AllocationError, match="multiples of the smallest"):
        pc.with_ties(other, [(sizes[6], sizes[8])])


def test_curve_methods_stay_within_the_measured_range_and_leave_unswept_groups_dense():
    torch.manual_seed(0)
    model = TwoResiduals()
    graph = pc.trace(model, model.example())
    curves = synthetic_curves(graph, levels=(0.25, 0.5))
    unswept = graph.prunable[-1].name
    curves = curves[curves.group != unswept]
    problem = pc.allocation_problem(curves, graph, model)
    plan = pc.solve(problem, pc.Budget(flops=0.6), "dp")
    assert len(plan.groups[unswept].keep) == graph[unswept].size
    for name in problem.curves:
        assert plan.groups[name].sparsity <= 0.5 + 1e-9
    with pytest.raises(AllocationError, match="cannot be met"):
        pc.solve(problem, pc.Budget(flops=0.1), "dp")


def test_allocate_respects_round_to():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 32, 32)
    graph = pc.trace(model, x)
    curves = synthetic_curves(graph)
    curves.attrs["config"] = {"criterion": "l1", "round_to": 8}
    curves["kept"] = [None if g == pc.DENSE else pc.kept_units(sz, s, 8)
                      for g, sz, s in zip(curves.group, curves["size"], curves.sparsity)]  # fmt: skip
    problem = pc.allocation_problem(curves, graph, model)
    assert problem.round_to == 8
    for method in pc.list_methods():
        plan = pc.solve(problem, pc.Budget(flops=0.5), method)
        assert all(len(g.keep) % 8 == 0 or len(g.keep) == g.size for g in plan.groups.values()), method


# -- predictions -------------------------------------------------------------------------------------
def test_prediction_is_the_dense_value_plus_each_groups_measured_change():
    torch.manual_seed(0)
    model = TwoResiduals()
    graph = pc.trace(model, model.example())
    curves = synthetic_curves(graph)
    problem = pc.allocation_problem(curves, graph, model)
    a, b = (g.name for g in graph.prunable[:2])
    row = lambda n, s: curves[(curves.group == n) & (curves.sparsity == s)].iloc[0]  # noqa: E731
    assert problem.predict({a: 0.4})["loss"] == pytest.approx(row(a, 0.4)["loss"])
    expected = 0.1 + (row(a, 0.4)["loss"] - 0.1) + (row(b, 0.8)["loss"] - 0.1)
    assert problem.predict({a: 0.4, b: 0.8})["loss"] == pytest.approx(expected)
    assert problem.predict({a: 0.0}) == pytest.approx({"accuracy": 0.98, "loss": 0.1})
    worst = problem.predict({g.name: 0.9 for g in graph.prunable})
    assert worst["accuracy"] >= 0.0  # additive drops are clipped to the metric's range


def test_plan_records_its_prediction_per_group():
    model, graph, problem = toy_problem(TwoResiduals)
    plan = pc.solve(problem, pc.Budget(flops=0.5), "dp")
    changes = [g.predicted_change for g in plan.groups.values()]
    assert plan.predicted["loss"] == pytest.approx(min(max(0.1 + sum(changes), 0.0), np.inf))
    assert plan.fingerprint == graph.fingerprint


def test_evaluate_plan_measures_the_applied_plan_after_bn_re_estimation():
    s = pc.load_sample("resnet20")
    data = load_data("sample", limit=128)
    plan = pc.make_plan(s.model, pc.trace(s.model, s.example), 0.4)
    measured = pc.evaluate_plan(s.model, plan, data.evaluation, ["accuracy", "loss"], calibration=data.calibration)
    by_hand = pc.recalibrate_bn_(pc.apply_plan(s.model, plan), data.calibration, batches=50)
    assert measured == pc.evaluate(by_hand, data.evaluation, ["accuracy", "loss"])
    raw = pc.evaluate_plan(s.model, plan, data.evaluation, "accuracy", bn_recalibration=False)
    assert raw == pc.evaluate(pc.apply_plan(s.model, plan), data.evaluation, "accuracy")
    last = pc.evaluate_plan(s.model, plan, data.evaluation, "accuracy", bn_recalibration=False, channels_last=True)
    assert last == pc.evaluate(pc.apply_plan(s.model, plan), data.evaluation, "accuracy", channels_last=True)


def test_pareto_lists_each_method_within_its_budgets():
    model, graph, problem = toy_problem(TwoResiduals)
    front = pc.pareto(problem, budgets=(0.8, 0.5))
    assert set(front.method) == set(pc.list_methods())
    dense_flops = problem.cost.dense[1]
    assert (front.flops <= front.budget * dense_flops).all()
    dp = front[front.method == "dp"].set_index("budget")
    assert dp.loc[0.5, "loss"] >= dp.loc[0.8, "loss"]  # a tighter budget never predicts less damage


# -- errors ------------------------------------------------------------------------------------------
def test_clear_errors():
    model, graph, problem = toy_problem(TwoResiduals)
    with pytest.raises(ValueError, match="unknown allocation method 'magic'"):
        pc.solve(problem, pc.Budget(flops=0.5), "magic")
    with pytest.raises(AllocationError, match="max_sparsity must be a number in"):
        pc.solve(problem, pc.Budget(flops=0.5), "dp", max_sparsity=1.5)
    with pytest.raises(AllocationError, match="no channel group named 'nope'"):
        pc.solve(problem, pc.Budget(flops=0.5), "dp", locked={"nope": 0.5})
    with pytest.raises(AllocationError, match="cannot be met"):
        pc.solve(problem, pc.Budget(flops=0.001), "uniform")
    with pytest.raises(ValueError, match="exactly one"):
        pc.Budget(flops=0.5, params=0.5)
    no_curves = pc.allocation_problem(None, graph, model)
    with pytest.raises(AllocationError, match="needs sensitivity curves"):
        pc.solve(no_curves, pc.Budget(flops=0.5), "dp")
    assert pc.solve(no_curves, pc.Budget(flops=0.5), "uniform").predicted == {}


def test_curves_of_another_model_are_refused():
    torch.manual_seed(0)
    curves = synthetic_curves(pc.trace(Concat(), Concat().example()))
    model = TwoResiduals()
    with pytest.raises(AllocationError, match="another model"):
        pc.allocation_problem(curves, pc.trace(model, model.example()), model)
    curves.attrs["config"] = {"criterion": "l2"}
    with pytest.raises(AllocationError, match="criterion 'l2'"):
        pc.allocation_problem(curves, pc.trace(Concat(), Concat().example()), Concat(), criterion="l1")


def test_a_budget_the_dense_model_already_meets_prunes_nothing():
    model, graph, problem = toy_problem(TwoResiduals)
    plan = pc.solve(problem, pc.Budget(flops=1.0), "dp")
    assert all(g.sparsity == 0 for g in plan.groups.values())
    absolute = pc.solve(problem, pc.Budget(flops=problem.cost.dense[1] * 0.5), "greedy")
    assert absolute.totals.flops_after <= problem.cost.dense[1] * 0.5


def test_a_plan_from_sparsities_equals_the_solved_plan_with_those_sparsities():
    model, graph, problem = toy_problem(TwoResiduals)
    solved = pc.solve(problem, pc.Budget(flops=0.5), "dp")
    rebuilt = problem.plan(solved.sparsities, solved.allocation)
    assert rebuilt.groups == solved.groups
    assert (rebuilt.totals, rebuilt.predicted) == (solved.totals, solved.predicted)
    assert problem.price(solved.sparsities) == (solved.totals.params_after, solved.totals.flops_after)
    with pytest.raises(AllocationError, match="in \\[0, 1\\)"):
        problem.plan({graph.prunable[0].name: 1.0})


def test_flop_shares_count_the_layers_a_group_touches():
    conv = torch.nn.Conv2d
    model = torch.nn.Sequential(conv(3, 8, 1), torch.nn.ReLU(), conv(8, 6, 1), torch.nn.ReLU(), conv(6, 4, 1))
    x = torch.randn(1, 3, 5, 5)
    graph = pc.trace(model, x)
    shares = cost_model(model, x, graph).flop_shares()
    # MACs per position: 3*8 + 8*6 + 6*4 = 96; each hidden group touches two convs worth 24 + 48
    assert shares == {"0": pytest.approx(72 / 96), "2": pytest.approx(72 / 96)}
