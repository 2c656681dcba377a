"""Sweeps over several workers: local processes and a local Ray cluster give the sequential sweep's points
exactly, in the same order; a killed worker is replaced and its group measured again."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from prunecore import load_sample
from prunecore.errors import ArgumentError
from prunecore.sensitivity import DENSE, SweepConfig, sweep
from prunecore.workers import MAX_RETRIES, WorkerError, preload_modules, ray_system_config

CONFIG = SweepConfig(levels=(0.3, 0.6), metric=("accuracy", "loss", "kl"), bn_recalibration=1)


@pytest.fixture(scope="module")
def resnet20():
    s = load_sample("resnet20")
    data = [(x[:60], y[:60]) for x, y in list(s.heldout)[:2]]  # 2 batches of held-out digits
    sequential = sweep(s.model, data, s.example, CONFIG, calibration=data, progress=False)
    return s.model, data, s.example, sequential


def _same_points(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)


def test_local_workers_equal_the_sequential_sweep(resnet20):
    model, data, example, sequential = resnet20
    seen = []
    parallel = sweep(model, data, example, CONFIG, calibration=data, progress=False, workers=2, threads=1,
                     on_worker=lambda status: seen.append((status.index, status.group)))  # fmt: skip
    _same_points(sequential, parallel)
    stats = parallel.attrs["workers"]
    assert [w["worker"] for w in stats] == [0, 1]
    assert sum(w["groups"] for w in stats) == sequential[sequential.group != DENSE].group.nunique()
    assert all(w["peak_rss_mib"] > 0 and w["restarts"] == 0 for w in stats)
    assert {index for index, group in seen if group is not None} == {0, 1}  # both measured groups


def test_ray_sweep_equals_the_sequential_sweep_and_survives_a_killed_worker(resnet20):
    pytest.importorskip("ray")
    model, data, example, sequential = resnet20
    killed = []

    def kill_an_actor(group: str) -> None:
        if not killed and group == "layer2.1.conv1":  # the fourth task: both actors are up by now
            actors = [p for p in psutil.process_iter(["cmdline"]) if "_SweepActor" in " ".join(p.info["cmdline"] or [])]
            assert actors, "no Ray sweep actor process found"
            actors[0].send_signal(signal.SIGKILL)
            killed.append(actors[0].pid)

    parallel = sweep(model, data, example, CONFIG, calibration=data, progress=False, workers=2, threads=1,
                     executor="ray", on_group=kill_an_actor)  # fmt: skip
    assert killed
    _same_points(sequential, parallel)
    assert sum(w["restarts"] for w in parallel.attrs["workers"]) == 1


def test_a_ray_sweep_raises_the_error_of_the_measurement_itself(resnet20):
    pytest.importorskip("ray")
    model, data, example, _ = resnet20
    x = torch.cat([b[0] for b in data])
    shuffled = DataLoader(TensorDataset(x), batch_size=30, shuffle=True)
    with pytest.raises(ArgumentError, match="same order every time"):
        sweep(model, shuffled, example, levels=[0.5], groups=["stem.0"], metric="kl", progress=False, workers=2,
              threads=1, executor="ray")  # fmt: skip


def test_the_ray_cluster_a_sweep_starts_imports_prunecore_and_the_models_classes_in_every_worker(resnet20):
    """Ray's workers preload them as they start, so an actor does not wait ~2 s for torch after the sweep begins."""
    ray = pytest.importorskip("ray")
    model, data, example, _ = resnet20
    sweep(model, data, example, levels=[0.5], groups=["stem.0"], metric="kl", progress=False, workers=1, threads=1,
          executor="ray")  # fmt: skip

    @ray.remote(num_cpus=1)
    def loaded() -> list[str]:  # a plain task (pickled by value): it imports nothing itself
        import sys

        return sorted(sys.modules)

    modules = set(ray.get(loaded.remote()))
    assert {"torch", "prunecore.workers", "sample_models.nets", "torchvision.models.resnet"} <= modules


def test_the_preload_list_names_only_modules_a_worker_can_import():
    class Script(torch.nn.Module):  # a class of the user's script: a Ray worker cannot import `__main__`
        pass

    Script.__module__ = "__main__"
    model = torch.nn.Sequential(Script(), torch.nn.Conv2d(3, 4, 3), load_sample("vit").model)
    assert preload_modules(model) == ["prunecore.workers", "torchvision.models.vision_transformer"]
    assert ray_system_config(model) == {"preload_python_modules": preload_modules(model)}


