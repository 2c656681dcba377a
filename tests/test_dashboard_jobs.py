"""Sweeps on the dashboard are background jobs: Run starts one, any session finds and shares it.

Through AppTest, with tiny sweeps (the sample resnet20, 16 digits, one level, one metric). Cases that
act while a job runs slow its worker with `PRUNECORE_JOBS_TEST_DELAY` (seconds per batch); the
fixture kills the workers a test leaves running.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

import prunecore as pc
from dashboard import state
from dashboard_sweeps import buttons, ok, progress, run_sweep, wait_for_job
from prunecore import jobs
from prunecore.jobs import JobStatus

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
TINY = {"data_limit": 16, "sweep_levels": [0.5], "sweep_metrics": ["accuracy"], "sweep_bn_batches": 0,
        "live_measure_on": False, "sweep_calibrate": 0}
RANDOM = {"data_source": "Random (label-free)"}  # the Model page's data choice: prunecore's `random` spec
DELAY = "2"  # seconds per batch: a sweep of resnet20's 12 groups stays running long enough to act on


@pytest.fixture(autouse=True)
def store(tmp_path, monkeypatch):
    """A run store of the test's own (the dashboard's, through $PRUNECORE_STORE); leftover workers are killed."""
    path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("PRUNECORE_STORE", str(path))
    yield path
    for job in jobs.list_jobs(path):
        if job.state in jobs.ACTIVE and job.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)


def app(page: str = "sensitivity", weights: bytes | None = None, **values) -> AppTest:
    """A new session on `page`, with the tiny sweep settings, `values` and uploaded `weights`."""
    at = AppTest.from_file(APP, default_timeout=600)
    for key, value in {**TINY, **values}.items():
        at.session_state[key] = value
    at.run()
    at.session_state[state.WEIGHTS] = weights  # as the Model page's uploader leaves it
    at.switch_page(f"views/{page}.py")
    return ok(at.run())


def running(key: str) -> JobStatus:
    return wait_for_job(key, lambda s: s.state == "running" and s.pid is not None)


def test_settings_start_nothing_and_run_starts_one_job_that_a_second_session_shares(store, monkeypatch):
    monkeypatch.setenv(jobs.DELAY_ENV, DELAY)
    first = app()
    assert buttons(first) == [state.RUN_SWEEP] and not first.get("plotly_chart")
    first.multiselect(key=state.LEVELS).set_value([0.25, 0.5]).run()  # a settings change sweeps nothing
    ok(first)
    assert jobs.list_jobs(store) == [] and buttons(first) == [state.RUN_SWEEP]

    first.button(key=state.RUN_SWEEP).click().run()
    ok(first)
    key = first.session_state[state.JOB]
    assert [j.key for j in jobs.list_jobs(store)] == [key]
    assert jobs.read_job(key, store).levels == (0.25, 0.5)
    worker = running(key).pid
    assert state.CANCEL_SWEEP in buttons(first.run()) and state.RUN_SWEEP not in buttons(first)

    second = app(sweep_levels=[0.5, 0.25])  # a new session, the same settings: the same job, followed
    assert second.session_state[state.JOB] == key
    assert buttons(second) == [state.CANCEL_SWEEP] and progress(second).startswith("running")
    assert jobs.status(key, store).pid == worker and len(jobs.list_jobs(store)) == 1  # no second worker
    table = second.dataframe[0].value
    assert list(table.job) == [key] and table["these settings"].tolist() == [True]
    assert list(table.model) == ["sample:resnet20"] and list(table.state) == ["running"]


def test_cancel_shows_the_cancelled_state_and_resume_continues_the_same_job(store, monkeypatch):
    monkeypatch.setenv(jobs.DELAY_ENV, DELAY)
    at = app()
    at.button(key=state.RUN_SWEEP).click().run()
    key = at.session_state[state.JOB]
    first = running(key).pid
    at.run().button(key=state.CANCEL_SWEEP).click().run()
    ok(at)
    wait_for_job(key)
    at.run()
    assert progress(at).startswith("cancelled") and buttons(at) == [state.RESUME_SWEEP]
    assert buttons(app()) == [state.RESUME_SWEEP]  # any session may resume it

    at.button(key=state.RESUME_SWEEP).click().run()
    ok(at)
    assert at.session_state[state.JOB] == key and [j.key for j in jobs.list_jobs(store)] == [key]
    assert running(key).pid != first  # a new worker for the same job, resuming from the stored groups
    assert state.CANCEL_SWEEP in buttons(at.run())


def test_a_done_jobs_curves_appear_in_a_new_session_without_pressing_run(store):
    done = run_sweep(app())
    key = done.session_state[state.JOB]
    run = jobs.status(key, store).run_id
    assert done.session_state[state.RUN_ID] == run

    later = app()  # a new session: nothing to press, the curves from the run store
    assert state.RUN_SWEEP not in buttons(later) and not progress(later)
    assert later.session_state[state.JOB] == key and later.session_state[state.RUN_ID] == run
    assert len(later.get("plotly_chart")) == 2
    stored = pc.RunStore(store).points(run)
    assert later.dataframe[-1].value.equals(stored) and set(stored.sparsity) == {0.0, 0.5}
    plan = app("plan")  # the Plan page takes the same curves
    assert plan.session_state["curves_cache"][1].attrs["run_id"] == run
    assert plan.session_state[state.EDITED_PLAN] is not None


def test_a_run_the_cli_swept_with_the_same_settings_opens_without_a_job(store):
    from prunecore.cli import main

    argv = ["sweep", "--model", "sample:resnet20", "--data", "sample", "--limit", "16", "--levels", "0.5",
            "--metric", "accuracy", "--store", str(store)]  # the settings TINY gives the dashboard
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    [swept] = [r.run_id for r in pc.RunStore(store).runs()]
    at = app()
    assert state.RUN_SWEEP not in buttons(at) and jobs.list_jobs(store) == []  # found in the store, no job
    assert at.session_state[state.RUN_ID] == swept and len(at.get("plotly_chart")) == 2
    other = app(sweep_levels=[0.25])  # other settings: that run is not theirs
    assert buttons(other) == [state.RUN_SWEEP]


def test_random_data_sweeps_the_label_free_metrics_in_a_worker(store):
    at = run_sweep(app(**RANDOM, sweep_metrics=["accuracy", "loss"]))
    job = jobs.read_job(at.session_state[state.JOB], store)
    assert (job.data, job.limit, job.metrics) == ("random", 16, ("kl", "agreement"))  # no labels: no accuracy
    curves = at.dataframe[-1].value
    assert {"kl", "agreement"} <= set(curves.columns) and "accuracy" not in curves.columns


def test_a_failed_job_shows_its_error_and_can_be_run_again(store):
    at = app(**RANDOM, sweep_mode="estimate")  # an estimate predicts the loss: it needs labels
    at.button(key=state.RUN_SWEEP).click().run()
    key = at.session_state[state.JOB]
    assert wait_for_job(key).state == "failed"
    at.run()
    ok(at)
    assert any("The sweep failed" in e.value and "need labels" in e.value for e in at.error)
    assert buttons(at) == [state.RUN_SWEEP] and not at.get("plotly_chart")


def test_the_plan_page_waits_for_a_sweep_and_offers_to_run_it(store):
    at = app("plan")
    assert any("needs the sensitivity curves" in i.value for i in at.info)
    assert buttons(at) == [state.RUN_SWEEP] and not at.metric


def captions(at: AppTest) -> str:
    return " ".join(c.value for c in at.caption)


def test_the_plan_page_measures_the_resting_sliders_in_a_worker_and_cancels_a_plan_left_behind(store, monkeypatch):
    run_sweep(app())
    at = app("plan", live_measure_on=True)
    assert "once the sliders rest" in captions(at) and not [m for m in at.metric if m.label.startswith("Measured")]
    assert jobs.list_jobs(store, kind="measure") == []  # a slider move starts nothing at once
    time.sleep(state.SETTLE_S)
    at.run()  # the sliders have rested: the worker starts
    key = at.session_state[state.LIVE]["key"]
    assert [j.key for j in jobs.list_jobs(store, kind="measure")] == [key]
    assert wait_for_job(key).state == "done"
    ok(at.run())
    stored = jobs.result(key, store)
    shown = next(m for m in at.metric if m.label == "Measured accuracy")
    assert shown.value == f"{stored.metrics['accuracy'] * 100:.2f} %" and stored.bn_recalibration == 0
    predicted = at.session_state[state.EDITED_PLAN].predicted["accuracy"]
    assert shown.delta == f"{(stored.metrics['accuracy'] - predicted) * 100:+.2f} pp"
    assert "measured plans" in at.get("plotly_chart")[-1].proto.spec  # on the Pareto chart

    monkeypatch.setenv(jobs.DELAY_ENV, DELAY)  # a slow measurement, so the next plan is left mid-way
    group = next(s.key for s in at.slider if s.key.startswith("sparsity::"))
    first, second = [v for v in (0.5, 0.25, 0.0) if v != at.slider(key=group).value][:2]
    at.slider(key=group).set_value(first).run()
    time.sleep(state.SETTLE_S)
    moved = at.run().session_state[state.LIVE]["key"]
    assert moved != key and "Measured accuracy" not in [m.label for m in at.metric]
    wait_for_job(moved, lambda s: s.state == "running" and s.pid is not None)
    assert "Measuring this plan on the sweep's data" in captions(ok(at.run()))
    at.slider(key=group).set_value(second).run()  # moved on before it was done: that measurement is cancelled
    assert wait_for_job(moved).state == "cancelled"


def test_a_calibrated_sweep_stores_a_predictor_that_the_plan_page_predicts_and_allocates_with(store):
    done = run_sweep(app(sweep_calibrate=10))  # accuracy only asked: the job adds the loss it fits on
    key = done.session_state[state.JOB]
    assert jobs.read_job(key, store).metrics == ("accuracy", "loss") and jobs.read_job(key, store).calibrate == 10
    run = jobs.status(key, store).run_id
    stored = pc.RunStore(store).get_predictor(run)
    assert stored is not None and stored["plans"] >= 10
    plan = app("plan", sweep_calibrate=10, live_measure_on=True)
    assert "Predicted by the predictor fitted on" in captions(plan)
    edited = plan.session_state[state.EDITED_PLAN]
    assert edited.predicted_by == pc.PredictedBy("calibrated", stored["plans"])
    low, high = edited.band["accuracy"]
    assert low <= edited.predicted["accuracy"] <= high
    time.sleep(state.SETTLE_S)
    assert wait_for_job(plan.run().session_state[state.LIVE]["key"]).state == "done"
    cards = {m.label: m for m in ok(plan.run()).metric}
    assert "Predicted accuracy" in cards and "Measured accuracy" in cards  # measured beside the banded prediction
    model = pc.load_model("sample:resnet20")
    problem = pc.with_predictor(pc.allocation_problem(pc.RunStore(store).points(run), pc.trace(
        model, torch.randn(1, 1, 28, 28)), model), pc.Predictor.from_dict(stored))  # fmt: skip
    assert edited.predicted == problem.predict(edited.sparsities)
    uncalibrated = app("plan")  # settings without calibration are another job
    assert uncalibrated.session_state[state.JOB] != key


def test_uploaded_weights_reach_the_worker_as_a_copy_that_the_key_digests(store, monkeypatch):
    monkeypatch.setenv(jobs.DELAY_ENV, DELAY)
    model = pc.load_model("sample:resnet20")
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)  # weights of its own, not the sample's
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    upload = buffer.getvalue()
    at = app(weights=upload)
    assert at.session_state[state.JOB] != app().session_state[state.JOB]  # other weights, another job

    at.button(key=state.RUN_SWEEP).click().run()
    key = at.session_state[state.JOB]
    running(key)
    job = jobs.read_job(key, store)
    assert Path(job.weights).read_bytes() == upload and Path(job.weights).is_relative_to(store.parent / "jobs")
    assert jobs.job_key(job) == key  # the copy's content, not a temporary path, names the job
    assert app(weights=upload).session_state[state.JOB] == key


def test_job_progress_says_how_far_a_job_is():
    assert state.job_progress(JobStatus("k", "starting")) == (
        0.0, "starting: preparing (the model, the data, the dense model's metrics)")  # fmt: skip
    running_ = JobStatus("k", "running", done=6, total=8, group="layer2.0.conv1", eta_s=4000.0)
    assert state.job_progress(running_) == (0.75, "running: 6 of 8 batches, group `layer2.0.conv1`, about 1 h 06 min "
                                                   "left")  # fmt: skip
    assert state.job_progress(JobStatus("k", "cancelled", done=3, total=12, group="stem.0")) == (
        0.25, "cancelled: 3 of 12 batches")  # fmt: skip
    assert state.job_progress(JobStatus("k", "died")) == (0.0, "died")


def test_a_sweep_over_two_worker_processes_shows_each_worker_and_finds_the_run_of_one(store, monkeypatch):
    monkeypatch.setenv(jobs.DELAY_ENV, "0.5")  # per batch: the workers stay busy long enough to be seen
    at = app(sweep_workers=2, sweep_device="cpu")
    at.button(key=state.RUN_SWEEP).click().run()
    key = at.session_state[state.JOB]
    job = jobs.read_job(key, store)
    assert (job.workers, job.device) == (2, "cpu")
    busy = wait_for_job(key, until=lambda s: any(w.get("group") for w in s.workers) or s.state not in jobs.ACTIVE)
    assert busy.state == "running", busy
    captions = " ".join(c.value for c in ok(at.run()).caption)
    assert "worker 0: " in captions and "worker 1: " in captions and "batches" in captions
    done = wait_for_job(key)
    assert done.state == "done" and sum(w["groups_done"] for w in done.workers) == 12  # resnet20's groups
    later = app()  # one worker, the same settings otherwise: the run id is the same, so nothing to press
    assert state.RUN_SWEEP not in buttons(later) and later.session_state[state.RUN_ID] == done.run_id


def test_mixed_precision_and_channels_last_sweep_as_a_run_of_their_own(store):
    plain = run_sweep(app())
    plain_run = plain.session_state[state.RUN_ID]
    at = app(sweep_autocast="bf16", sweep_channels_last=True)
    assert "(criterion l1, exact, bf16 mixed precision, channels-last)" in " ".join(c.value for c in at.caption)
    at = run_sweep(at)
    job = jobs.read_job(at.session_state[state.JOB], store)
    assert (job.autocast, job.channels_last) == ("bf16", True)
    run = pc.RunStore(store).get(at.session_state[state.RUN_ID])
    assert run.run_id != plain_run and run.complete
    assert (run.config["autocast"], run.config["channels_last"]) == ("bf16", True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_fp16_on_the_cpu_is_refused_on_the_page_before_any_job(store):
    at = AppTest.from_file(APP, default_timeout=600)
    for key, value in {**TINY, "sweep_autocast": "fp16", "sweep_device": "cpu"}.items():
        at.session_state[key] = value
    at.run()
    at.switch_page("views/sensitivity.py")
    at.run()
    assert "autocast 'fp16' runs on CUDA only; on the CPU use 'bf16'" in " ".join(e.value for e in at.error)
    assert state.RUN_SWEEP not in buttons(at) and jobs.list_jobs(store) == []
