"""Background sweep jobs: a worker process per job, shared, cancellable, resumable, reporting failures.

Every job sweeps two groups of the sample resnet20 at one level on 16 digits (one batch per group).
Mid-run cases slow the worker with the PRUNECORE_JOBS_TEST_DELAY hook (seconds per batch) and act
once the store holds the first group's point, while the second group's batch waits.
"""

import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch

from job_helpers import log, wait_for
from prunecore.datasets import DataSpecError, load_data
from prunecore.jobs import DELAY_ENV, JobError, SweepJob, cancel, job_key, list_jobs, read_job, status, submit
from prunecore.models import default_input_shape, load_model
from prunecore.sensitivity import DENSE, sweep
from prunecore.store import RunStore

GROUPS = ("stem.0", "layer1.0.conv1")  # the stem conv and the first block's inner conv: one batch each
DELAY = "3"  # seconds per batch in the mid-run cases: the window to act in after the first group is stored




def make_job(store: Path, **changes) -> SweepJob:
    fields = {"model": "sample:resnet20", "data": "sample", "store": str(store), "levels": (0.5,), "limit": 16,
              "metrics": ("accuracy",), "groups": GROUPS}  # fmt: skip
    return SweepJob(**{**fields, **changes})


def wait_state(store: Path, key: str, *states: str):
    return wait_for(store, key, f"state in {states}", lambda: (s := status(key, store)).state in states and s)


def stored_points(store: Path) -> int:
    """Points in the (only) run of the store so far."""
    if not store.exists():
        return 0
    runs = RunStore(store)  # (read_only would refuse a file the worker has not given its tables yet)
    try:
        found = runs.runs()
    finally:
        runs.close()
    return found[0].points if found else 0


def in_process_sweep(store: Path):
    shape = default_input_shape("sample:resnet20")
    data = load_data("sample", input_shape=shape, limit=16)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return sweep(load_model("sample:resnet20"), data.evaluation, example, levels=[0.5], metric=["accuracy"],
                 groups=list(GROUPS), calibration=data.calibration, progress=False, store=RunStore(store))  # fmt: skip


def test_job_json_round_trips_and_key_follows_weights_content(tmp_path):
    first, second, other = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    first.write_bytes(b"same weights")
    second.write_bytes(b"same weights")
    other.write_bytes(b"other weights")
    job = make_job(tmp_path / "runs.sqlite", weights=str(first), input_shape=[1, 1, 28, 28], levels=[0.5, 0.25, 0.5])
    assert job.levels == (0.25, 0.5) and job.input_shape == (1, 1, 28, 28)
    assert SweepJob.from_json(job.to_json()) == job
    assert len(job_key(job)) == 16
    assert job_key(job) == job_key(make_job(tmp_path / "runs.sqlite", weights=str(second), input_shape=(1, 1, 28, 28),
                                            levels=(0.25, 0.5)))  # fmt: skip
    assert job_key(job) != job_key(make_job(tmp_path / "runs.sqlite", weights=str(other), input_shape=(1, 1, 28, 28),
                                            levels=(0.25, 0.5)))  # fmt: skip
    assert job_key(job) != job_key(make_job(tmp_path / "runs.sqlite", weights=str(first), input_shape=(1, 1, 28, 28),
                                            levels=(0.25, 0.5), criterion="l2"))  # fmt: skip
    tuned = make_job(tmp_path / "runs.sqlite", weights=str(first), input_shape=(1, 1, 28, 28), levels=(0.25, 0.5),
                     autocast="bf16", channels_last=True)  # fmt: skip
    assert SweepJob.from_json(tuned.to_json()) == tuned and job_key(tuned) != job_key(job)
    assert (tuned.config().autocast, tuned.config().channels_last) == ("bf16", True)
    with pytest.raises(JobError, match="cannot be read"):
        job_key(make_job(tmp_path / "runs.sqlite", weights=str(tmp_path / "missing.pt")))
    with pytest.raises(JobError, match="not a sweep job"):
        SweepJob.from_json('{"model": "sample:resnet20", "colour": "blue"}')
    with pytest.raises(JobError, match="no job"):
        status("0123456789abcdef", tmp_path / "runs.sqlite")


