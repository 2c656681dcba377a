"""Sweeps for the dashboard's AppTest tests: press Run sweep and wait for the background job.

The dashboard never sweeps in its script thread: a page that needs curves shows a Run sweep button
(`state.RUN_SWEEP`) that submits a `prunecore.jobs` worker. These helpers press it and poll the job's
status until it ends, then run the page once more, so it shows the stored curves.
"""

from __future__ import annotations

import time

from streamlit.testing.v1 import AppTest

from dashboard import state
from prunecore import jobs

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
