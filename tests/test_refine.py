"""`refine`: measured moves within the budget, only to better plans, reproducible, and refused clearly when asked wrong.

Most cases measure with a stand-in `measure` (a known function of the plan), so the search's rules
can be pinned exactly; one case measures the chain model for real and checks the recorded metrics
are the refined plan's own.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from test_allocate import chain_problem, synthetic_curves
from torch.utils.data import DataLoader, TensorDataset

import prunecore as pc
from prunecore import jobs
from prunecore.jobs import RefineJob
from prunecore.refine import refine


def _loss_problem(seed: int = 0):
    """The 4-group chain, allocating to protect the loss (what refine improves by default)."""
    model, graph, _, names = chain_problem(seed)
    return model, graph, pc.allocation_problem(synthetic_curves(graph, seed), graph, model, metric="loss"), names


def _fractions(problem, sparsities):
    return {n: 1 - k / problem.graph[n].size for n, k in problem.kept(sparsities).items()}


def _true_loss(problem, weights):
    """A 'measured' loss the curves do not know: weights[g] * f_g ** 2 summed, f the pruned fraction."""
    def measure(sparsities):
        f = _fractions(problem, sparsities)
        return {"loss": 0.1 + sum(weights[n] * f.get(n, 0.0) ** 2 for n in weights), "accuracy": 0.5}
    return measure


def test_every_trial_meets_the_budget_and_only_better_plans_are_kept():
    _, _, problem, names = _loss_problem()
    budget = pc.Budget(flops=0.45)
    start = pc.solve(problem, budget, "dp")
    weights = dict(zip(names, (4.0, 0.2, 3.0, 0.1)))  # the curves rank the groups otherwise
    calls = []
    measure = _true_loss(problem, weights)
    refined = refine(None, problem, start, None, steps=25, measure=lambda s: calls.append(dict(s)) or measure(s))
    assert refined.trials and all(not problem.report(t.sparsities, budget).over_budget for t in refined.trials)
    assert not problem.report(refined.plan.sparsities, budget).over_budget
    assert refined.plan.totals.flops_after <= 0.45 * problem.cost.dense[1]
    kept_losses = [refined.start["loss"]] + [t.metrics["loss"] for t in refined.trials if t.accepted]
    assert all(b < a for a, b in zip(kept_losses, kept_losses[1:]))  # each kept move strictly better
    assert refined.metrics["loss"] == min([refined.start["loss"]] + [t.metrics["loss"] for t in refined.trials])
    assert refined.moves > 0 and refined.metrics["loss"] < refined.start["loss"]
    assert refined.metrics == measure(refined.plan.sparsities)  # the record is the returned plan's
    assert refined.plan.allocation.method == "dp+refine" and refined.plan.allocation.budget == budget
    assert len(calls) == len(refined.trials) + 1 <= 26  # the start, then one call per trial
    keys = {tuple(sorted(problem.kept(c).items())) for c in calls}
    assert len(keys) == len(calls)  # no plan measured twice


def test_refining_dp_against_its_own_objective_changes_nothing():
    """dp is optimal for the additive loss within the budget, so no move within it can measure better."""
    _, _, problem, _ = _loss_problem(1)
    start = pc.solve(problem, pc.Budget(flops=0.5), "dp")
    refined = refine(None, problem, start, None, steps=30, measure=lambda s: problem.predict(s))
    assert refined.moves == 0 and len(refined.trials) >= 5  # the chain has few distinct neighbours
    assert problem.kept(refined.plan.sparsities) == problem.kept(start.sparsities)
    assert refined.metrics == refined.start


def test_the_same_seed_gives_the_same_refinement_and_another_seed_other_trials():
    _, _, problem, names = _loss_problem()
    start = pc.solve(problem, pc.Budget(flops=0.5), "greedy")
    measure = _true_loss(problem, dict(zip(names, (0.5, 3.0, 0.2, 2.0))))
    runs = [refine(None, problem, start, None, steps=12, seed=s, measure=measure) for s in (0, 0, 1)]
    assert runs[0].trials == runs[1].trials and runs[0].plan.sparsities == runs[1].plan.sparsities
    assert runs[0].trials != runs[2].trials


def test_frozen_groups_stay_and_tied_groups_move_together():
    _, _, problem, names = _loss_problem()
    tied = pc.with_ties(problem, [(names[1], names[2])])
    start = pc.solve(tied, pc.Budget(flops=0.5), "dp")
    measure = _true_loss(tied, dict(zip(names, (1.0, 0.1, 0.1, 4.0))))
    refined = refine(None, tied, start, None, steps=20, frozen=[names[0]], measure=measure)
    assert refined.trials
    for sparsities in [t.sparsities for t in refined.trials] + [refined.plan.sparsities]:
        kept = tied.kept(sparsities)
        assert kept[names[0]] == tied.kept(start.sparsities)[names[0]]
        assert kept[names[1]] == kept[names[2]]


def test_a_refinement_measured_for_real_records_the_refined_plans_metrics():
    model, graph, problem, _ = _loss_problem()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    start = pc.solve(problem, pc.Budget(flops=0.5), "dp")
    refined = refine(model, problem, start, data, steps=4, bn_recalibration=False, graph=graph)
    assert refined.objective == "loss" and set(refined.metrics) == {"loss", "accuracy"}
    again = pc.evaluate_plan(model, refined.plan, data, ["loss", "accuracy"], bn_recalibration=False, graph=graph)
    assert refined.metrics == again
    before = pc.evaluate_plan(model, start, data, ["loss", "accuracy"], bn_recalibration=False, graph=graph)
    assert refined.start == before and refined.metrics["loss"] <= before["loss"]


def test_progress_counts_the_start_and_every_trial():
    _, _, problem, names = _loss_problem()
    seen = []
    refine(None, problem, pc.solve(problem, pc.Budget(flops=0.5), "dp"), None, steps=5,
           measure=_true_loss(problem, dict.fromkeys(names, 1.0)), progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (1, 6) and [d for d, _ in seen] == list(range(1, len(seen) + 1)) and len(seen) <= 6


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": -1}, "steps must be a whole number"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"step": 0.0}, r"step must be in \(0, 0.5\]"),
    ({"step": 0.7}, r"step must be in \(0, 0.5\]"),
    ({"max_sparsity": 1.0}, r"max_sparsity must be in \(0, 1\)"),
    ({"frozen": ["nope"]}, "frozen names no prunable group: 'nope'"),
    ({"budget": pc.Budget(flops=0.2)}, "does not meet the budget"),
])  # fmt: skip
def test_bad_arguments_are_refused_before_anything_is_measured(kwargs, message):
    _, _, problem, names = _loss_problem()
    start = pc.solve(problem, pc.Budget(flops=0.5), "dp")
    calls = []
    with pytest.raises(pc.AllocationError, match=message):
        refine(None, problem, start, None, measure=lambda s: calls.append(s) or {"loss": 1.0}, **kwargs)
    assert not calls


def test_a_plan_without_a_budget_needs_one_and_a_measurement_without_the_objective_is_named():
    model, graph, problem, names = _loss_problem()
    bare = pc.make_plan(model, graph, 0.3)
    with pytest.raises(pc.AllocationError, match="records no budget"):
        refine(model, problem, bare, None, measure=lambda s: {"loss": 1.0})
    start = pc.solve(problem, pc.Budget(flops=0.5), "dp")
    with pytest.raises(pc.AllocationError, match="no sensitivity curves"):
        refine(None, dataclasses.replace(problem, curves={}), start, None, measure=lambda s: {"loss": 1.0})
    with pytest.raises(pc.AllocationError, match="no finite 'loss'"):
        refine(None, problem, start, None, measure=lambda s: {"loss": math.nan})
    with pytest.raises(pc.AllocationError, match="no finite 'loss'"):
        refine(None, problem, start, None, measure=lambda s: {"accuracy": 0.5})


def test_a_refinement_round_trips_through_json_and_a_bad_dict_is_named():
    _, _, problem, names = _loss_problem()
    start = pc.solve(problem, pc.Budget(flops=0.5), "dp")
    refined = refine(None, problem, start, None, steps=4, measure=_true_loss(problem, dict.fromkeys(names, 1.0)))
    again = pc.Refined.from_dict(json.loads(json.dumps(refined.to_dict())))
    assert again == refined
    for bad in ({"format": "other"}, {**refined.to_dict(), "trials": [{"sparsities": {}}]}, [1, 2]):
        with pytest.raises(pc.AllocationError, match="refinement"):
            pc.Refined.from_dict(bad)


def test_a_refine_job_round_trips_and_its_key_names_the_plan_and_its_budget_not_when_it_was_made(tmp_path):
    model, graph, problem, _ = _loss_problem()
    plan = pc.solve(problem, pc.Budget(flops=0.5), "dp")
    job = RefineJob("sample:resnet20", "sample", str(tmp_path / "runs.db"), "0123", plan.to_json(), steps=5,
                    frozen=["a"], ties=[["b", "c"]])  # fmt: skip
    assert RefineJob.from_json(job.to_json()) == job and job.frozen == ("a",) and job.ties == (("b", "c"),)
    later = dataclasses.replace(plan, created="2030-01-01T00:00:00+00:00")
    assert jobs.job_key(dataclasses.replace(job, plan=later.to_json())) == jobs.job_key(job)
    other_budget = dataclasses.replace(plan, allocation=pc.Allocation("dp", pc.Budget(flops=0.6), "loss"))
    assert jobs.job_key(dataclasses.replace(job, plan=other_budget.to_json())) != jobs.job_key(job)
    assert jobs.job_key(dataclasses.replace(job, steps=6)) != jobs.job_key(job)