def test_submitted_job_stores_the_in_process_sweep(store, tmp_path):
    job = make_job(store)
    key = submit(job)
    done = wait_state(store, key, "done", "failed", "died")
    assert done.state == "done", done.error
    assert done.total == len(GROUPS) and done.done == done.total and done.eta_s == 0.0
    assert read_job(key, store) == job and [s.key for s in list_jobs(store)] == [key]

    reference = in_process_sweep(tmp_path / "reference.sqlite")
    assert done.run_id == reference.attrs["run_id"]  # the same model, data and config name the same run
    stored = RunStore(store).points(done.run_id)
    assert RunStore(store).get(done.run_id).complete
    assert stored[["group", "sparsity", "accuracy", "params", "flops"]].to_dict("records") == \
        reference[["group", "sparsity", "accuracy", "params", "flops"]].to_dict("records")  # fmt: skip

    assert submit(job) == key  # done and complete in the store: no new worker
    assert status(key, store) == done
    assert log(store, key).count("started job") == 1
    assert cancel(key, store) is False  # nothing runs


def test_same_job_submitted_twice_shares_one_worker(store, monkeypatch):
    monkeypatch.setenv(DELAY_ENV, DELAY)
    key = submit(make_job(store))
    assert submit(make_job(store)) == key  # while the first worker is starting
    running = wait_for(store, key, "the worker's pid", lambda: (s := status(key, store)).pid is not None and s)
    assert running.state == "running"
    assert submit(make_job(store)) == key  # while it runs
    assert status(key, store).pid == running.pid
    assert cancel(key, store)
    assert wait_state(store, key, "cancelled", "done", "failed", "died").state == "cancelled"
    text = log(store, key)
    assert text.count("started job") == 1 and f"worker {running.pid} started" in text
    assert "another worker" not in text


def test_cancel_keeps_finished_groups_and_resubmit_completes(store, monkeypatch):
    monkeypatch.setenv(DELAY_ENV, DELAY)
    job = make_job(store)
    key = submit(job)
    wait_for(store, key, "the first group's point", lambda: stored_points(store) >= 2)  # the dense row and stem.0
    assert cancel(key, store)
    cancelled = wait_state(store, key, "cancelled", "done", "failed", "died")
    assert cancelled.state == "cancelled" and cancelled.group == GROUPS[1]  # stopped while measuring the second
    run = RunStore(store).get(cancelled.run_id)
    assert not run.complete and run.points == 2 and run.expected == 3
    before = RunStore(store).points(run.run_id)
    assert before.group.tolist() == [DENSE, GROUPS[0]]

    monkeypatch.delenv(DELAY_ENV)
    assert submit(job) == key
    done = wait_state(store, key, "done", "failed", "died")
    assert done.state == "done", done.error
    assert done.run_id == run.run_id and done.total == 1  # only the group left was swept
    after = RunStore(store).points(run.run_id)
    assert after.group.tolist() == [DENSE, *GROUPS] and RunStore(store).get(run.run_id).complete
    pd.testing.assert_frame_equal(after.iloc[:2], before)  # kept as they were


def test_killed_worker_reads_died_and_resubmit_resumes(store, monkeypatch):
    monkeypatch.setenv(DELAY_ENV, DELAY)
    job = make_job(store)
    key = submit(job)
    wait_for(store, key, "the first group's point", lambda: stored_points(store) >= 2)
    running = status(key, store)
    assert running.state == "running"
    os.kill(running.pid, signal.SIGKILL)
    died = wait_state(store, key, "died", "done", "failed", "cancelled")
    assert died.state == "died" and died.pid == running.pid
    run_id = died.run_id
    before = RunStore(store).points(run_id)
    assert before.group.tolist() == [DENSE, GROUPS[0]]

    monkeypatch.delenv(DELAY_ENV)
    assert submit(job) == key
    done = wait_state(store, key, "done", "failed", "died")
    assert done.state == "done", done.error
    assert done.pid != running.pid and done.run_id == run_id
    assert done.total == 1  # the resumed worker measured only the group that was not stored
    assert "2 of 3 points already stored" in log(store, key)  # the dense row and stem.0
    after = RunStore(store).points(run_id)
    assert after.group.tolist() == [DENSE, *GROUPS]
    pd.testing.assert_frame_equal(after.iloc[:2], before)  # kept as they were


def test_bad_data_spec_fails_with_its_message(store):
    with pytest.raises(DataSpecError) as expected:
        load_data("nonsense", input_shape=(1, 1, 28, 28))
    key = submit(make_job(store, data="nonsense"))
    failed = wait_state(store, key, "failed", "done", "died")
    assert failed.state == "failed"
    assert failed.error == str(expected.value) and "\n" not in failed.error
    assert str(expected.value) in log(store, key)
