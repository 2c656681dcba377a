"""Sweeps, plan measurements and fine-tunings as background jobs: a worker process per job, results by the store.

A dashboard sweep must outlive the browser tab that asked for it, and two sessions asking for the
same sweep must share it. So a sweep runs in a process of its own, not in a thread: Streamlit's
script thread dies with its session (closing the tab would stop the sweep), torch holds the GIL in
its Python parts (a sweep thread would slow every page of the app), and a crash in a user's model
(a segfault, an out-of-memory kill) takes down one worker, never the app.

    >>> job = SweepJob("sample:resnet20", "sample", store="runs.sqlite", levels=(0.3, 0.6))
    >>> key = submit(job)                      # returns at once; the worker sweeps in the background
    >>> status(key, job.store).state           # starting, running, then done (or failed, cancelled, died)
    'running'
    >>> cancel(key, job.store)                 # stops after the current batch; finished groups stay stored
    True
    >>> submit(job) == key                     # the same job again resumes from the stored points
    True

A `MeasureJob` applies one plan and measures it (`prunecore.measure.measure_plan`: metrics after
BatchNorm re-estimation, size, latency); its key names the plan's kept units, so measuring the same
plan again, from any session, reads the stored result (`result(key)`) instead of starting a worker.

A `RefineJob` refines one plan by measured moves within its budget (`prunecore.refine`), on the
allocation problem of a stored run, and writes the `Refined` result (`result(key)`).

A `FinetuneJob` applies one plan, re-estimates BatchNorm and fine-tunes the pruned model
(`prunecore.recover.finetune`) with a checkpoint in its folder, so a cancelled job submitted again
continues from its last finished epoch. After every epoch it rewrites `history.json` (`history(key)`,
a `Recovery`: what a page draws while it trains); at the end it writes the recovered model,
`recovered.pt` (`prunecore.load_pruned` reads it), and `result.json` (`result(key)`).

A job lives in `<store folder>/jobs/<key>/`: `job.json` (the job), `status.json` (what the worker
reports, written atomically about once a second), `worker.log` (its output and tracebacks),
`result.json` (a measurement's, a refinement's or a fine-tuning's result; a fine-tuning also keeps `finetune.pt`,
its checkpoint, `history.json` and `recovered.pt`) and `lock`, which the worker holds (`flock`)
until it has written its final status. A lock nobody holds means no worker, whatever `status.json`
last said: a "running" job whose worker is gone (killed, crashed) reads as "died", and submitting it
again resumes it. `submit` takes the lock itself and hands it to the worker it starts (an inherited
file descriptor), so a second `submit` never starts a second worker.

Test hook: `PRUNECORE_JOBS_TEST_DELAY=<seconds>` in a worker's environment makes it wait that long
after every batch (a measurement: every step; a fine-tuning: every training batch), a cancel cutting the
wait short, so tests can act while a job is mid-way.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from prunecore.errors import UserError
from prunecore.files import write_atomic

if TYPE_CHECKING:
    from prunecore.recover import EpochRecord

# torch and the engine are imported inside the worker, after it has set up its SIGTERM handler

__all__ = ["DELAY_ENV", "FinetuneJob", "Job", "JobError", "JobStatus", "MeasureJob", "Recovery", "RefineJob", "STATES",
           "SweepJob", "cancel", "history", "job_key", "list_jobs", "main", "read_job", "result", "status",
           "submit"]  # fmt: skip

STATES = ("starting", "running", "done", "failed", "cancelled", "died")
"""What `JobStatus.state` can be; "died" is never written, it is read from a running job without a worker."""
ACTIVE = ("starting", "running")
DELAY_ENV = "PRUNECORE_JOBS_TEST_DELAY"
"""Test hook: seconds a worker waits after every batch (see the module docstring)."""
_WRITE_EVERY = 1.0  # seconds between status writes while a sweep runs


class JobError(UserError, ValueError):
    """A job cannot be submitted or read: a missing weights file, an unknown key, a damaged job file."""


@dataclass(frozen=True)
class SweepJob:
    """One sweep as plain values: what to load, how to sweep it, and the run store to fill.

    Paths are made absolute and sequences tuples, so a job equals itself read back from JSON.
    """

    model: str  # a model spec, as `load_model` takes it
    data: str  # a data spec, as `load_data` takes it
    store: str  # the run store file
    levels: tuple[float, ...]  # sparsities, sorted
    weights: str | None = None  # a state_dict file for the model
    input_shape: tuple[int, ...] | None = None  # None: `default_input_shape(model)`
    limit: int | None = None  # only the first N images of the data
    criterion: str = "l1"
    metrics: tuple[str, ...] = ("accuracy",)
    groups: tuple[str, ...] | None = None  # None: every prunable group
    bn_recalibration: int = 0
    mode: str = "exact"
    round_to: int = 1
    calibrate: int = 0  # then fit a predictor on about this many random plans + 20 method plans (0: no)
    device: str | None = None  # where points run (None: CUDA when present, else the CPU)
    workers: int = 1  # local worker processes measuring groups
    autocast: str | None = None  # "bf16"/"fp16": evaluate in mixed precision (changes the numbers: in the run id)
    channels_last: bool = False  # evaluate on channels-last images and weights (in the run id)

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        fix("store", str(Path(self.store).expanduser().resolve()))
        if self.weights is not None:
            fix("weights", str(Path(self.weights).expanduser().resolve()))
        fix("levels", tuple(sorted({float(s) for s in self.levels})))
        fix("metrics", (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics))
        if self.groups is not None:
            fix("groups", tuple(self.groups))
        if self.input_shape is not None:
            fix("input_shape", tuple(int(n) for n in self.input_shape))

    kind = "sweep"  # a class attribute, not a field: `job.json` names it, `read_job` reads it

    def config(self) -> Any:
        """The job's `SweepConfig`: the settings its run id digests (device and workers are not among them)."""
        from prunecore.sensitivity import SweepConfig

        return SweepConfig(levels=self.levels, criterion=self.criterion, metric=self.metrics, groups=self.groups,
                           bn_recalibration=self.bn_recalibration, round_to=self.round_to, mode=self.mode,
                           autocast=self.autocast, channels_last=self.channels_last)  # fmt: skip

    def to_json(self) -> str:
        """The job as a JSON object, one key per field, and its kind."""
        return _to_json(self)

    @classmethod
    def from_json(cls, text: str) -> SweepJob:
        """The job `to_json` wrote; `JobError` for anything else."""
        return _from_json(cls, text)


