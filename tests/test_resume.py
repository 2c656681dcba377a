"""A real sweep process killed with SIGKILL resumes where it stopped and loses no finished point."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from prunecore import load_sample
from prunecore.datasets import load_data
from prunecore.sensitivity import DENSE, sweep
from prunecore.store import RunStore

LEVELS = [0.2, 0.4, 0.6, 0.8]


RAY = ["--ray", "--workers", "2", "--threads", "1"]


@pytest.mark.parametrize("workers", [
    pytest.param([], id="one process"),
    pytest.param(["--workers", "2", "--threads", "1"], id="2 workers"),
    pytest.param(RAY, id="2 Ray actors", marks=pytest.mark.slow),  # 2-4 min: Ray's agents end a minute or more late
])  # fmt: skip
def test_killed_sweep_resumes(tmp_path, workers):
    if workers == RAY:
        pytest.importorskip("ray")
    db = tmp_path / "runs.sqlite"
    cmd = [sys.executable, "-m", "prunecore.cli", "sweep", "--model", "sample:resnet20", "--data", "sample",
           "--limit", "100", "--levels", ",".join(map(str, LEVELS)), "--store", str(db), *workers]  # fmt: skip
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = RunStore(db)
    deadline = time.time() + 300
    before = None
    try:
        while time.time() < deadline and child.poll() is None:
            runs = store.runs() if db.exists() else []
            if runs and runs[0].points >= 1 + len(LEVELS):  # the dense row and one whole group
                orphans = psutil.Process(child.pid).children(recursive=True)
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
                before = store.points(runs[0].run_id)
                break
            time.sleep(0.05)
    finally:
        if child.poll() is None:
            child.kill()
    assert before is not None, "the sweep finished or failed before it could be killed"
    assert child.returncode == -signal.SIGKILL
    # the 2 workers (and multiprocessing's resource tracker); with Ray, the local cluster the driver started
    # (GCS, raylet, its actors and agents), which shares the driver's fate: its agents notice only after a minute
    assert len(orphans) >= (2 if workers else 0)
    _, alive = psutil.wait_procs(orphans, timeout=240 if workers == RAY else 30)  # they see the driver gone, and end
    assert not alive
    run = store.runs()[0]
    assert not run.complete and run.points < run.expected

    sample = load_sample("resnet20")
    data = load_data("sample", input_shape=tuple(sample.example.shape), limit=100)
    calls = []
    after = sweep(sample.model, data.evaluation, sample.example, levels=LEVELS, metric=["accuracy", "loss"],
                  store=store, progress=lambda done, total: calls.append(total))  # fmt: skip
    assert after.attrs["run_id"] == run.run_id
    done_groups = before[before.group != DENSE].group.nunique()
    n_groups = after[after.group != DENSE].group.nunique()
    assert calls and calls[-1] == n_groups - done_groups  # one batch per remaining group: nothing redone
    assert len(after) == run.expected and store.get(run.run_id).complete
    # what was finished before the kill is kept as it was
    kept = after.set_index(["group", "sparsity"]).loc[list(zip(before.group, before.sparsity))]
    assert kept.accuracy.tolist() == before.accuracy.tolist()

    again = []
    sweep(sample.model, data.evaluation, sample.example, levels=LEVELS, metric=["accuracy", "loss"], store=store,
          progress=lambda d, t: again.append(t))  # fmt: skip
    assert again == []  # everything stored: returned at once
