"""Sweep workers: the groups of one sweep measured in several local processes or on a Ray cluster.

A task is a few consecutive groups with all their levels: a group's levels share its dense prefix,
and consecutive groups share one dense pass per batch (`prunecore.suffix`), so splitting finer
would repeat that work. There are about four tasks per worker, in graph order: the early groups,
whose suffixes are the longest, go first, which balances the workers as they pull tasks. Each worker builds one
`SuffixEngine` from an `EngineSpec` it receives once: a local process in its start arguments, a
Ray actor from one object-store entry that every actor reads. The driver pickles the spec a single
time, so it never holds one copy of the evaluation data per worker.

The driver commits each task's rows to the run store the moment they arrive. A worker that dies
(killed, out of memory, a lost node) is replaced and its task measured again, up to
`MAX_RETRIES` times per task; a killed driver resumes from the store, as a sequential sweep does.
Every point equals the sequential sweep's: each worker runs the same engine on the same data.

Local workers on the CPU are forked (on Linux, from a driver with no other thread), as PyTorch's
DataLoader workers are: they start in milliseconds and share the driver's model and data pages
instead of copying them. Otherwise (a CUDA device, other threads, another OS) they are spawned: a
fresh interpreter that imports torch (seconds) and receives the spec pickled once; a script that
sweeps with `workers=N` must then guard its entry point with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import collections
import math
import multiprocessing as mp
import os
import pickle
import resource
import signal
import sys
import threading
import traceback
import warnings
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from prunecore._memory import keep_freed_memory
from prunecore.errors import UserError
from prunecore.graph import ChannelGraph
from prunecore.suffix import Point, SuffixEngine, batches_per_group

__all__ = ["MAX_RETRIES", "EngineSpec", "RayPool", "WorkerError", "WorkerStatus", "measure_groups", "preload_modules",
           "ray_system_config", "start_ray"]

MAX_RETRIES = 2
"""How many times a task is measured again after the worker measuring it died."""

Rows = list[dict[str, Any]]


class WorkerError(UserError):
    """Sweep workers failed in a way a retry does not fix (a group lost its worker too often, Ray missing)."""


@dataclass(frozen=True)
class EngineSpec:
    """Everything a worker needs to build its `SuffixEngine`; pickled once by the driver."""

    model: nn.Module
    graph: ChannelGraph
    metrics: Sequence[str]
    data: Iterable[Any]
    calibration: Iterable[Any] | None
    bn_batches: int
    leaf_modules: tuple[type, ...]
    device: torch.device
    autocast: str | None
    channels_last: bool = False

    def build(self, device: torch.device | None = None) -> SuffixEngine:
        """The worker's engine, on its own (unpickled) copy of the model: no second copy."""
        return SuffixEngine(self.model, self.graph, self.metrics, self.data, calibration=self.calibration,
                            bn_batches=self.bn_batches, leaf_modules=self.leaf_modules,
                            device=device or self.device, autocast=self.autocast, channels_last=self.channels_last,
                            copy_model=False)  # fmt: skip

    def work_per_group(self) -> int | None:
        """Batches one group takes (progress totals), as the engine counts them."""
        return batches_per_group(self.model, self.data, self.bn_batches)


@dataclass
class WorkerStatus:
    """What one worker is doing, for per-worker progress: `group` (its task's groups) None when idle, `done` batches."""

    index: int
    pid: int | None = None
    group: str | None = None
    done: int = 0
    total: int | None = None
    groups_done: int = 0  # groups measured (a task counts each of its groups)
    peak_rss_mib: float | None = None
    restarts: int = 0
    history: list[str] = field(default_factory=list)  # tasks it finished, in order

    def summary(self) -> dict[str, Any]:
        return {"worker": self.index, "pid": self.pid, "groups": self.groups_done, "peak_rss_mib": self.peak_rss_mib,
                "restarts": self.restarts}  # fmt: skip