@dataclass(frozen=True)
class MeasureJob:
    """One plan measurement as plain values: the dense model and data, the plan, and how to measure.

    `plan` is the plan's JSON. `metrics` empty: `measure.default_metrics`. `int8` also measures the
    pruned model as INT8 in ONNX Runtime (it needs `latency`). The key digests the plan's kept units,
    inputs and fingerprint only (not its timestamp or predictions), so the same pruned model measured
    the same way is one job; `int8` counts only when set, so jobs without it keep the keys they had.
    """

    model: str  # a model spec, as `load_model` takes it
    data: str  # a data spec, as `load_data` takes it
    store: str  # the run store file: the job lives in its jobs folder
    plan: str  # the plan's JSON
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    limit: int | None = None
    metrics: tuple[str, ...] = ()
    bn_recalibration: int = 0
    latency: bool = True
    int8: bool = False
    device: str | None = None  # where the metrics are measured (None: CUDA when present, else the CPU)

    kind = "measure"

    def __post_init__(self) -> None:
        _normalise(self)
        object.__setattr__(self, "int8", bool(self.int8))
        if self.int8 and not self.latency:
            raise JobError("an INT8 measurement times the INT8 model beside the float ones: it needs latency=True")

    def to_json(self) -> str:
        return _to_json(self)

    @classmethod
    def from_json(cls, text: str) -> MeasureJob:
        return _from_json(cls, text)


