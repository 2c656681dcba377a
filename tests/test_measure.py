"""`measure_plan` and measurement jobs: the one way a plan is measured, in-process and in a worker.

In-process cases use a toy network with BatchNorm on random labelled tensors; the job cases measure
a 30 % plan of the sample resnet20 on 32 digits in a real worker process, the way the Validate page does.
The INT8 cases export that plan's pruned model to ONNX and quantise it in ONNX Runtime (skipped without it).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import prunecore as pc
import toy_models as toys
from job_helpers import TIMEOUT
from prunecore import cost, deploy, jobs
from prunecore.datasets import EvalData, load_data
from prunecore.measure import Int8Measurement, MeasureError, PlanMeasurement, default_metrics, measure_plan
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


def _measurement(int8: Int8Measurement | None = None, int8_error: str | None = None) -> PlanMeasurement:
    timing = (cost.Latency(0.01, 0.02, 7, 1, 2), cost.Latency(0.004, 0.03, 7, 1, 2))
    return PlanMeasurement({"accuracy": 0.9, "loss": 0.3}, {"accuracy": 0.95, "loss": 0.2}, 10, 20, 30, 60,
                           "24 random tensors", 2, timing, int8=int8, int8_error=int8_error)  # fmt: skip


def test_a_measurement_with_int8_or_its_failure_round_trips_and_one_without_writes_what_it_did_before():
    int8 = Int8Measurement({"accuracy": 0.89, "loss": 0.31}, cost.Latency(0.002, 0.05, 7, 1, 2), "static, calibrated",
                           3e-6)  # fmt: skip
    for m in (_measurement(), _measurement(int8), _measurement(int8_error="no onnxruntime")):
        assert PlanMeasurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert PlanMeasurement.from_dict(json.loads(json.dumps(_measurement(int8).to_dict()))).int8.latency == int8.latency
    plain = _measurement().to_dict()  # what measurements wrote before INT8: results stored then still load
    assert set(plain) == {"format", "metrics", "dense", "params", "flops", "dense_params", "dense_flops", "data",
                          "bn_recalibration", "latency", "extra"}  # fmt: skip
    assert PlanMeasurement.from_dict(plain).int8 is None and PlanMeasurement.from_dict(plain).int8_error is None
    with pytest.raises(MeasureError, match="malformed"):
        PlanMeasurement.from_dict({**plain, "int8": {"metrics": {}, "mode": "static"}})
    with pytest.raises(MeasureError, match="malformed"):
        PlanMeasurement.from_dict({**plain, "int8": [1]})


def test_int8_needs_latency(toy):
    model, graph, plan = toy
    with pytest.raises(MeasureError, match="needs latency=True"):
        measure_plan(model, plan, _data(), graph=graph, latency=False, int8=True)


@pytest.mark.parametrize("failure", [deploy.DeployError("ONNX export and INT8 need onnx, onnxscript and onnxruntime: "
                                                        "pip install 'prunecore[deploy]'"),
                                     RuntimeError("[ONNXRuntimeError] : 1 : FAIL :\n Load model failed")])
def test_a_failed_int8_keeps_the_float_measurement_and_says_why(toy, monkeypatch, failure):
    model, graph, plan = toy
    timing = (cost.Latency(0.01, 0.02, 7, 1, 2), cost.Latency(0.004, 0.03, 7, 1, 2))
    monkeypatch.setattr(cost, "compare_latency", lambda a, b, x: timing)

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(deploy, "deploy_onnx", fail)
    steps = []
    m = measure_plan(model, plan, _data(), bn_recalibration=1, graph=graph, progress=steps.append, int8=True)
    plain = measure_plan(model, plan, _data(), bn_recalibration=1, graph=graph)
    assert steps == ["apply", "bn", "evaluate", "int8", "latency"]
    assert m.int8 is None and dataclasses.replace(m, int8_error=None) == plain
    if isinstance(failure, deploy.DeployError):
        assert m.int8_error == str(failure)
    else:
        assert m.int8_error == "RuntimeError: [ONNXRuntimeError] : 1 : FAIL : Load model failed"  # one line
    assert PlanMeasurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_without_onnxruntime_int8_fails_with_the_deploy_modules_message(toy, monkeypatch):
    model, graph, plan = toy
    monkeypatch.setattr(cost, "compare_latency", lambda a, b, x: (cost.Latency(0.01, 0.02, 7, 1, 2),) * 2)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    m = measure_plan(model, plan, _data(), graph=graph, int8=True)
    assert m.int8 is None and m.metrics and m.latency is not None
    assert m.int8_error == ("ONNX export and INT8 need onnx, onnxscript and onnxruntime: "
                            "pip install 'prunecore[deploy]'")  # fmt: skip


def test_int8_of_a_sample_keeps_its_accuracy_and_is_timed_with_dense_and_pruned_in_one_call(resnet_plan,
                                                                                             monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, plan = resnet_plan
    calls = []

    def recorded(models, example, *args, **kwargs):
        calls.append(list(models))
        timed = real(models, example, *args, **kwargs)
        calls.append(timed)
        return timed

    real = cost.measure_latencies
    monkeypatch.setattr(cost, "measure_latencies", recorded)
    monkeypatch.setattr(cost, "compare_latency", lambda *a, **k: pytest.fail("timed apart from the INT8 model"))
    data = load_data("sample", input_shape=(1, 1, 28, 28), limit=250)
    steps = []
    m = measure_plan(model, plan, data, ["accuracy", "loss"], bn_recalibration=1, progress=steps.append, int8=True)
    assert steps == ["apply", "bn", "evaluate", "int8", "latency"] and m.int8_error is None
    [models, timed] = calls
    assert models[0] is model and isinstance(models[2], deploy.OnnxModule) and len(timed) == 3
    assert m.latency == (timed[0], timed[1]) and m.int8.latency == timed[2]
    assert all(t.median_s > 0 and t.rounds == 7 for t in timed)
    assert set(m.int8.metrics) == {"accuracy", "loss"} and m.metrics["accuracy"] > 0.5
    assert abs(m.int8.metrics["accuracy"] - m.metrics["accuracy"]) <= 0.03  # 250 digits: a few of them
    assert m.int8.mode == f"static, calibrated on {data.description}" and 0 <= m.int8.max_abs_diff < 1e-3
    assert m.metrics == measure_plan(model, plan, data, ["accuracy", "loss"], bn_recalibration=1,
                                     latency=False).metrics  # fmt: skip


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
                          latency=False, device="cpu")  # fmt: skip
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


PINNED_PLAN = json.dumps({"fingerprint": "f00d", "groups": {"layer1.0.conv1": {"keep": [0, 2, 3]}},
                          "inputs": [{"shape": [1, 1, 28, 28]}]})  # fmt: skip


def test_a_measurement_without_int8_keeps_its_key_and_one_with_int8_is_another_job():
    """The keys below are what `job_key` gave these jobs before `int8` existed: their stored results still match."""
    job = jobs.MeasureJob("sample:resnet20", "sample", "/pinned/runs.sqlite", PINNED_PLAN)
    assert jobs.job_key(job) == "c1cc1f918db42815"
    tuned = dataclasses.replace(job, limit=32, bn_recalibration=1)
    assert jobs.job_key(tuned) == jobs.job_key(dataclasses.replace(tuned, int8=False)) == "daaed914068fec95"
    with_int8 = dataclasses.replace(job, int8=True)
    on_cpu = dataclasses.replace(job, device="cpu")
    assert len({jobs.job_key(j) for j in (with_int8, on_cpu)} | {"c1cc1f918db42815", "daaed914068fec95"}) == 4
    assert jobs.MeasureJob.from_json(with_int8.to_json()) == with_int8
    assert jobs.MeasureJob.from_json(on_cpu.to_json()) == on_cpu
    fields = json.loads(job.to_json())
    del fields["int8"], fields["device"]  # a job file written before INT8 and the device choice
    assert jobs.MeasureJob.from_json(json.dumps(fields)) == job
    with pytest.raises(jobs.JobError, match="needs latency=True"):
        jobs.MeasureJob("sample:resnet20", "sample", "/pinned/runs.sqlite", PINNED_PLAN, latency=False, int8=True)


def test_an_int8_measurement_job_stores_the_three_models(store, resnet_plan):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    job = jobs.MeasureJob("sample:resnet20", "sample", str(store), resnet_plan[1].to_json(), limit=32, int8=True)
    key = jobs.submit(job)
    done = _wait(key, store)
    assert (done.done, done.total, done.unit) == (4, 5, "steps")  # loading, then apply, evaluate, int8, latency
    stored = jobs.result(key, store)
    assert stored.int8_error is None and set(stored.int8.metrics) == set(stored.metrics)
    assert stored.int8.latency.rounds == stored.latency[0].rounds == 7
    assert stored.int8.mode.startswith("static, calibrated on sample held-out digits")


def test_a_job_file_without_a_kind_is_a_sweep_and_a_bad_plan_is_refused(store):
    sweep = jobs.SweepJob("sample:resnet20", "sample", str(store), (0.5,))
    fields = json.loads(sweep.to_json())
    del fields["kind"]  # as jobs were written before measurements
    assert jobs.SweepJob.from_json(json.dumps(fields)) == sweep
    with pytest.raises(jobs.JobError, match="not a measure job: it is a sweep job"):
        jobs.MeasureJob.from_json(sweep.to_json())
    with pytest.raises(jobs.JobError, match="the plan to measure is not a plan's JSON"):
        jobs.job_key(jobs.MeasureJob("sample:resnet20", "sample", str(store), '{"groups": 3}'))
