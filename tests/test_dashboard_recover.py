"""The Recover page fine-tunes the edited plan in a background job; Validate and Export then know the recovered model.

Through AppTest, with one tiny sweep for the module (the sample resnet20, 16 digits, one level) and
tiny fine-tunings (64 training digits, one batch an epoch). The cancel case slows the worker with
`PRUNECORE_JOBS_TEST_DELAY`; the fixture kills the workers the module leaves running. Workers inherit
OMP_NUM_THREADS=1: tiny models train several times slower with two threads on a busy 2-core machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import prunecore as pc
from dashboard import charts, state
from dashboard_sweeps import buttons, ok, progress, run_sweep, wait_for_job
from prunecore import jobs
from prunecore.jobs import Recovery
from prunecore.recover import EpochRecord

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
TINY = {"data_limit": 16, "sweep_levels": [0.5], "sweep_metrics": ["accuracy"], "sweep_bn_batches": 0,
        "live_measure_on": False, "sweep_calibrate": 0, state.FT_EPOCHS: 1, state.FT_TRAIN_LIMIT: 64,
        state.FT_BN: 1}  # fmt: skip
DELAY = "3"  # seconds per training batch in the cancel case: the window to act in


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One run store for the module (the dashboard's, through $PRUNECORE_STORE); leftover workers are killed."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("store") / "runs.sqlite"
    mp.setenv("PRUNECORE_STORE", str(path))
    mp.setenv("OMP_NUM_THREADS", "1")
    yield path
    for job in jobs.list_jobs(path):
        if job.state in jobs.ACTIVE and job.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
    mp.undo()


@pytest.fixture(scope="module")
def swept(store):
    """The module's tiny sweep, done: the Plan page then makes the edited plan."""
    run_sweep(app("sensitivity"))


def app(page: str, **values) -> AppTest:
    """A new session on `page`, with the tiny settings and `values`."""
    at = AppTest.from_file(APP, default_timeout=600)
    for key, value in {**TINY, **values}.items():
        at.session_state[key] = value
    at.run()
    at.switch_page(f"views/{page}.py")
    return ok(at.run())


def recover(**values) -> AppTest:
    """A new session that visits the Plan page (which makes the edited plan), then the Recover page."""
    at = app("plan", **values)
    assert at.session_state[state.EDITED_PLAN] is not None
    at.switch_page("views/recover.py")
    return ok(at.run())


def downloads(at: AppTest) -> list[str]:
    return [b.label for b in at.get("download_button")]


def charts_shown(at: AppTest) -> list[str]:
    return [c.proto.spec for c in at.get("plotly_chart")]


def test_the_page_without_a_plan_says_to_make_one(store):
    at = app("recover")
    assert [i.value for i in at.info] == ["Make a plan on the Plan page first."]
    assert not at.button and jobs.list_jobs(store, kind="finetune") == []