def test_a_ray_sweep_with_nothing_left_to_measure_stops_its_actors(resnet20, tmp_path):
    pytest.importorskip("ray")
    model, data, example, sequential = resnet20
    store = tmp_path / "runs.db"
    sweep(model, data, example, CONFIG, calibration=data, progress=False, store=store)
    resumed = sweep(model, data, example, CONFIG, calibration=data, progress=False, store=store, workers=2,
                    threads=1, executor="ray")  # fmt: skip
    _same_points(sequential, resumed)
    assert resumed.attrs["workers"] == []  # the actors started early, and measured nothing
    actors = [p for p in psutil.process_iter(["cmdline"]) if "_SweepActor" in " ".join(p.info["cmdline"] or [])]
    _, alive = psutil.wait_procs(actors, timeout=60)
    assert not alive


BESIDE_A_CLUSTER = """
from prunecore import load_sample
from prunecore.sensitivity import sweep
s = load_sample("resnet20")
data = [(x[:20], y[:20]) for x, y in list(s.heldout)[:1]]
frame = sweep(s.model, data, s.example, levels=[0.5], groups=["stem.0"], metric="kl", progress=False, workers=1,
              threads=1, executor="ray")
print(len(frame), frame.attrs["workers"][0]["groups"])
"""


def test_a_ray_sweep_without_an_address_starts_its_own_cluster_beside_the_one_ray_start_runs(tmp_path):
    """Plain ray.init() joins the cluster `ray start` recorded on this machine and then refuses the sweep's sizes."""
    pytest.importorskip("ray")
    linux_tmp = os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None
    temp = os.environ.get("RAY_TMPDIR") or linux_tmp or "/tmp"  # Ray's own rule for its temp dir
    record = Path(temp) / "ray" / "ray_current_cluster"  # where `ray start` notes the machine's cluster
    before = record.read_text() if record.exists() else None
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "1",
                             "--port", str(port), "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (record.exists() and record.read_text().strip().endswith(f":{port}")):
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.2)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        run = subprocess.run([sys.executable, "-c", BESIDE_A_CLUSTER], capture_output=True, text=True, env=env,
                             timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split() == ["2", "1"]  # the dense row and the one point, measured by the one actor
    finally:
        head.terminate()  # --block: stopping the command stops the cluster it started, and no other
        head.wait(60)
        if before is None:
            record.unlink(missing_ok=True)
        else:
            record.write_text(before)


SHORT_OF_ROOM = """
import warnings
import ray
from prunecore import load_sample
from prunecore.sensitivity import sweep
from prunecore.workers import RayPool
s = load_sample("resnet20")
data = [(x[:20], y[:20]) for x, y in list(s.heldout)[:1]]
how = dict(levels=[0.5], groups=["stem.0", "layer1.0.conv1", "layer2.0.conv1"], metric="kl", progress=False)
sequential = sweep(s.model, data, s.example, **how)
ray.init(num_cpus=1, include_dashboard=False)  # room for one of the two actors
frame = sweep(s.model, data, s.example, workers=2, threads=1, executor="ray", **how)
print(frame.equals(sequential), sorted((w["groups"], w["pid"] is None) for w in frame.attrs["workers"]))
ray.shutdown()
ray.init(num_cpus=0, include_dashboard=False)  # room for none
RayPool.STALL_WARNING_S = 1.0
warnings.simplefilter("error", RuntimeWarning)  # the warning ends the sweep here, so that it can be read
try:
    sweep(s.model, data, s.example, workers=1, threads=1, executor="ray", **how)
except RuntimeWarning as warning:
    print(warning)
"""


def test_a_ray_sweep_measures_on_the_actors_the_cluster_has_room_for_and_says_when_it_has_none():
    """An actor Ray cannot place must not hold a task: the sweep used to wait on it forever."""
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-c", SHORT_OF_ROOM], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    placed, stalled = run.stdout.strip().splitlines()
    assert placed == "True [(0, True), (3, False)]"  # one actor measured all 3 groups; the other never started
    assert stalled.startswith("no Ray sweep actor has started after 1 s (each asks for 1 CPU(s); the cluster has "
                              "0 CPU(s)")  # fmt: skip


MISSING_ON_THE_NODE = """
import pathlib, shutil, sys, tempfile
import torch
from torch import nn
from prunecore.sensitivity import sweep
home = tempfile.mkdtemp()
pathlib.Path(home, "lonely_net.py").write_text("from torch import nn\\nclass LonelyNet(nn.Sequential):\\n    pass\\n")
sys.path.insert(0, home)
from lonely_net import LonelyNet
shutil.rmtree(home)  # gone before any worker looks: a node without the package that defines the model
model = LonelyNet(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 3)).eval()
x = torch.randn(2, 1, 8, 8)
data = [(torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]))]
try:
    sweep(model, data, x, levels=[0.5], metric="kl", progress=False, workers=1, threads=1, executor="ray")
except ModuleNotFoundError as error:  # Ray's subclass of it, with the worker's traceback
    print("ModuleNotFoundError", "No module named 'lonely_net'" in str(error))
"""


def test_a_model_a_ray_node_cannot_load_raises_the_import_error_itself():
    """The actor reads the spec in `prepare`, so a missing package is the user's ModuleNotFoundError, at once."""
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-c", MISSING_ON_THE_NODE], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["ModuleNotFoundError", "True"]


def test_a_killed_local_worker_is_replaced(resnet20):
    model, data, example, sequential = resnet20
    killed = []

    def kill_once(status) -> None:
        if not killed and status.group is not None and status.index == 1:
            os.kill(status.pid, signal.SIGKILL)
            killed.append(status.group)

    parallel = sweep(model, data, example, CONFIG, calibration=data, progress=False, workers=2, threads=1,
                     on_worker=kill_once)  # fmt: skip
    assert killed
    _same_points(sequential, parallel)
    assert [w["restarts"] for w in parallel.attrs["workers"]] == [0, 1]


def test_a_group_that_keeps_losing_its_worker_stops_the_sweep_with_the_reason(resnet20):
    model, data, example, _ = resnet20

    def kill_every_time(status) -> None:
        if status.group == "stem.0" and status.done == 0:
            os.kill(status.pid, signal.SIGKILL)

    with pytest.raises(WorkerError, match=rf"group\(s\) 'stem.0' lost their worker {MAX_RETRIES + 1} times"):
        sweep(model, data, example, CONFIG, calibration=data, progress=False, workers=2, threads=1,
              groups=("stem.0",), on_worker=kill_every_time)  # fmt: skip


def test_a_worker_raises_the_error_of_the_measurement_itself(resnet20):
    model, data, example, _ = resnet20
    x = torch.cat([b[0] for b in data])
    shuffled = DataLoader(TensorDataset(x), batch_size=30, shuffle=True)
    with pytest.raises(ArgumentError, match="same order every time"):
        sweep(model, shuffled, example, levels=[0.5], groups=["stem.0"], metric="kl", progress=False, workers=2,
              threads=1)  # fmt: skip


def test_execution_settings_are_checked_before_any_work(resnet20):
    model, data, example, _ = resnet20
    for kwargs, message in [
        ({"workers": 0}, "workers must be a positive int"),
        ({"executor": "dask"}, "executor must be 'local'"),
        ({"address": "ray://head:10001"}, "use it with executor='ray'"),
        ({"threads": 0}, "threads must be a positive int"),
    ]:
        with pytest.raises(ArgumentError, match=message):
            sweep(model, data, example, CONFIG, progress=False, **kwargs)


FREED_MEMORY = """
import ctypes, resource, sys, torch
from prunecore._memory import keep_freed_memory
assert ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # a fixed mmap threshold: every pass faults its blocks in
if sys.argv[1] == "worker":
    assert keep_freed_memory()
def passes(n):
    for _ in range(n):
        activations = [torch.ones(5 << 20) for _ in range(5)]  # 5 x 20 MiB, freed at the end of the pass
        del activations
passes(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
passes(10)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_PASS = 5 * (20 << 20) // 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_a_worker_process_reuses_freed_activations_instead_of_faulting_them_in_again():
    """Each pass frees and re-allocates the same activations; a worker must not page them in from the OS anew.

    A Ray actor paged its activations in again pass after pass (1.1 million minor faults per
    ResNet-20 task of 9 points); fixing glibc's mmap threshold at its default reproduces that
    deterministically, so the test can tell the setting's effect from glibc's own heuristics.
    """

    def faults(kind: str) -> int:
        run = subprocess.run([sys.executable, "-c", FREED_MEMORY, kind], capture_output=True, text=True, check=True)
        return int(run.stdout)

    # glibc places the blocks a little differently from run to run (0 to 1.2 passes' worth of faults in 42
    # runs here, while the heap settles); without the setting every one of the 10 passes faults them all in
    assert faults("worker") < 3 * PAGES_PER_PASS
    assert faults("driver") >= 9 * PAGES_PER_PASS  # what the setting saves: each pass faults its activations in