@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tuning of a plan's pruned model as plain values: the dense model, the data, the plan, the recipe.

    The worker applies `plan` to the dense model, re-estimates BatchNorm on `bn_recalibration`
    calibration batches (the one-shot model `measure_plan` measures), then trains it with
    `prunecore.recover.finetune`: on `train` data (None: the training split of `data`), `distill`
    0 on labels only, above 0 also from the dense model as teacher. Held-out metrics (`metrics`
    empty: accuracy and loss, or kl and agreement without labels) come from `data` after every
    epoch. The key digests the plan as a `MeasureJob`'s does: what it prunes, not when it was made.
    """

    model: str  # a model spec, as `load_model` takes it
    data: str  # held-out data, as `load_data` takes it: the metrics after each epoch, BatchNorm's calibration
    store: str  # the run store file: the job lives in its jobs folder
    plan: str  # the plan's JSON
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    limit: int | None = None  # only the first N held-out (and calibration) images
    train: str | None = None  # training data, as `load_train` takes it; None: `data`
    train_limit: int | None = None  # only the first N training images
    epochs: int = 1
    lr: float = 0.01
    distill: float = 0.0  # the distillation weight; 0: no teacher, labels only
    temperature: float = 4.0
    bn_recalibration: int = 0
    metrics: tuple[str, ...] = ()
    device: str | None = None  # where it trains and is measured (None: CUDA when present, else the CPU)

    kind = "finetune"

    def __post_init__(self) -> None:
        _normalise(self)
        object.__setattr__(self, "epochs", int(self.epochs))
        for name in ("lr", "distill", "temperature"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_json(self) -> str:
        return _to_json(self)

    @classmethod
    def from_json(cls, text: str) -> FinetuneJob:
        return _from_json(cls, text)


@dataclass(frozen=True)
class RefineJob:
    """One refinement of a plan as plain values: the dense model and data, the run whose curves make the
    allocation problem, the plan, and how many measured moves (`prunecore.refine`).

    The worker rebuilds the problem the Plan page allocates on: the run's curves, its stored predictor
    (if any) and `ties`. Plans are measured on `data` as the sweep measured its points (BatchNorm
    re-estimated on `bn_recalibration` calibration batches); the plan's own budget is kept and `frozen`
    groups stay as they are. The key digests the plan by what it prunes and by its budget.
    """

    model: str  # a model spec, as `load_model` takes it
    data: str  # the sweep's data, as `load_data` takes it
    store: str  # the run store file: the run's curves, and the job's folder
    run_id: str  # the sweep whose curves (and predictor) make the problem
    plan: str  # the plan's JSON, allocated for a budget
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    limit: int | None = None
    steps: int = 30
    bn_recalibration: int = 0
    frozen: tuple[str, ...] = ()
    ties: tuple[tuple[str, ...], ...] = ()
    device: str | None = None  # where plans are measured (None: CUDA when present, else the CPU)

    kind = "refine"

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", str(Path(self.store).expanduser().resolve()))
        if self.weights is not None:
            object.__setattr__(self, "weights", str(Path(self.weights).expanduser().resolve()))
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", tuple(int(n) for n in self.input_shape))
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "frozen", tuple(self.frozen))
        object.__setattr__(self, "ties", tuple(tuple(t) for t in self.ties))

    def to_json(self) -> str:
        return _to_json(self)

    @classmethod
    def from_json(cls, text: str) -> RefineJob:
        return _from_json(cls, text)


Job = SweepJob | MeasureJob | FinetuneJob | RefineJob
_KINDS: dict[str, type] = {"sweep": SweepJob, "measure": MeasureJob, "finetune": FinetuneJob, "refine": RefineJob}
RECOVERY_FORMAT = "prunecore.recovery/1"


@dataclass(frozen=True)
class Recovery:
    """A fine-tuning job's record: the dense and the one-shot metrics, then one `EpochRecord` per finished epoch.

    `before` is the pruned model before training (BatchNorm re-estimated), so the first point of
    a curve is what one-shot pruning gave. `history(key)` reads it while the job trains, `result(key)`
    once it is done; only then is `model_file` set, the recovered model `load_pruned` reads.
    """

    before: Mapping[str, float]
    dense: Mapping[str, float]
    history: tuple[EpochRecord, ...] = ()
    epochs: int = 0  # the epochs asked for
    data: str = ""  # what the metrics are measured on (`EvalData.description`)
    train: str = ""  # what it trains on (`TrainData.description`)
    model_file: str | None = None

    @property
    def metrics(self) -> Mapping[str, float]:
        """The held-out metrics now: the last finished epoch's, else the one-shot model's."""
        return self.history[-1].metrics if self.history else self.before

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe plain values, tagged with `RECOVERY_FORMAT` (not `model_file`: the job's folder says it)."""
        records = [e.to_dict() for e in self.history]
        return {"format": RECOVERY_FORMAT, "before": dict(self.before), "dense": dict(self.dense), "history": records,
                "epochs": self.epochs, "data": self.data, "train": self.train}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any, model_file: str | None = None) -> Recovery:
        """Inverse of `to_dict`; `JobError` for anything else."""
        if not isinstance(data, Mapping) or data.get("format") != RECOVERY_FORMAT:
            raise JobError(f"not a fine-tuning record of format {RECOVERY_FORMAT!r}")
        try:
            fields = {k: v for k, v in data.items() if k != "format"}
            history = _records(fields.pop("history"))
            return cls(**fields, history=history, model_file=model_file)
        except (KeyError, TypeError, ValueError) as exc:
            raise JobError(f"malformed fine-tuning record: {type(exc).__name__}: {exc}") from None


def _records(items: Sequence[Mapping[str, Any]]) -> tuple[EpochRecord, ...]:
    """Epoch records from their plain dicts (a checkpoint's history, or a `Recovery` read back from JSON)."""
    from prunecore.recover import EpochRecord

    return tuple(EpochRecord.from_dict(e) for e in items)


def _normalise(job: MeasureJob | FinetuneJob) -> None:
    """Absolute paths and tuples in a job's fields, so a job equals itself read back from JSON."""
    object.__setattr__(job, "store", str(Path(job.store).expanduser().resolve()))
    if job.weights is not None:
        object.__setattr__(job, "weights", str(Path(job.weights).expanduser().resolve()))
    object.__setattr__(job, "metrics", (job.metrics,) if isinstance(job.metrics, str) else tuple(job.metrics))
    if job.input_shape is not None:
        object.__setattr__(job, "input_shape", tuple(int(n) for n in job.input_shape))


def _to_json(job: Job) -> str:
    return json.dumps({"kind": job.kind, **dataclasses.asdict(job)}, sort_keys=True)


def _from_json(cls: type, text: str) -> Any:
    try:
        fields = json.loads(text)
        kind = fields.pop("kind", "sweep")  # jobs written before measurements existed are sweeps
        if kind != cls.kind:
            raise ValueError(f"it is a {kind} job")
        return cls(**fields)
    except (TypeError, ValueError, AttributeError) as exc:  # not JSON, not an object, unknown or missing fields
        raise JobError(f"not a {cls.kind} job: {exc}") from None


@dataclass(frozen=True)
class JobStatus:
    """What a job's worker last reported, with "died" for a job whose worker is gone."""

    key: str
    state: str  # one of STATES
    pid: int | None = None  # the worker (and its process group)
    run_id: str | None = None  # the run in the store, once the worker has opened it
    done: int = 0  # batches measured, of `total`: the groups left to sweep (a resumed job counts only those)
    total: int = 0
    group: str | None = None  # the group being measured
    started: str | None = None  # ISO 8601 UTC: when the worker started
    updated: str | None = None  # ISO 8601 UTC: the last write
    eta_s: float | None = None  # seconds left, from the rate so far; None until known
    error: str | None = None  # one line, when failed
    unit: str = "batches"  # what done and total count: batches, steps (a measurement), plans (calibration), epochs
    workers: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per sweep worker: group, done, total