def test_run_starts_one_job_whose_curve_and_model_the_page_validate_and_export_show(store, swept):
    at = recover()
    assert buttons(at) == [state.RUN_FINETUNE] and not charts_shown(at)
    assert "Trains on the sample's 4,000 training digits (none of the held-out ones), the first 64;" in \
        at.caption[0].value  # fmt: skip
    at.slider(key=state.FT_DISTILL).set_value(0.7).run()  # a settings change starts nothing
    at.selectbox(key=state.FT_DEVICE).set_value("cpu").run()
    assert jobs.list_jobs(store, kind="finetune") == [] and buttons(ok(at)) == [state.RUN_FINETUNE]

    at.button(key=state.RUN_FINETUNE).click().run()
    key = ok(at).session_state[state.FINETUNE_JOB]
    assert [j.key for j in jobs.list_jobs(store, kind="finetune")] == [key]
    job = jobs.read_job(key, store)
    assert (job.epochs, job.distill, job.train_limit, job.limit, job.bn_recalibration) == (1, 0.7, 64, 16, 1)
    assert job.device == "cpu"
    assert pc.Plan.from_json(job.plan).groups == at.session_state[state.EDITED_PLAN].groups
    assert wait_for_job(key).state == "done"

    ok(at.run())
    result = jobs.result(key, store)
    assert downloads(at) == ["Download the recovered model (.pt)"]
    assert "prunecore.load_pruned" in " ".join(c.value for c in at.caption)
    cards = {m.label: m.value for m in at.metric}
    assert cards["Recovered accuracy"] == charts.format_metric("accuracy", result.history[-1].metrics["accuracy"])
    assert cards["One-shot accuracy"] == charts.format_metric("accuracy", result.before["accuracy"])
    assert any("held-out accuracy" in spec for spec in charts_shown(at))
    assert buttons(at) == [] and len(jobs.list_jobs(store, kind="finetune")) == 1

    at.switch_page("views/export.py")
    assert downloads(ok(at.run())) == ["Download the plan (JSON)", "Download the recovered model (.pt)"]
    assert "the recovered model is it fine-tuned" in " ".join(c.value for c in at.caption)
    at.button(key="build_pruned").click().run()
    assert downloads(ok(at)) == ["Download the plan (JSON)", "Download the pruned model (.pt)",
                                 "Download the recovered model (.pt)"]  # fmt: skip
    other = app("export", **{state.FT_EPOCHS: 2})  # other settings: no recovered model for them
    assert "Download the recovered model (.pt)" not in downloads(other)

    at.switch_page("views/validate.py")
    at.run().button(key=state.RUN_MEASURE).click().run()
    assert wait_for_job(at.session_state[state.MEASURE_JOB]).state == "done"
    cards = {m.label: m.value for m in ok(at.run()).metric}
    assert cards["Recovered accuracy"] == charts.format_metric("accuracy", result.history[-1].metrics["accuracy"])
    assert "One-shot accuracy" in cards and "recovered" in at.dataframe[0].value.columns


def test_the_curve_shows_while_it_trains_and_cancel_offers_resume_which_continues(store, swept, monkeypatch):
    monkeypatch.setenv(jobs.DELAY_ENV, DELAY)
    at = recover(**{state.FT_EPOCHS: 2})
    at.button(key=state.RUN_FINETUNE).click().run()
    key = ok(at).session_state[state.FINETUNE_JOB]
    known = [j.key for j in jobs.list_jobs(store, kind="finetune")]
    wait_for_job(key, lambda s: (so_far := jobs.history(key, store)) is not None and len(so_far.history) == 1)
    ok(at.run())
    assert progress(at).startswith("running: 1 of 2 epochs") and state.CANCEL_FINETUNE in buttons(at)
    assert any("held-out accuracy" in spec for spec in charts_shown(at))  # the live curve, epoch 1 on it

    at.button(key=state.CANCEL_FINETUNE).click().run()
    assert wait_for_job(key).state == "cancelled"
    ok(at.run())
    assert progress(at).startswith("cancelled") and buttons(at) == [state.RESUME_FINETUNE]
    assert not downloads(at)

    monkeypatch.delenv(jobs.DELAY_ENV)
    at.button(key=state.RESUME_FINETUNE).click().run()
    assert ok(at).session_state[state.FINETUNE_JOB] == key
    assert sorted(j.key for j in jobs.list_jobs(store, kind="finetune")) == sorted(known)  # the same job again
    assert wait_for_job(key).state == "done"
    ok(at.run())
    assert [e.epoch for e in jobs.result(key, store).history] == [1, 2]
    assert downloads(at) == ["Download the recovered model (.pt)"]


def test_the_recovery_figure_starts_at_the_one_shot_model_and_spans_every_epoch_asked_for():
    record = Recovery({"accuracy": 0.6, "loss": 1.2}, {"accuracy": 0.95, "loss": 0.2},
                      (EpochRecord(1, 0.9, 0.01, 1.0, {"accuracy": 0.8, "loss": 0.6}),), epochs=3)  # fmt: skip
    assert charts.recovery_metric(record) == "accuracy"
    fig = charts.recovery_figure(record)
    loss, held_out, dense = fig.data
    assert (list(loss.x), list(loss.y)) == ([1], [0.9])
    assert (list(held_out.x), list(held_out.y)) == ([0, 1], [0.6, 0.8])
    assert list(dense.y) == [0.95, 0.95] and list(fig.layout.xaxis.range) == [-0.25, 3.25]
    label_free = Recovery({"kl": 0.3, "agreement": 0.7}, {"kl": 0.0, "agreement": 1.0})
    assert charts.recovery_metric(label_free) == "agreement"
    with pytest.raises(ValueError, match="no metric 'accuracy'"):
        charts.recovery_figure(label_free, "accuracy")
