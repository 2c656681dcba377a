"""`measure_plan` and measurement jobs: the one way a plan is measured, in-process and in a worker.

In-process cases use a toy network with BatchNorm on random labelled tensors; the job cases measure
a 30 % plan of the sample resnet20 on 32 digits in a real worker process, the way the Validate page does.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import prunecore as pc
import toy_models as toys
from job_helpers import TIMEOUT
from prunecore import cost, jobs
from prunecore.datasets import EvalData, load_data
from prunecore.measure import MeasureError, PlanMeasurement, default_metrics, measure_plan
from prunecore.plan import PlanError



def _data(labelled: bool = True) -> EvalData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (24,), generator=g)
    evaluation = DataLoader(TensorDataset(x, y) if labelled else x, batch_size=8)
    calibration = DataLoader(TensorDataset(x[:16], y[:16]) if labelled else x[:16], batch_size=8)
    return EvalData(evaluation, calibration, labelled, "24 random tensors")


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = toys.randomize_norms_(toys.TwoResiduals().eval())
    example = torch.randn(2, 3, 8, 8)
    graph = pc.trace(model, example)
    return model, graph, pc.make_plan(model, graph, 0.5)


def test_it_measures_what_applying_evaluating_and_counting_give(toy):
    model, graph, plan = toy
    data = _data()
    m = measure_plan(model, plan, data, ["accuracy", "loss"], bn_recalibration=2, graph=graph, latency=False)
    assert m.metrics == pc.evaluate_plan(model, plan, data.evaluation, ["accuracy", "loss"], 2, data.calibration, graph)
    assert m.dense == pc.evaluate(model, data.evaluation, ["accuracy", "loss"])
    example = tuple(s.example() for s in plan.inputs)
    pruned = pc.count(pc.apply_plan(model, plan, graph=graph), example)
    dense = pc.count(model, example)
    assert (m.params, m.flops, m.dense_params, m.dense_flops) == (pruned.params, pruned.flops, dense.params,
                                                                   dense.flops)  # fmt: skip
    assert (m.data, m.bn_recalibration, m.latency, m.speedup(), m.speedup_text()) == (
        "24 random tensors", 2, None, None, "not timed")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), toy[0].state_dict().values()))


def test_it_times_both_models_with_the_shared_routine_and_reports_each_step(toy, monkeypatch):
    model, graph, plan = toy
    calls, steps = [], []
    timing = (cost.Latency(0.01, 0.02, 7, 1, 2), cost.Latency(0.004, 0.03, 7, 1, 2))
    monkeypatch.setattr(cost, "compare_latency", lambda a, b, x: calls.append((a, b, x)) or timing)
    m = measure_plan(model, plan, _data(), bn_recalibration=1, graph=graph, progress=steps.append)
    assert steps == ["apply", "bn", "evaluate", "latency"]
    [(dense, pruned, example)] = calls
    assert dense is model and pruned is not model and example[0].shape == (2, 3, 8, 8)
    assert m.latency == timing and m.speedup() == pytest.approx(2.5)
    assert m.speedup_text() == cost.format_speedup(*timing)


def test_label_free_data_gets_the_label_free_metrics_and_labelled_ones_are_refused(toy):
    model, graph, plan = toy
    unlabelled = _data(labelled=False)
    m = measure_plan(model, plan, unlabelled, graph=graph, latency=False)
    assert set(m.metrics) == {"kl", "agreement"} and m.dense == {"kl": 0.0, "agreement": 1.0}
    with pytest.raises(MeasureError, match="accuracy need labels, and 24 random tensors has none"):
        measure_plan(model, plan, unlabelled, "accuracy", graph=graph, latency=False)


def test_default_metrics_follow_the_plan_then_the_data(toy):
    plan = toy[2]
    assert default_metrics(None, _data()) == ["accuracy", "loss"]
    assert default_metrics(dataclasses.replace(plan, predicted={"loss": 0.3}), _data()) == ["loss"]
    assert default_metrics(dataclasses.replace(plan, predicted={"accuracy": 0.9}), _data(False)) == ["kl", "agreement"]


def test_a_plan_for_another_model_is_refused_before_anything_is_measured(toy):
    torch.manual_seed(1)
    other = toys.Concat().eval()
    with pytest.raises(PlanError):
        measure_plan(other, toy[2], _data(), latency=False)


def test_a_measurement_round_trips_through_json_and_bad_dicts_are_refused(toy, monkeypatch):
    model, graph, plan = toy
    timing = (cost.Latency(0.01, 0.02, 7, 1, 2), cost.Latency(0.004, 0.03, 7, 1, 2))
    monkeypatch.setattr(cost, "compare_latency", lambda a, b, x: timing)
    m = measure_plan(model, plan, _data(), graph=graph)
    assert PlanMeasurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    for bad in ({}, {"format": "prunecore.measurement/1"}, {**m.to_dict(), "latency": [1, 2]}, [1]):
        with pytest.raises(MeasureError):
            PlanMeasurement.from_dict(bad)


# -- in a worker process -----------------------------------------------------------------------------------



def _wait(key: str, store) -> jobs.JobStatus:
    deadline = time.monotonic() + TIMEOUT
    while (now := jobs.status(key, store)).state in jobs.ACTIVE and time.monotonic() < deadline:
        time.sleep(0.1)
    log = store.parent / "jobs" / key / "worker.log"
    assert now.state == "done", f"{now}; worker.log:\n{log.read_text() if log.exists() else ''}"
    return now


def test_a_measurement_job_stores_what_measure_plan_gives_and_the_same_plan_is_not_measured_twice(store,
                                                                                                  resnet_plan):
    model, plan = resnet_plan
    job = jobs.MeasureJob("sample:resnet20", "sample", str(store), plan.to_json(), limit=32, bn_recalibration=1,
                          latency=False)  # fmt: skip
    key = jobs.submit(job)
    _wait(key, store)
    stored = jobs.result(key, store)
    here = measure_plan(model, plan, load_data("sample", input_shape=(1, 1, 28, 28), limit=32), bn_recalibration=1,
                        latency=False)  # fmt: skip
    assert stored == here
    assert jobs.read_job(key, store) == job and json.loads(job.to_json())["kind"] == "measure"

    again = dataclasses.replace(job, plan=dataclasses.replace(plan, created="2001-01-01T00:00:00+00:00").to_json())
    assert jobs.job_key(again) == key  # when a plan was made is not what it prunes
    mtime = (store.parent / "jobs" / key / "status.json").stat().st_mtime_ns
    assert jobs.submit(again) == key
    assert (store.parent / "jobs" / key / "status.json").stat().st_mtime_ns == mtime  # no worker started
    other = pc.make_plan(model, pc.trace(model, torch.randn(1, 1, 28, 28)), 0.5)
    assert jobs.job_key(dataclasses.replace(job, plan=other.to_json())) != key
    assert [j.key for j in jobs.list_jobs(store, kind="measure")] == [key] and not jobs.list_jobs(store, "sweep")


def test_a_measurement_job_can_be_cancelled_between_steps(store, resnet_plan, monkeypatch):
    monkeypatch.setenv(jobs.DELAY_ENV, "3")
    job = jobs.MeasureJob("sample:resnet20", "sample", str(store), resnet_plan[1].to_json(), limit=32)
    key = jobs.submit(job)
    deadline = time.monotonic() + TIMEOUT
    while jobs.status(key, store).state != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    while not jobs.cancel(key, store) and time.monotonic() < deadline:
        time.sleep(0.05)
    while jobs.status(key, store).state in jobs.ACTIVE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert jobs.status(key, store).state == "cancelled" and jobs.result(key, store) is None


def test_a_job_file_without_a_kind_is_a_sweep_and_a_bad_plan_is_refused(store):
    sweep = jobs.SweepJob("sample:resnet20", "sample", str(store), (0.5,))
    fields = json.loads(sweep.to_json())
    del fields["kind"]  # as jobs were written before measurements
    assert jobs.SweepJob.from_json(json.dumps(fields)) == sweep
    with pytest.raises(jobs.JobError, match="not a measure job: it is a sweep job"):
        jobs.MeasureJob.from_json(sweep.to_json())
    with pytest.raises(jobs.JobError, match="the plan to measure is not a plan's JSON"):
        jobs.job_key(jobs.MeasureJob("sample:resnet20", "sample", str(store), '{"groups": 3}'))