def job_key(job: Job) -> str:
    """16 hex digits naming the job: a SHA-256 of its JSON, with the weights file's content instead of its path.

    A measurement's or a fine-tuning's plan counts by what it prunes (`_plan_identity`); sweeps keep their old
    keys.
    """
    fields = dataclasses.asdict(job)
    if job.weights is not None:
        fields["weights"] = "sha256:" + _digest(Path(job.weights))
    if isinstance(job, RefineJob):
        fields["kind"], fields["plan"] = job.kind, _plan_identity(job.plan)
        allocation = json.loads(job.plan).get("allocation")  # the plan's JSON parsed above: refinement keeps its budget
        fields["budget"] = allocation.get("budget") if isinstance(allocation, dict) else None
    elif isinstance(job, (MeasureJob, FinetuneJob)):
        fields["kind"], fields["plan"] = job.kind, _plan_identity(job.plan)
        if isinstance(job, MeasureJob) and not job.int8:
            del fields["int8"]  # measurements keep the keys they had before INT8 existed
        if job.device is None:
            del fields["device"]  # and the keys they had before the device choice
    else:  # sweeps keep the keys they had before these fields existed, while they hold their defaults
        for name, default in (("calibrate", 0), ("device", None), ("workers", 1), ("autocast", None),
                              ("channels_last", False)):  # fmt: skip
            if fields[name] == default:
                del fields[name]
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def submit(job: Job) -> str:
    """Start a worker for `job` and return its key, unless one runs already or the job is done.

    The weights file is copied into the jobs folder under its digest, so the worker reads exactly
    the bytes the key names (a temporary upload may be deleted once this returns).
    """
    key = job_key(job)
    folder = _jobs_folder(job.store) / key
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise JobError(f"job folder {folder} cannot be written: {exc.strerror or exc}") from None
    try:
        if not _lock(fd) or _finished(folder, job):
            return key  # a worker holds the lock: share it; or nothing is left to do
        write_atomic(folder / "job.json", _stash_weights(job, folder.parent).to_json(), what="job file")
        write_atomic(folder / "status.json", json.dumps({"state": "starting", "updated": _now()}), what="job status")
        _spawn(folder, fd)
    finally:
        os.close(fd)  # the worker holds its own copy of the descriptor, and so the lock
    return key


def status(key: str, store: str | Path | None = None) -> JobStatus:
    """The job's last reported status; "died" where it says running but no worker holds the lock."""
    folder = _jobs_folder(store) / key
    alive = _held(folder / "lock")  # before reading: a worker that ends has written its last status
    try:
        fields = json.loads((folder / "status.json").read_text())
    except FileNotFoundError:
        raise JobError(f"no job {key!r} in {folder.parent}") from None
    except ValueError as exc:
        raise JobError(f"job {key!r}: status.json is not JSON ({exc}); submit the job again") from None
    if fields.get("state") in ACTIVE and not alive:
        fields["state"] = "died"
    known = {f.name for f in dataclasses.fields(JobStatus)} - {"key"}
    return JobStatus(key=key, **{name: value for name, value in fields.items() if name in known})


def list_jobs(store: str | Path | None = None, kind: str | None = None) -> list[JobStatus]:
    """The statuses of the store's jobs (of one `kind`: "sweep", "measure", "finetune"), most recently updated
    first."""
    path, jobs = str(_store_path(store)), _jobs_folder(store)
    found = []
    for folder in sorted(jobs.iterdir()) if jobs.is_dir() else []:
        if (folder / "status.json").is_file() and (folder / "job.json").is_file():
            job = read_job(folder.name, store)
            if job.store == path and kind in (None, job.kind):  # stores in one folder share its jobs folder
                found.append(status(folder.name, store))
    return sorted(found, key=lambda s: s.updated or "", reverse=True)


def read_job(key: str, store: str | Path | None = None) -> Job:
    """The job a key names (its weights path is the copy in the jobs folder)."""
    path = _jobs_folder(store) / key / "job.json"
    if not path.is_file():
        raise JobError(f"no job {key!r} in {path.parent.parent}")
    return _parse_job(path.read_text())


def _parse_job(text: str) -> Job:
    """A job file's job, of the kind it names (none: a sweep, as jobs were before measurements)."""
    try:
        kind = json.loads(text).get("kind", "sweep")
    except (ValueError, AttributeError):
        kind = "sweep"  # from_json says what is wrong with it
    return _KINDS.get(kind, SweepJob).from_json(text)