def measure_groups(
    spec: EngineSpec,
    by_group: dict[str, list[Point]],
    on_rows: Callable[[Rows], None],
    *,
    workers: int,
    executor: str = "local",
    address: str | None = None,
    threads: int | None = None,
    progress: Any = True,
    on_group: Callable[[str], None] | None = None,
    on_worker: Callable[[WorkerStatus], None] | None = None,
    pool: RayPool | None = None,
) -> list[dict[str, Any]]:
    """Measure every group on `workers` workers, calling `on_rows` with each group's rows as it finishes.

    Returns one summary per worker slot (pid, groups measured, peak RSS in MiB, restarts). With
    `executor="ray"`, `pool` is actors already started (`start_ray`); the caller closes it.
    """
    from prunecore.sensitivity import progress_bar

    threads = default_threads(threads, workers)
    per_group = spec.work_per_group()
    total = len(by_group) * per_group if per_group is not None else None
    tasks = worker_tasks(by_group, workers)
    # the bar opens once the workers are started: tqdm's monitor thread would stop them being forked
    hooks = _Hooks(on_rows, lambda: progress_bar(progress, total), on_group, on_worker, per_group, tasks)
    points = {label: [p for g in groups for p in by_group[g]] for label, groups in tasks.items()}
    own_pool = executor == "ray" and pool is None
    try:
        if executor == "ray":
            pool = pool or RayPool(spec, workers, threads, address)
            return pool.measure(points, hooks)
        return _run_local(spec, points, workers, threads, hooks)
    finally:
        hooks.close()
        if own_pool and pool is not None:
            pool.close()


def worker_tasks(by_group: dict[str, list[Point]], workers: int) -> dict[str, list[str]]:
    """Consecutive groups in tasks of about groups / (4 workers), each labelled by its groups ("a + b")."""
    names = list(by_group)
    size = max(1, math.ceil(len(names) / (4 * workers)))
    chunks = [names[i : i + size] for i in range(0, len(names), size)]
    return {" + ".join(chunk): chunk for chunk in chunks}


@dataclass
class _Hooks:
    on_rows: Callable[[Rows], None]
    make_bar: Callable[[], Any]
    on_group: Callable[[str], None] | None
    on_worker: Callable[[WorkerStatus], None] | None
    per_group: int | None
    tasks: dict[str, list[str]]  # label -> its groups
    bar: Any = None

    def tick(self, n: int) -> None:
        if self.bar is None:
            self.bar = self.make_bar()
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def total(self, task: str) -> int | None:
        return None if self.per_group is None else self.per_group * len(self.tasks[task])

    def started(self, status: WorkerStatus, task: str) -> None:
        status.group, status.done, status.total = task, 0, self.total(task)
        if self.on_group is not None:
            for group in self.tasks[task]:
                self.on_group(group)
        self.changed(status)

    def progressed(self, status: WorkerStatus, n: int) -> None:
        status.done += n
        self.tick(n)
        self.changed(status)

    def finished(self, status: WorkerStatus, rows: Rows, rss: float | None) -> None:
        self.on_rows(rows)
        total = self.total(status.group or "") or 0
        if status.done < total:  # Ray reports no ticks: the whole task at once
            self.tick(total - status.done)
        status.history.append(status.group or "")
        status.groups_done += len(self.tasks.get(status.group or "", ()))
        status.group, status.done = None, 0
        status.peak_rss_mib = rss if rss is not None else status.peak_rss_mib
        self.changed(status)

    def changed(self, status: WorkerStatus) -> None:
        if self.on_worker is not None:
            self.on_worker(status)


class _Retries:
    """Counts a task's lost workers, and workers lost while starting; past `MAX_RETRIES` (per task, per
    worker) the sweep stops with the reason."""

    def __init__(self) -> None:
        self.lost: collections.Counter[str] = collections.Counter()
        self.failed_starts = 0

    def lost_worker(self, task: str, why: str) -> None:
        self.lost[task] += 1
        if self.lost[task] > MAX_RETRIES:
            raise WorkerError(f"group(s) {task!r} lost their worker {self.lost[task]} times ({why}); the groups "
                              "finished so far are stored: re-run the sweep with a store to resume")  # fmt: skip

    def failed_start(self, workers: int, why: str) -> None:
        self.failed_starts += 1
        if self.failed_starts > MAX_RETRIES * workers:
            raise WorkerError(f"workers died {self.failed_starts} times while starting (the last: {why}); the groups "
                              "finished so far are stored: re-run the sweep with a store to resume")  # fmt: skip


