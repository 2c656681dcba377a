"""Fine-tuning as a background job: the worker trains what `finetune` trains, writes its epochs as they finish,
saves a recovered model that `load_pruned` rebuilds, and a cancelled job submitted again loses no finished epoch.

Every job fine-tunes a 30 % plan of the sample resnet20 on 64 training digits (one batch an epoch),
measured on 16 held-out ones. Workers inherit OMP_NUM_THREADS=1: on a busy 2-core machine a tiny
model trains several times slower with two threads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import prunecore as pc
from job_helpers import log, wait_for
from prunecore import jobs
from prunecore.datasets import load_data, load_train
from prunecore.evaluate import recalibrate_bn_
from prunecore.jobs import FinetuneJob, Recovery
from prunecore.recover import EpochRecord, finetune

pytestmark = pytest.mark.usefixtures("one_thread")
DELAY = "3"  # seconds per training batch in the cancel case: the window to cancel in, once epoch 1 is written





def make_job(store: Path, plan: pc.Plan, **changes) -> FinetuneJob:
    fields = {"model": "sample:resnet20", "data": "sample", "store": str(store), "plan": plan.to_json(), "limit": 16,
              "train_limit": 64, "epochs": 2, "bn_recalibration": 1, "distill": 0.5}  # fmt: skip
    return FinetuneJob(**{**fields, **changes})


def folder(store: Path, key: str) -> Path:
    return store.parent / "jobs" / key


def ended(store: Path, key: str) -> jobs.JobStatus:
    return wait_for(store, key, "the job to end", lambda: (s := jobs.status(key, store)).state not in jobs.ACTIVE and s)


def epochs_written(store: Path, key: str) -> list[int]:
    so_far = jobs.history(key, store)
    return [] if so_far is None else [e.epoch for e in so_far.history]


def test_job_json_round_trips_and_the_key_follows_what_is_pruned_and_the_recipe(tmp_path, resnet_plan):
    model, plan = resnet_plan
    job = make_job(tmp_path / "runs.sqlite", plan, input_shape=[1, 1, 28, 28], epochs=2.0)
    assert job.input_shape == (1, 1, 28, 28) and job.epochs == 2 and isinstance(job.lr, float)
    assert FinetuneJob.from_json(job.to_json()) == job and json.loads(job.to_json())["kind"] == "finetune"
    key = jobs.job_key(job)
    later = dataclasses.replace(plan, created="2001-01-01T00:00:00+00:00").to_json()
    assert jobs.job_key(dataclasses.replace(job, plan=later)) == key  # when a plan was made is not what it prunes
    other = pc.make_plan(model, pc.trace(model, torch.randn(1, 1, 28, 28)), 0.5).to_json()
    changes = [{"plan": other}, {"epochs": 3}, {"lr": 0.03}, {"distill": 0.0}, {"train_limit": 128},
               {"bn_recalibration": 2}, {"limit": 32}, {"device": "cpu"}]  # fmt: skip
    assert len({key, *(jobs.job_key(dataclasses.replace(job, **c)) for c in changes)}) == 1 + len(changes)
    measure = jobs.MeasureJob("sample:resnet20", "sample", str(tmp_path / "runs.sqlite"), plan.to_json())
    assert jobs.job_key(measure) != key
    with pytest.raises(jobs.JobError, match="not a finetune job: it is a measure job"):
        FinetuneJob.from_json(measure.to_json())
    with pytest.raises(jobs.JobError, match="not a fine-tuning record"):
        Recovery.from_dict({"format": "prunecore.measurement/1"})


def test_a_recovery_round_trips_through_json():
    record = Recovery({"accuracy": 0.5}, {"accuracy": 0.9}, (EpochRecord(1, 1.5, 0.01, 2.0, {"accuracy": 0.7}),), 3,
                      "16 digits", "64 digits")  # fmt: skip
    assert Recovery.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    assert record.metrics == {"accuracy": 0.7} and dataclasses.replace(record, history=()).metrics == {"accuracy": 0.5}
    with pytest.raises(jobs.JobError, match="malformed"):
        Recovery.from_dict({**record.to_dict(), "history": [{"epoch": 1}]})


def test_a_finetune_job_trains_what_finetune_trains_and_writes_a_model_that_load_pruned_rebuilds(store, resnet_plan):
    model, plan = resnet_plan
    job = make_job(store, plan)
    key = jobs.submit(job)
    done = ended(store, key)
    assert done.state == "done", f"{done}; worker.log:\n{log(store, key)}"
    assert (done.unit, done.done, done.total) == ("epochs", 2, 2)
    assert jobs.read_job(key, store) == job and [s.key for s in jobs.list_jobs(store, kind="finetune")] == [key]

    result = jobs.result(key, store)
    assert result == dataclasses.replace(jobs.history(key, store), model_file=str(folder(store, key) / "recovered.pt"))
    assert [e.epoch for e in result.history] == [1, 2] and result.epochs == 2
    assert result.train == "sample training digits (64 images)" and set(result.before) == {"accuracy", "loss"}

    # the same in this process: apply, re-estimate BatchNorm on one batch, fine-tune with the dense teacher
    shape = (1, 1, 28, 28)
    data, train = load_data("sample", input_shape=shape, limit=16), load_train("sample", input_shape=shape, limit=64)
    one_shot = recalibrate_bn_(pc.apply_plan(model, plan), data.calibration, batches=1)
    here = finetune(one_shot, train.loader, teacher=model, epochs=2, distill=0.5, eval_data=data.evaluation,
                    metrics=["accuracy", "loss"])  # fmt: skip
    assert result.before == pytest.approx(pc.evaluate(one_shot, data.evaluation, ["accuracy", "loss"]), rel=1e-4)
    assert result.dense == pytest.approx(pc.evaluate(model, data.evaluation, ["accuracy", "loss"]), rel=1e-4)
    assert [e.loss for e in result.history] == pytest.approx([e.loss for e in here.history], rel=1e-3)

    recovered, saved = pc.load_pruned(result.model_file)
    assert saved.groups == plan.groups and saved.measured == result.history[-1].metrics
    assert saved.measured_on == pc.MeasuredOn(result.data, 0)
    pairs = zip(recovered.state_dict().items(), one_shot.state_dict().items())
    assert any(not torch.equal(a, b) for (_, a), (_, b) in pairs if a.is_floating_point())  # trained away from it
    assert pc.evaluate(recovered, data.evaluation, ["accuracy"]) == pytest.approx(
        {"accuracy": result.history[-1].metrics["accuracy"]})  # fmt: skip

    mtime = (folder(store, key) / "status.json").stat().st_mtime_ns
    assert jobs.submit(job) == key  # done, its model written: no new worker
    assert (folder(store, key) / "status.json").stat().st_mtime_ns == mtime


def test_a_cancelled_job_submitted_again_continues_from_its_last_finished_epoch(store, resnet_plan, monkeypatch):
    monkeypatch.setenv(jobs.DELAY_ENV, DELAY)
    job = make_job(store, resnet_plan[1])
    key = jobs.submit(job)
    wait_for(store, key, "epoch 1 in history.json", lambda: epochs_written(store, key) == [1])
    assert jobs.cancel(key, store)  # while epoch 2's batch waits
    stopped = ended(store, key)
    assert stopped.state == "cancelled" and stopped.done == 1 and jobs.result(key, store) is None
    first = jobs.history(key, store).history[0]
    assert (folder(store, key) / "finetune.pt").is_file()

    monkeypatch.delenv(jobs.DELAY_ENV)
    assert jobs.submit(job) == key  # Resume: the same job, a new worker
    done = ended(store, key)
    assert done.state == "done", f"{done}; worker.log:\n{log(store, key)}"
    result = jobs.result(key, store)
    assert [e.epoch for e in result.history] == [1, 2]
    assert result.history[0] == first  # read back from the checkpoint, not trained again
    assert log(store, key).count("started job") == 2


def test_label_free_data_without_distillation_fails_with_the_reason(store, resnet_plan):
    key = jobs.submit(make_job(store, resnet_plan[1], data="random", distill=0.0, epochs=1))
    failed = ended(store, key)
    assert failed.state == "failed" and "no labels and there is no teacher" in failed.error
    assert jobs.result(key, store) is None and not (folder(store, key) / "recovered.pt").exists()