def result(key: str, store: str | Path | None = None) -> Any:
    """A finished measurement's `PlanMeasurement`, a finished fine-tuning's `Recovery` (its `model_file` set), or a
    finished refinement's `prunecore.refine.Refined`; None while it has none (not done, or a sweep)."""
    from prunecore.measure import MeasureError, PlanMeasurement
    from prunecore.refine import FORMAT as REFINED_FORMAT
    from prunecore.refine import Refined

    folder = _jobs_folder(store) / key
    try:
        data = json.loads((folder / "result.json").read_text())
        if isinstance(data, dict) and data.get("format") == RECOVERY_FORMAT:
            return Recovery.from_dict(data, model_file=str(folder / "recovered.pt"))
        if isinstance(data, dict) and data.get("format") == REFINED_FORMAT:
            return Refined.from_dict(data)
        return PlanMeasurement.from_dict(data)
    except FileNotFoundError:
        return None
    except (ValueError, MeasureError) as exc:  # JobError and AllocationError are ValueErrors too
        raise JobError(f"job {key!r}: result.json cannot be read ({exc}); submit the job again") from None


def history(key: str, store: str | Path | None = None) -> Recovery | None:
    """A fine-tuning job's epochs so far (`model_file` unset); None before its worker has evaluated the one-shot
    model, or for another kind of job."""
    path = _jobs_folder(store) / key / "history.json"
    try:
        return Recovery.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise JobError(f"job {key!r}: history.json cannot be read ({exc}); submit the job again") from None


def cancel(key: str, store: str | Path | None = None) -> bool:
    """Ask the job's worker to stop (SIGTERM); False if no worker runs it (or it is still starting).

    The worker stops after the current batch and reports "cancelled"; groups already finished stay
    in the store, and `submit` resumes from them. A second cancel stops the worker at once (for
    steps that report no batches, such as `mode="estimate"`).
    """
    current = status(key, store)
    if current.state not in ACTIVE or current.pid is None:
        return False
    try:
        os.killpg(current.pid, signal.SIGTERM)  # the worker leads its own session, so its group is its pid
    except ProcessLookupError:
        return False
    return True


# -- submitting ------------------------------------------------------------------------------------
def _store_path(store: str | Path | None) -> Path:
    if store is None:
        from prunecore.store import default_store_path

        store = default_store_path()
    return Path(store).expanduser().resolve()


def _jobs_folder(store: str | Path | None) -> Path:
    return _store_path(store).parent / "jobs"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        raise JobError(f"weights file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    return h.hexdigest()


def _plan_identity(text: str) -> str:
    """What a plan prunes, as one string: its inputs, fingerprint and kept units (not when it was made)."""
    try:
        data = json.loads(text)
        kept = {name: g["keep"] for name, g in data["groups"].items()}
        return json.dumps([data.get("inputs"), data.get("fingerprint"), kept], sort_keys=True, separators=(",", ":"))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise JobError(f"the plan to measure is not a plan's JSON: {type(exc).__name__}: {exc}") from None


def _stash_weights(job: Job, jobs: Path) -> Job:
    if job.weights is None:
        return job
    copy = jobs / "weights" / f"{_digest(Path(job.weights))}.pt"
    if not copy.is_file():
        with open(job.weights, "rb") as source:
            write_atomic(copy, lambda f: shutil.copyfileobj(source, f), what="weights copy")
    return dataclasses.replace(job, weights=str(copy))


def _lock(fd: int, tries: int = 3) -> bool:
    """Take the job's lock if no worker holds it; retries ride out a `status` probe that holds it for a moment."""
    for i in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if i + 1 < tries:
                time.sleep(0.05)
    return False


def _held(path: Path) -> bool:
    """Whether a worker (or a submit) holds the lock file at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the probe's own shared lock


def _finished(folder: Path, job: Job) -> bool:
    """Whether the job's last worker finished: its run complete in the store, or its result (and model) written."""
    try:
        last = json.loads((folder / "status.json").read_text())
    except (OSError, ValueError):
        return False
    if isinstance(job, (MeasureJob, RefineJob)):
        return last.get("state") == "done" and (folder / "result.json").is_file()
    if isinstance(job, FinetuneJob):
        return last.get("state") == "done" and all((folder / f).is_file() for f in ("result.json", "recovered.pt"))
    if last.get("state") != "done" or not last.get("run_id"):
        return False
    from prunecore.store import RunStore, StoreError

    runs = RunStore(job.store)
    try:
        calibrated = not job.calibrate or runs.get_predictor(last["run_id"]) is not None
        return runs.get(last["run_id"]).complete and calibrated
    except StoreError:  # the run was deleted since
        return False
    finally:
        runs.close()


def _spawn(folder: Path, lock_fd: int) -> None:
    command = [sys.executable, "-m", "prunecore.jobs", str(folder), "--lock-fd", str(lock_fd)]
    with open(folder / "worker.log", "ab") as log:
        worker = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, pass_fds=(lock_fd,))  # fmt: skip
    # reap the worker when it ends, so a long-lived app keeps no zombie (the thread dies with the app, the worker not)
    threading.Thread(target=worker.wait, daemon=True, name=f"reap job {folder.name}").start()


# -- the worker ------------------------------------------------------------------------------------
class _Cancelled(BaseException):
    """Raised in the worker to stop the sweep; a BaseException so that no `except Exception` swallows it."""


