"""Helpers for tests of background jobs (`prunecore.jobs`): killing the workers a test leaves, a plan to
measure or fine-tune, and polling that fails with the worker's log. The `store` and `resnet_plan`
fixtures built on them are in conftest.py."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch

import prunecore as pc
from prunecore import jobs

TIMEOUT = 300  # seconds: a worker imports torch, loads, and works on a busy machine


def kill_workers(store: Path) -> None:
    """SIGKILL every worker a test left running in `store` (its process group)."""
    for job in jobs.list_jobs(store):
        if job.state in jobs.ACTIVE and job.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)


def resnet_plan(sparsity: float = 0.3) -> tuple[torch.nn.Module, pc.Plan]:
    """The sample ResNet-20 and a uniform plan for it."""
    model = pc.load_model("sample:resnet20")
    return model, pc.make_plan(model, pc.trace(model, torch.randn(1, 1, 28, 28)), sparsity)


def log(store: Path, key: str) -> str:
    path = store.parent / "jobs" / key / "worker.log"
    return path.read_text() if path.exists() else ""


def wait_for(store: Path, key: str, what: str, predicate: Callable[[], Any]) -> Any:
    """Poll until `predicate()` is truthy (and return it); on timeout, fail showing the worker's log."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; worker.log:\n{log(store, key)}")
