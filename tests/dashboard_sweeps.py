"""Helpers for the dashboard's AppTest tests: open the app on a page, and sweep through a background job.

The dashboard never sweeps in its script thread: a page that needs curves shows a Run sweep button
(`state.RUN_SWEEP`) that submits a `prunecore.jobs` worker. These helpers press it and poll the job's
status until it ends, then run the page once more, so it shows the stored curves.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard import state
from prunecore import jobs

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
FAST = {"data_limit": 64, "sweep_levels": [0.3, 0.6], "sweep_bn_batches": 0,  # seconds, not minutes
        "live_measure_on": False, "sweep_calibrate": 0}  # measuring plans only where a test turns it on


@pytest.fixture(scope="module", autouse=True)
def store(tmp_path_factory):
    """One run store per test module (import this fixture into it): the first sweep is stored, later ones load."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PRUNECORE_STORE", str(tmp_path_factory.mktemp("store") / "runs.db"))
    yield
    mp.undo()


def open_app(page: str | None = None, **values) -> AppTest:
    """The app with the quick settings and `values` in its session state, run once, on `page` if given."""
    at = AppTest.from_file(APP, default_timeout=600)
    for key, value in {**FAST, **values}.items():
        at.session_state[key] = value
    at.run()
    if page is not None:
        at.switch_page(f"views/{page}.py")
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


POLLS = 2400  # a generous bound, 0.25 s apart: a worker imports torch, loads and sweeps on a busy machine
POLL_S = 0.25


def worker_log(key: str) -> str:
    path = state.store_path().parent / "jobs" / key / "worker.log"
    return path.read_text() if path.exists() else "(no worker.log)"


def wait_for_job(key: str, until=lambda s: s.state not in jobs.ACTIVE) -> jobs.JobStatus:
    """Poll the job's status until `until(status)` holds (by default: the job has ended), and return it."""
    for _ in range(POLLS):
        now = jobs.status(key, state.store_path())
        if until(now):
            return now
        time.sleep(POLL_S)
    raise AssertionError(f"job {key} is still {now.state}; worker.log:\n{worker_log(key)}")


def run_sweep(at: AppTest) -> AppTest:
    """Press Run sweep on the page `at` shows (unless these settings have a job), wait until it is done, rerun."""
    if state.RUN_SWEEP in [b.key for b in at.button]:
        at.button(key=state.RUN_SWEEP).click().run()
    key = at.session_state[state.JOB]
    done = wait_for_job(key)
    assert done.state == "done", f"{done}; worker.log:\n{worker_log(key)}"
    return at.run()


def ok(at: AppTest) -> AppTest:
    """`at`, after checking that its last run raised nothing."""
    assert not at.exception, [e.value for e in at.exception]
    return at


def buttons(at: AppTest) -> list[str]:
    return [b.key for b in at.button]


def progress(at: AppTest) -> str:
    return " ".join(p.proto.text for p in at.get("progress"))