class _Worker:
    """The worker's status (written to `status.json`), its progress callbacks and its cancel flag."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fields = dataclasses.asdict(JobStatus(folder.name, "running", pid=os.getpid(), started=_now()))
        self.written = 0.0
        self.first: tuple[float, float] | None = None  # (time, done) at the first batch: the origin of the rate
        self.stopping = False
        self.delay = float(os.environ.get(DELAY_ENV) or 0)

    def on_sigterm(self, signum: int, frame: Any) -> None:
        if self.stopping:
            raise _Cancelled  # a second cancel: stop wherever the worker is
        self.stopping = True  # the first: stop at the next batch

    def check(self) -> None:
        if self.stopping:
            raise _Cancelled

    def write(self, force: bool = False, **fields: Any) -> None:
        self.fields.update(fields)
        if force or time.monotonic() - self.written >= _WRITE_EVERY:
            self.fields["updated"] = _now()
            write_atomic(self.folder / "status.json", json.dumps(self.fields), what="job status")
            self.written = time.monotonic()

    def opened(self, run_id: str, stored: int, expected: int) -> None:
        _log(f"run {run_id}: {stored} of {expected} points already stored")
        self.write(force=True, run_id=run_id)

    def progress(self, done: int, total: int) -> None:
        self.pause()
        self.write(done=done, total=total, eta_s=self.eta(done, total))

    def pause(self) -> None:
        """After a batch: wait the test hook's delay (a cancel cuts it short), then stop if cancelled."""
        end = time.monotonic() + self.delay
        while not self.stopping and time.monotonic() < end:
            time.sleep(0.05)
        self.check()

    def eta(self, done: float, total: float) -> float | None:
        """Seconds left at the rate since the first call; None until two calls apart in `done`."""
        now = time.monotonic()
        if self.first is None:
            self.first = (now, done)
        if total and done > self.first[1]:
            return round((total - done) * (now - self.first[0]) / (done - self.first[1]), 1)
        return None

    def on_group(self, name: str) -> None:
        self.check()
        self.write(group=name)

    def on_worker(self, status: Any) -> None:
        """A sweep worker's progress (`prunecore.workers.WorkerStatus`), one entry per worker in the status."""
        entries = {w["worker"]: w for w in self.fields["workers"]}
        entries[status.index] = {"worker": status.index, "pid": status.pid, "group": status.group,
                                 "done": status.done, "total": status.total, "groups_done": status.groups_done,
                                 "peak_rss_mib": status.peak_rss_mib, "restarts": status.restarts}  # fmt: skip
        self.write(workers=[entries[i] for i in sorted(entries)])


class _OpeningStore:
    """A `RunStore` that tells the worker the run id the moment `sweep` opens its run."""

    def __init__(self, store: Any, opened: Callable[[str, int, int], None]) -> None:
        self.store, self.opened = store, opened

    def open_run(self, run_id: str, *args: Any) -> None:
        self.store.open_run(run_id, *args)
        info = self.store.get(run_id)
        self.opened(run_id, info.points, info.expected)

    def __getattr__(self, name: str) -> Any:  # every other method is the store's own
        return getattr(self.store, name)


def _sweep(job: SweepJob, worker: _Worker) -> str:
    """Load the model and the data, sweep into the store, and return the run id."""
    from prunecore.datasets import load_data
    from prunecore.graph import trace
    from prunecore.models import ModelSpecError, default_input_shape, example_input, load_model
    from prunecore.sensitivity import sweep
    from prunecore.store import RunStore

    model = load_model(job.model, job.weights)
    shape = job.input_shape or default_input_shape(job.model)
    if shape is None:
        raise ModelSpecError(f"give an input shape: prunecore cannot know what input {job.model} expects")
    example = example_input(job.model, tuple(shape))  # as the dashboard makes it
    data = load_data(job.data, input_shape=tuple(shape), limit=job.limit, model=job.model)
    worker.check()
    graph = trace(model, example)  # once: the sweep and the calibration after it share it
    curves = sweep(
        model, data.evaluation, example, job.config(), calibration=data.calibration, progress=worker.progress,
        store=_OpeningStore(RunStore(job.store), worker.opened), model_name=job.model, on_group=worker.on_group,
        graph=graph, device=job.device, workers=job.workers, on_worker=worker.on_worker,
    )  # fmt: skip
    if job.calibrate:
        _calibrate(job, worker, model, graph, curves, data)
    return curves.attrs["run_id"]


def _calibrate(job: SweepJob, worker: _Worker, model: Any, graph: Any, curves: Any, data: Any) -> None:
    """Measure calibration plans as the sweep measured its points, fit the predictor, store it with the run."""
    from prunecore.allocate import allocation_problem
    from prunecore.predict import calibrate
    from prunecore.store import RunStore

    problem = allocation_problem(curves, graph, model, model_name=job.model)
    worker.first = None  # the rate (and so the time left) starts again for plans
    worker.write(force=True, group="measuring plans to calibrate the predictions", unit="plans", done=0, total=0,
                 eta_s=None)  # fmt: skip
    predictor = calibrate(model, problem, data.evaluation, job.bn_recalibration, graph, n=job.calibrate,
                          progress=worker.progress, bn_data=data.calibration, device=job.device,
                          autocast=job.autocast, channels_last=job.channels_last)  # fmt: skip
    runs = RunStore(job.store)
    try:
        runs.put_predictor(curves.attrs["run_id"], predictor.to_dict())
    finally:
        runs.close()