# -- local processes --------------------------------------------------------------------------------
class _Local:
    """One worker process and the duplex pipe to it."""

    def __init__(self, ctx: Any, spec: EngineSpec | bytes, threads: int, status: WorkerStatus,
                 others: Sequence[Connection] = ()) -> None:  # fmt: skip
        self.conn, child = ctx.Pipe()
        # a forked child inherits the driver's ends of every pipe: it closes them, so that each worker
        # reads EOF when the driver dies (a spawned child inherits nothing)
        driver_ends = [*others, self.conn] if ctx.get_start_method() == "fork" else []
        self.proc = ctx.Process(target=_serve, args=(child, spec, threads, driver_ends), daemon=True,
                                name=f"prunecore-sweep-{status.index}")  # fmt: skip
        self.proc.start()
        child.close()  # the child holds its end; a dead child now reads as EOF here
        self.status = status
        self.status.pid = self.proc.pid

    def submit(self, group: str, points: list[Point]) -> None:
        self.conn.send((group, points))

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.conn.close()
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def _run_local(spec: EngineSpec, by_group: dict[str, list[Point]], workers: int, threads: int,
               hooks: _Hooks) -> list[dict[str, Any]]:  # fmt: skip
    blob: list[bytes] = []  # spawned workers get one pickle, made once whatever N; forked ones share the spec

    def start(status: WorkerStatus) -> _Local:
        method = start_method(spec.device)  # per start: a replacement forks only if there is still no thread
        if method == "spawn" and not blob:
            blob.append(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))
        others = [w.conn for w in pool if not w.conn.closed]
        return _Local(mp.get_context(method), spec if method == "fork" else blob[0], threads, status, others)

    queue = collections.deque(by_group)
    retries = _Retries()
    pool: list[_Local] = []
    for i in range(min(workers, len(queue))):
        pool.append(start(WorkerStatus(i)))
    hooks.tick(0)  # the progress bar, now that the workers are started
    try:
        while queue or any(w.status.group is not None for w in pool):
            for w in pool:
                if w.status.group is None and queue:
                    group = queue.popleft()
                    w.submit(group, by_group[group])
                    hooks.started(w.status, group)
            busy = {w.conn: w for w in pool if w.status.group is not None}
            for conn in wait(list(busy)):
                w = busy[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    hooks.tick(0)  # a progress callback may stop the sweep here (a cancelled job kills its workers)
                    group = w.status.group
                    w.proc.join(timeout=5)
                    retries.lost_worker(group, f"process {w.status.pid} ended with exit code {w.proc.exitcode}")
                    queue.appendleft(group)
                    replacement = WorkerStatus(w.status.index, restarts=w.status.restarts + 1,
                                               groups_done=w.status.groups_done, history=w.status.history)
                    w.close()
                    pool[pool.index(w)] = start(replacement)
                    continue
                kind = message[0]
                if kind == "tick":
                    hooks.progressed(w.status, message[1])
                elif kind == "rows":
                    hooks.finished(w.status, message[1], message[2])
                else:  # "error": the measurement itself failed; the same error would recur anywhere
                    raise _error(message[1], message[2])
    finally:
        for w in pool:
            w.close()
    return [w.status.summary() for w in pool]


def start_method(device: torch.device) -> str:
    """"fork" for CPU workers on Linux from a driver without other threads (fast, pages shared), else "spawn"."""
    forkable = sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()
    return "fork" if forkable and device.type == "cpu" and threading.active_count() == 1 else "spawn"


def _serve(conn: Connection, spec: EngineSpec | bytes, threads: int, driver_ends: Sequence[Connection]) -> None:
    """A worker process: build the engine once, then measure the groups the driver sends until told to stop."""
    for end in driver_ends:
        end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it then closes the pipe
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a forked copy of the driver's own handler
    torch.set_num_threads(threads)
    keep_freed_memory()
    try:
        # the driver's own pickle (never a file), or, forked, the driver's spec itself
        engine = (pickle.loads(spec) if isinstance(spec, bytes) else spec).build()
    except Exception as exc:
        conn.send(("error", _portable(exc), traceback.format_exc()))
        return
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the driver is gone
        if task is None:
            return
        _, points = task
        try:
            try:
                rows = engine.measure(points, tick=lambda n: conn.send(("tick", n)))
            except OSError as exc:
                if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                    return  # the driver died mid-group: nobody is left to report to
                raise
            except Exception as exc:
                conn.send(("error", _portable(exc), traceback.format_exc()))
                continue
            conn.send(("rows", rows, peak_rss_mib()))
        except (BrokenPipeError, ConnectionResetError):
            return


def _portable(exc: BaseException) -> BaseException | None:
    """`exc` when it survives pickling (so the driver raises the same error), else None."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return None


def _error(exc: BaseException | None, text: str) -> BaseException:
    if exc is not None:
        return exc
    return WorkerError(f"a sweep worker failed:\n{text}")


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB.

    Linux: `VmHWM`, which belongs to the process image, because `ru_maxrss` survives `exec` and would
    report the driver's peak in a freshly spawned worker. Elsewhere `ru_maxrss` (macOS counts bytes).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


# -- Ray ------------------------------------------------------------------------------------------
class _SweepActor:
    """A Ray actor: one engine, built from the spec it reads once from the object store.

    The spec's reference comes inside a list, so Ray leaves it unread until `prepare`: a model that
    cannot load on this node (its class's package missing there) fails in `prepare` with its own
    error, which the driver raises as such, instead of killing the actor in its constructor.
    """

    def __init__(self, spec_ref: list[Any], threads: int) -> None:
        torch.set_num_threads(threads)
        keep_freed_memory()  # the actor's process is its own: Ray starts one per actor
        self.spec_ref = spec_ref[0]
        self.engine: SuffixEngine | None = None  # built by `prepare`, which the pool awaits before any task

    def prepare(self) -> None:
        import ray
        from ray.exceptions import RaySystemError

        try:
            spec: EngineSpec = ray.get(self.spec_ref)
        except RaySystemError as exc:  # the spec does not unpickle on this node: raise why, as itself
            if isinstance(exc.client_exc, Exception):
                raise exc.client_exc from None
            raise
        self.engine = spec.build(device=_ray_device(spec.device))
        self.engine.prepare()  # the dense passes every group starts from, before the first task arrives

    def pid(self) -> int:
        return os.getpid()

    def measure(self, points: list[Point]) -> tuple[Rows, float]:
        return self.engine.measure(points), peak_rss_mib()


def _ray_device(device: torch.device) -> torch.device:
    """On a Ray GPU worker, the GPU Ray assigned (it sets CUDA_VISIBLE_DEVICES, so index 0)."""
    return torch.device("cuda", 0) if device.type == "cuda" else device


class RayPool:
    """Ray sweep actors, started before the driver knows which points remain (`start_ray`).

    Starting them is seconds of work that runs outside the driver: Ray's own processes, then each
    actor importing torch, reading the spec from the object store and running the engine's dense
    passes. `sweep` starts the pool before it evaluates the dense model and scores the channels, so
    those seconds overlap instead of adding up; `close` kills the actors, also when nothing was left
    to measure. The cluster itself stays up for later sweeps of this process (Ray stops it at exit).

    Tasks go only to actors that have started. A cluster without room for all of them (fewer free
    CPUs than `workers` x `threads`, or an autoscaler still adding nodes) sweeps on those it has,
    instead of waiting forever on a task queued at an actor Ray cannot place; a warning says so
    when none has started after `STALL_WARNING_S`.
    """

    STALL_WARNING_S = 60.0

    def __init__(self, spec: EngineSpec, workers: int, threads: int, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise WorkerError("executor='ray' needs Ray: pip install 'prunecore[ray]'") from None
        self.ray, self.threads = ray, threads
        if not ray.is_initialized():
            cluster: dict[str, Any] = {}
            if address is None and not os.environ.get("RAY_ADDRESS"):
                # "local": a cluster of this process's own, even where `ray start` runs one on this machine
                # (plain ray.init() would join that one and then refuse the sizes given here)
                address, cluster = "local", dict(num_cpus=workers * threads,
                                                 _system_config=ray_system_config(spec.model))  # fmt: skip
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     **cluster)  # fmt: skip
        self.gpus = 1 if spec.device.type == "cuda" else 0
        self.actor_class = ray.remote(num_cpus=threads, num_gpus=self.gpus, max_restarts=0)(_SweepActor)
        self.spec_ref = ray.put(spec)  # one copy in the object store, read by every actor
        self.actors: list[Any] = []
        self.preparing: list[Any] = []  # per actor: its `prepare` call, None once it has returned
        for _ in range(workers):
            actor, prepared = self._start()
            self.actors.append(actor)
            self.preparing.append(prepared)

    def _start(self) -> tuple[Any, Any]:
        actor = self.actor_class.remote([self.spec_ref], self.threads)
        return actor, actor.prepare.remote()  # an actor is ready for tasks once this returns

    def _replace(self, index: int) -> None:
        """A new actor in place of a lost one; it takes tasks once it has started in turn."""
        self.actors[index], self.preparing[index] = self._start()

    def measure(self, by_group: dict[str, list[Point]], hooks: _Hooks) -> list[dict[str, Any]]:
        """Every task on the started actors (a lost actor is replaced and its task re-run); per-actor summaries."""
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        queue = collections.deque(by_group)
        retries = _Retries()
        slots = [WorkerStatus(i) for i in range(len(self.actors))]
        hooks.tick(0)  # the progress bar
        running: dict[Any, WorkerStatus] = {}
        warned = False
        try:
            while queue or running:
                for s in slots:
                    if s.group is None and queue and self.preparing[s.index] is None:
                        group = queue.popleft()
                        running[self.actors[s.index].measure.remote(by_group[group])] = s
                        hooks.started(s, group)
                starting = {ref: slots[i] for i, ref in enumerate(self.preparing) if ref is not None}
                stalled = not running and not warned  # nothing measures yet: say so if it lasts
                ready, _ = self.ray.wait([*running, *starting], num_returns=1,
                                         timeout=self.STALL_WARNING_S if stalled else None)  # fmt: skip
                if not ready:
                    warnings.warn(self._stall_message(), RuntimeWarning, stacklevel=2)
                    warned = True
                    continue
                ref = ready[0]
                if ref in starting:
                    s = starting[ref]
                    try:
                        self.ray.get(ref)
                        self.preparing[s.index] = None
                    except RayActorError as exc:
                        retries.failed_start(len(self.actors), f"Ray actor died: {str(exc).splitlines()[0]}")
                        self._replace(s.index)
                    continue
                s = running.pop(ref)
                try:
                    rows, rss = self.ray.get(ref)
                except RayActorError as exc:
                    retries.lost_worker(s.group, f"Ray actor died: {str(exc).splitlines()[0]}")
                    queue.appendleft(s.group)
                    s.group, s.restarts = None, s.restarts + 1
                    self._replace(s.index)
                    continue
                hooks.finished(s, rows, rss)
            for s in slots:
                if self.preparing[s.index] is not None:
                    continue  # never started (no room on the cluster): no pid, nothing measured
                try:
                    s.pid = self.ray.get(self.actors[s.index].pid.remote(), timeout=60)
                except (RayActorError, GetTimeoutError):  # it died after its last task: every row is in
                    s.pid = None
        except RayTaskError as exc:
            raise exc.as_instanceof_cause() from None  # the measurement's own error, as in one process
        return [s.summary() for s in slots]

    def _stall_message(self) -> str:
        asks = f"{self.threads} CPU(s)" + (f" and {self.gpus} GPU" if self.gpus else "")
        free = self.ray.available_resources()
        return (f"no Ray sweep actor has started after {self.STALL_WARNING_S:.0f} s (each asks for {asks}; the "
                f"cluster has {free.get('CPU', 0):g} CPU(s) and {free.get('GPU', 0):g} GPU(s) free): the sweep waits "
                "until one has. Where the cluster lacks room, fewer workers or threads, or more nodes, would start "
                "it; a large model may only be slow to load.")  # fmt: skip

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors, self.preparing = [], []


def preload_modules(model: nn.Module | None = None) -> list[str]:
    """Modules a Ray worker should import as it starts, before any sweep reaches it.

    Ray starts its worker processes with the cluster, but a process imports torch, prunecore and
    the model's own classes only once the first actor's arguments arrive: about 2 s on a 2-core
    machine, paid by every actor of every sweep, while the driver waits. Ray's
    `preload_python_modules` setting moves that import to the worker's start. The list is
    prunecore's worker module plus the module of every class in `model` (torch's own excluded:
    prunecore imports it), skipping `__main__`, which a worker cannot import.
    """
    own = {type(m).__module__ for m in model.modules()} if model is not None else set()
    own = {m for m in own if m != "__main__" and m != "torch" and not m.startswith("torch.")}
    return [__name__, *sorted(own - {__name__})]


def ray_system_config(model: nn.Module | None = None) -> dict[str, Any]:
    """`_system_config` for a Ray cluster that sweeps `model`: its workers preload `preload_modules(model)`.

    `sweep(..., executor="ray")` starts its local cluster with it. For a cluster of your own, give
    every node the same setting as it starts, e.g.
    `RAY_preload_python_modules=prunecore.workers,torchvision.models.resnet ray start --head`.
    """
    return {"preload_python_modules": preload_modules(model)}


def start_ray(spec: EngineSpec, workers: int, threads: int | None = None, address: str | None = None) -> RayPool:
    """`workers` Ray actors measuring with `spec` (a local cluster unless `address` or RAY_ADDRESS names one)."""
    return RayPool(spec, workers, default_threads(threads, workers), address)


def default_threads(threads: int | None, workers: int) -> int:
    """Threads per worker: `threads`, else this process's threads divided among the workers."""
    return threads or max(1, torch.get_num_threads() // workers)