_STEP_TEXT = {"apply": "applying the plan", "bn": "re-estimating BatchNorm", "evaluate": "evaluating",
              "int8": "exporting to ONNX, quantising to INT8, evaluating it",
              "latency": "timing the models"}  # fmt: skip


def _measure(job: MeasureJob, folder: Path, worker: _Worker) -> None:
    """Load the model and the data, measure the plan, and write `result.json`."""
    from prunecore.datasets import load_data
    from prunecore.devices import resolve_device
    from prunecore.measure import STEPS, measure_plan
    from prunecore.models import load_model
    from prunecore.plan import Plan

    plan = Plan.from_json(job.plan)
    wanted = {"bn": bool(job.bn_recalibration), "int8": job.int8, "latency": job.latency}
    steps = [s for s in STEPS if wanted.get(s, True)]
    worker.write(unit="steps")
    worker.progress(0, len(steps) + 1)
    model = load_model(job.model, job.weights)
    shape = job.input_shape or tuple(plan.inputs[0].shape)
    data = load_data(job.data, input_shape=tuple(shape), limit=job.limit, model=job.model)

    def step(name: str) -> None:
        worker.write(group=_STEP_TEXT.get(name, name))
        worker.progress(steps.index(name) + 1, len(steps) + 1)

    measured = measure_plan(model, plan, data, list(job.metrics) or None, job.bn_recalibration,
                            latency=job.latency, progress=step, int8=job.int8,
                            device=resolve_device(job.device))  # fmt: skip
    write_atomic(folder / "result.json", json.dumps(measured.to_dict()), what="measurement")


def _one_shot(job: FinetuneJob, plan: Any, worker: _Worker) -> tuple[Any, Any, Any, Any]:
    """The dense model, the plan applied to it with BatchNorm re-estimated, the held-out and the training data."""
    from prunecore.datasets import load_data, load_train
    from prunecore.devices import resolve_device
    from prunecore.evaluate import recalibrate_bn_
    from prunecore.graph import trace
    from prunecore.models import load_model
    from prunecore.surgery import apply_plan

    dense = load_model(job.model, job.weights)
    example = tuple(spec.example() for spec in plan.inputs)
    shape = tuple(job.input_shape or example[0].shape)
    data = load_data(job.data, input_shape=shape, limit=job.limit, model=job.model)
    train = load_train(job.train or job.data, input_shape=shape, limit=job.train_limit, model=job.model)
    worker.check()
    worker.write(group="applying the plan")
    graph = trace(dense, example)
    plan.check(graph)
    pruned = apply_plan(dense, plan, graph=graph)
    if job.bn_recalibration:
        worker.write(group="re-estimating BatchNorm")
        recalibrate_bn_(pruned, data.calibration, batches=job.bn_recalibration, device=resolve_device(job.device))
    worker.check()
    return dense, pruned, data, train


def _finetune(job: FinetuneJob, folder: Path, worker: _Worker) -> None:
    """Fine-tune the one-shot model from the folder's checkpoint on; write each epoch, the model and the result.

    `history.json` starts from the checkpoint's epochs (none on a first run) and gains each finished
    epoch, so it always lists what a resumed run does not train again.
    """
    from prunecore.devices import resolve_device
    from prunecore.evaluate import evaluate, get_metric
    from prunecore.measure import default_metrics
    from prunecore.models import save_pruned
    from prunecore.plan import MeasuredOn, Plan
    from prunecore.recover import finetune, read_checkpoint

    plan = Plan.from_json(job.plan)
    checkpoint = folder / "finetune.pt"
    done = _records(read_checkpoint(checkpoint)["history"]) if checkpoint.exists() else ()
    worker.write(force=True, unit="epochs", done=len(done), total=job.epochs, group="loading the model and the data")
    dense, pruned, data, train = _one_shot(job, plan, worker)
    names = list(job.metrics) or default_metrics(None, data)
    reference = dense if any(get_metric(m).needs_reference for m in names) else None
    worker.write(group="evaluating the one-shot and the dense model")
    device = resolve_device(job.device)
    record = Recovery(evaluate(pruned, data.evaluation, names, reference=reference, device=device),
                      evaluate(dense, data.evaluation, names, reference=reference, device=device), done, job.epochs,
                      data.description, train.description)  # fmt: skip
    write_atomic(folder / "history.json", json.dumps(record.to_dict()), what="fine-tuning history")

    def training(finished: int) -> str:
        return f"training epoch {finished + 1} of {job.epochs}" if finished < job.epochs else "saving the model"

    def on_batch(epoch: int, batch: int, batches: int) -> None:
        worker.pause()  # the test hook's delay, and where a cancel stops training
        worker.write(eta_s=worker.eta((epoch - 1) * batches + batch, job.epochs * batches))

    def on_epoch(finished: EpochRecord) -> None:
        nonlocal record
        record = dataclasses.replace(record, history=(*record.history, finished))
        write_atomic(folder / "history.json", json.dumps(record.to_dict()), what="fine-tuning history")
        worker.write(force=True, done=finished.epoch, group=training(finished.epoch))

    worker.write(force=True, group=training(len(done)))
    # accelerator=None: a worker is one process, whatever WORLD_SIZE it inherited from whoever started the app
    result = finetune(pruned, train.loader, teacher=dense if job.distill > 0 else None, epochs=job.epochs, lr=job.lr,
                      distill=job.distill, temperature=job.temperature, eval_data=data.evaluation, metrics=names,
                      checkpoint=checkpoint, resume=True, progress=on_batch, on_epoch=on_epoch,
                      accelerator=None, device=device)  # fmt: skip
    tuned = dataclasses.replace(plan, measured=dict(record.metrics), measured_on=MeasuredOn(data.description, 0))
    save_pruned(folder / "recovered.pt", result.model.cpu(), tuned, job.model)
    write_atomic(folder / "result.json", json.dumps(record.to_dict()), what="fine-tuning result")


def _refine(job: RefineJob, folder: Path, worker: _Worker) -> None:
    """Rebuild the allocation problem from the run, refine the plan by measured moves, write `result.json`."""
    from prunecore.allocate import allocation_problem, with_predictor, with_ties
    from prunecore.datasets import load_data
    from prunecore.devices import resolve_device
    from prunecore.graph import trace
    from prunecore.models import load_model
    from prunecore.plan import Plan
    from prunecore.predict import Predictor
    from prunecore.refine import refine
    from prunecore.store import RunStore

    plan = Plan.from_json(job.plan)
    worker.write(force=True, unit="plans", done=0, total=job.steps + 1, group="loading the model, data and curves")
    model = load_model(job.model, job.weights)
    example = tuple(spec.example() for spec in plan.inputs)
    data = load_data(job.data, input_shape=tuple(job.input_shape or example[0].shape), limit=job.limit,
                     model=job.model)  # fmt: skip
    graph = trace(model, example)
    plan.check(graph)
    runs = RunStore(job.store)
    try:
        curves, stored = runs.points(job.run_id), runs.get_predictor(job.run_id)
    finally:
        runs.close()
    problem = allocation_problem(curves, graph, model, model_name=job.model)
    if stored is not None:
        problem = with_predictor(problem, Predictor.from_dict(stored))
    if job.ties:
        problem = with_ties(problem, job.ties)
    worker.write(force=True, group="measuring neighbouring plans")
    refined = refine(model, problem, plan, data.evaluation, steps=job.steps, frozen=job.frozen,
                     bn_recalibration=job.bn_recalibration, bn_data=data.calibration, graph=graph,
                     device=resolve_device(job.device), progress=worker.progress)  # fmt: skip
    write_atomic(folder / "result.json", json.dumps(refined.to_dict()), what="refinement")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m prunecore.jobs FOLDER [--lock-fd N]`: run the job in FOLDER, as `submit` starts it."""
    parser = argparse.ArgumentParser(prog="python -m prunecore.jobs", description=main.__doc__)
    parser.add_argument("folder", type=Path, help="the job's folder, <store folder>/jobs/<key>")
    parser.add_argument("--lock-fd", type=int, help="the job's lock, already taken by submit")
    args = parser.parse_args(argv)
    folder: Path = args.folder
    worker = _Worker(folder)
    signal.signal(signal.SIGTERM, worker.on_sigterm)  # first, so a cancel while loading is a clean one too
    lock = args.lock_fd if args.lock_fd is not None else os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the job is over
    except BlockingIOError:
        _log(f"worker {os.getpid()}: another worker runs job {folder.name}; exiting")
        return 0
    _log(f"worker {os.getpid()} started job {folder.name}")
    try:
        worker.write(force=True)
        job = _parse_job((folder / "job.json").read_text())
        if isinstance(job, MeasureJob):
            (folder / "result.json").unlink(missing_ok=True)
            _measure(job, folder, worker)
            run_id = None
        elif isinstance(job, FinetuneJob):
            for name in ("result.json", "recovered.pt"):
                (folder / name).unlink(missing_ok=True)
            _finetune(job, folder, worker)
            run_id = None
        elif isinstance(job, RefineJob):
            (folder / "result.json").unlink(missing_ok=True)
            _refine(job, folder, worker)
            run_id = None
        else:
            run_id = _sweep(job, worker)
        final, code = {"state": "done", "run_id": run_id, "group": None, "eta_s": 0.0}, 0
    except _Cancelled:  # the groups finished so far are in the store; the epochs in the checkpoint
        final, code = {"state": "cancelled", "eta_s": None}, 0
    except UserError as exc:  # the job's own inputs: the message says what to change
        final, code = {"state": "failed", "eta_s": None, "error": _first_line(exc)}, 1
    except Exception as exc:  # a bug, or the user's model crashing: the traceback goes to worker.log
        traceback.print_exc()
        error = f"{type(exc).__name__}: {_first_line(exc)}"
        final, code = {"state": "failed", "eta_s": None, "error": error}, 1
    worker.write(force=True, **final)
    _log(f"{final['state']} (run {worker.fields['run_id']})" + (f": {final['error']}" if "error" in final else ""))
    fcntl.flock(lock, fcntl.LOCK_UN)  # the job is over: a submit may start a new worker while this process exits
    return code


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _log(message: str) -> None:
    print(f"{_now()} {message}", flush=True)  # stdout is the job's worker.log


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


if __name__ == "__main__":
    from prunecore._memory import keep_freed_memory

    keep_freed_memory()  # a job process is prunecore's own
    sys.exit(main())
