"""Session-state keys, cached loaders and the shared sidebar: where every page gets its data.

Pages read the user's choices from `st.session_state` under the keys below and get models,
data, curves and allocation problems from the cached loaders, so a rerun (every widget change)
recomputes nothing it does not have to. Nothing here prunes: it calls prunecore.

Sweeps, plan measurements and fine-tunings run as background jobs (`prunecore.jobs`), never in the script
thread: a worker process per job key, which outlives the browser tab and which every session with the
same settings (the same plan) shares.
Pages compute the key of the current settings, read the job's status and take the curves from the
run store (`$PRUNECORE_STORE`, else prunecore's default store).

Every user error reaches the page through `user_errors()`: an `st.error` with prunecore's message,
the app still running. Who can reach the app decides whether the Factory box (which runs code on
this machine) is offered: `factory_enabled()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pandas as pd
import streamlit as st
import torch

import prunecore as pc
from dashboard import charts
from prunecore import jobs
from prunecore.allocate import with_latency
from prunecore.cost import cost_model
from prunecore.datasets import EvalData, load_data
from prunecore.devices import check_autocast, resolve_device
from prunecore.errors import UserError
from prunecore.evaluate import get_metric
from prunecore.importance import get_criterion
from prunecore.jobs import FinetuneJob, Job, JobStatus, MeasureJob, Recovery, RefineJob, SweepJob
from prunecore.latency import LatencyModel, latency_model
from prunecore.measure import PlanMeasurement
from prunecore.models import DATA_SPEC_KINDS, ModelSpecError, default_input_shape, example_input, load_model
from prunecore.predict import Predictor
from prunecore.refine import Refined
from prunecore.sensitivity import DENSE, sweep_run_id
from prunecore.store import StoreError, default_store_path

# -- session-state keys (every widget's key= is one of these, or built by a function below) -------
MODEL_SPEC = "model_spec"
WEIGHTS = "weights_bytes"  # the uploaded state_dict's bytes (the uploader widget itself is per page)
WEIGHTS_NAME = "weights_name"  # the upload's own file name, what errors call it (the bytes go via a temp file)
INPUT_SHAPE = "input_shape"
DATA_SPEC = "data_spec"
DATA_LIMIT = "data_limit"
RUN_ID = "run_id"
CURVES = "curves_cache"  # the finished curves the pages use: ((spec, data, limit, job key), frame)
JOB = "sweep_job"  # the key of the sweep job of the current settings (`sweep_job`)
JOB_CACHE = "sweep_job_cache"  # (the settings, their job key): the key is computed once per settings
RUN_SWEEP, CANCEL_SWEEP, RESUME_SWEEP = "sweep_run", "sweep_cancel", "sweep_resume"  # the sweep panel's buttons
FOUND = "found_runs"  # sweep job key -> the run id `sweep` stores those settings under (a run swept elsewhere)
MEASURE_JOB = "measure_job"  # the key of the Validate page's measurement job (`measure_job`)
MEASURE_CACHE = "measure_job_cache"  # (the measurement's settings, its job key)
RUN_MEASURE, CANCEL_MEASURE = "validate_run", "validate_cancel"  # the measurement panel's buttons
LIVE_ON = "live_measure_on"  # the Plan page's toggle: measure the slider state in the background
LIVE = "live_measure"  # the Plan page's measurement of the slider state: {"key", "since", "submitted"}
LIVE_CACHE = "live_measure_cache"  # (its settings, its job key)
LIVE_POINTS = "live_points"  # {job key: (params, flops, measured metrics)}: this session's measured plans
SETTLE_S = 1.0
"""Seconds the sliders must rest before the Plan page measures their plan (a drag is not measured at every step)."""
FINETUNE_JOB = "finetune_job"  # the key of the Recover page's fine-tuning job (`finetune_job`)
FINETUNE_CACHE = "finetune_job_cache"  # (the fine-tuning's settings, its job key)
RUN_FINETUNE, CANCEL_FINETUNE, RESUME_FINETUNE = "recover_run", "recover_cancel", "recover_resume"  # its buttons
FT_EPOCHS = "recover_epochs"
FT_LR = "recover_lr"
FT_DISTILL_ON = "recover_distill_on"  # distil from the dense model (else labels only)
FT_DISTILL = "recover_distill"  # the distillation weight against cross-entropy, when on
FT_BN = "recover_bn"  # BatchNorm re-estimation batches before training
FT_DEVICE = "recover_device"  # where the fine-tuning job trains: a `device_choices()` entry
FT_TRAIN_LIMIT = "recover_train_limit"  # training images (0: all)
LR_CHOICES = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
CRITERION = "sweep_criterion"
LEVELS = "sweep_levels"
METRICS = "sweep_metrics"
BN_BATCHES = "sweep_bn_batches"
CALIBRATE = "sweep_calibrate"  # random plans the sweep job measures afterwards to fit the predictor (0: none)
SWEEP_DEVICE = "sweep_device"  # where the sweep job's points run: "auto" (CUDA when present), "cpu", "cuda:N"
SWEEP_WORKERS = "sweep_workers"  # local worker processes the sweep job spreads its groups over
SWEEP_AUTOCAST = "sweep_autocast"  # the sweep job's mixed-precision evaluation: "off", "bf16" or "fp16"
SWEEP_CHANNELS_LAST = "sweep_channels_last"  # whether the sweep job evaluates channels-last (CNNs)
MODE = "sweep_mode"
BUDGET_KIND = "budget_kind"
BUDGET_VALUE = "budget_value"
METHOD = "method"
ALLOCATED = "allocated"  # the method's last applied allocation: {"target": (spec, run, budget, method), "kept": {...}}
SEARCH = "group_search"
ORDER = "group_order"
LOADED = "loaded_plan"  # the groups of a plan put on the sliders: the Plan page's reference on its next run
EDITED_PLAN = "edited_plan"  # the Plan the sliders describe, rebuilt by the Plan page on every change
SIDEBAR = "sidebar_slot"  # this run's sidebar placeholder (`page` makes it), redrawn as the page loads things
VALIDATION = "validation"  # the last measurement shown: {"key": (plan_key, bn batches), "measurement": PlanMeasurement}
LATENCY_RUNTIME = "latency_runtime"  # the Plan page's latency runtime (`prunecore.latency.list_runtimes()`)
LATENCY_BATCH = "latency_batch"  # the batch size its latency is predicted at
MEASURE_LATENCY = "latency_measure"  # its "Measure latency tables" button
LATENCY = "latency_built"  # what the Plan page predicts latency with: (workspace key, runtime, batch), or None
LATENCY_MS = "latency_budget_ms"  # the latency budget in milliseconds, when the budget is on latency
STATABLE = "statable"  # the Plan page allocates only what a transformers config can state (`prunecore.statable`)
REFINE_STEPS = "refine_steps"  # the Plan page's measured moves per refinement
REFINE_JOB = "refine_job"  # the key of the Plan page's refinement job (`refine_job`)
REFINE_CACHE = "refine_job_cache"  # (the refinement's settings, its job key)
RUN_REFINE, CANCEL_REFINE, USE_REFINED = "refine_run", "refine_cancel", "refine_use"  # its buttons
PLAN_PAGE_WIDGETS = (LATENCY_MS,)  # kept across pages without a default (it is set when latency is measured)

DEFAULTS: dict[str, Any] = {
    MODEL_SPEC: "sample:resnet20",
    DATA_SPEC: "sample",
    DATA_LIMIT: 500,
    CRITERION: "l1",
    LEVELS: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
    METRICS: ["accuracy", "loss"],
    BN_BATCHES: 2,
    CALIBRATE: 24,
    SWEEP_DEVICE: "auto",
    SWEEP_WORKERS: 1,
    SWEEP_AUTOCAST: "off",
    SWEEP_CHANNELS_LAST: False,
    MODE: "exact",
    BUDGET_KIND: "flops",
    BUDGET_VALUE: 0.5,
    METHOD: "dp",
    SEARCH: "",
    ORDER: "position",
    LATENCY_RUNTIME: "torch",
    LATENCY_BATCH: 1,
    LIVE_ON: True,
    STATABLE: False,
    REFINE_STEPS: 30,
    FT_EPOCHS: 3,
    FT_LR: 0.01,
    FT_DISTILL_ON: True,
    FT_DISTILL: 0.5,
    FT_BN: 50,
    FT_DEVICE: "auto",
    FT_TRAIN_LIMIT: 0,
}
MODEL_PAGE_WIDGETS = ("model_source", "sample_name", "tv_name", "timm_name", "arg_num_classes", "arg_in_chans",
                      "arg_img_size", "arg_extra", "factory_spec", "input_shape_text", "data_source",
                      "data_folder")  # fmt: skip
RANDOM_DATA = "random"
"""prunecore's `random` data spec: seeded Gaussian noise of the model's input shape, unlabelled (KL, agreement)."""
DEFAULTS_ENV = "PRUNECORE_DASHBOARD_DEFAULTS"
"""A JSON object overriding `DEFAULTS` (e.g. a team's sweep levels, or a quick sweep for tests)."""
REMOTE_ENV = "PRUNECORE_DASHBOARD_REMOTE"
"""Set to 1 to offer the Factory box although other machines can reach the app (see `factory_allowed`)."""


def init() -> None:
    """Give every key its default once per session, and keep widget values across pages.

    Streamlit forgets a widget's key when a page without that widget runs; writing every key
    back at the start of each run keeps the user's choices (sliders included) while they browse.
    """
    for key, value in {**DEFAULTS, **_overrides()}.items():
        st.session_state.setdefault(key, value)
    for key in list(st.session_state):
        if isinstance(key, str) and (key in DEFAULTS or key in MODEL_PAGE_WIDGETS or key in PLAN_PAGE_WIDGETS
                                     or key.startswith(("sparsity::", "lock::"))):
            st.session_state[key] = st.session_state[key]


def _overrides() -> dict[str, Any]:
    text = os.environ.get(DEFAULTS_ENV, "")
    try:
        values = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{DEFAULTS_ENV} is not valid JSON: {exc}") from None
    unknown = sorted(set(values) - set(DEFAULTS)) if isinstance(values, dict) else ["(not an object)"]
    if unknown:
        raise ValueError(f"{DEFAULTS_ENV} has unknown keys {unknown}; known: {sorted(DEFAULTS)}")
    return values


def edited_plan() -> pc.Plan:
    """The Plan page's current plan; without one, a line saying where to make it, and the page stops there."""
    plan = st.session_state.get(EDITED_PLAN)
    if plan is None:
        st.info("Make a plan on the Plan page first.")
        st.stop()
    return plan


def plan_key(plan: pc.Plan) -> tuple:
    """What identifies a plan's pruned model (its kept units), unlike its JSON, which has a timestamp."""
    return tuple(sorted((name, g.keep) for name, g in plan.groups.items()))


def measured_plan() -> pc.Plan | None:
    """The edited plan, carrying its measured metrics when the Validate page measured this very plan."""
    plan = st.session_state.get(EDITED_PLAN)
    result = st.session_state.get(VALIDATION)
    if plan is not None and result is not None and result["key"][0] == plan_key(plan):
        plan = result["measurement"].record(plan)
    return plan


def read_plan(data: bytes, ws: Workspace) -> pc.Plan | str:
    """An uploaded plan if it is valid and fits the loaded model, else the reason it does not."""
    try:
        plan = pc.Plan.from_json(data)
        plan.check(ws.graph)
    except UserError as exc:
        return f"This plan cannot be used with {ws.spec}: {exc}"
    return plan


def load_sliders(plan: pc.Plan) -> None:
    """Put a plan's kept counts on the Plan page's sliders, unlocked; the method does not overwrite them."""
    for name, g in plan.groups.items():
        st.session_state[sparsity_key(name)] = sparsity_of(len(g.keep), g.size)
        st.session_state[lock_key(name)] = False
    st.session_state[LOADED] = list(plan.groups)


def parse_shape(text: str) -> list[int] | None:
    """`"1,3,224,224"` -> `[1, 3, 224, 224]`; blank -> None (the model's own shape)."""
    if not text.strip():
        return None
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        shape = []
    if not shape or min(shape) < 1:
        raise ModelSpecError(f"Input shape must be comma-separated integers (each at least 1), got {text!r}")
    return shape


def sparsity_key(group: str) -> str:
    """The key of a group's Plan-page slider: its sparsity, always `sparsity_of` a count it can keep."""
    return f"sparsity::{group}"


def lock_key(group: str) -> str:
    return f"lock::{group}"


# -- the model --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Workspace:
    """A loaded, traced model and what every page shows about it; `key` identifies it (the spec, the uploaded
    weights' sha256, the input shape), for caches of what is derived from the model."""

    spec: str
    model: torch.nn.Module
    example: torch.Tensor
    graph: pc.ChannelGraph
    cost: pc.Cost
    flop_shares: dict[str, float]
    key: tuple = ()


@st.cache_resource(max_entries=3, show_spinner="Loading and tracing the model ...")
def _workspace(spec: str, weights_digest: str, _weights: bytes | None, shape: tuple[int, ...] | None,
               weights_name: str = "") -> Workspace:  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if _weights is not None:  # load_model reads a file; weights_only=True there
            path = Path(tmp) / "uploaded-weights.pt"
            path.write_bytes(_weights)
        model = load_model(spec, path, weights_name=weights_name or "uploaded weights")  # the upload's name
    shape = shape or default_input_shape(spec)
    if shape is None:
        raise ModelSpecError(f"give an input shape: prunecore cannot know what input {spec} expects")
    example = example_input(spec, tuple(shape))  # seeded noise, or token ids for a language model
    graph = pc.trace(model, example)
    shares = cost_model(model, example, graph).flop_shares()
    key = (spec, weights_digest, tuple(shape))
    return Workspace(spec, model, example, graph, pc.count(model, example), shares, key)


def workspace() -> Workspace:
    """The selected model, loaded once; stops the page with the reason if it cannot be loaded."""
    spec = st.session_state[MODEL_SPEC]
    if runs_code(spec) and not factory_enabled():  # also when a spec arrives other than by the Factory box
        st.error(f"Not loading {spec}. {FACTORY_DISABLED}")
        st.stop()
    raw = st.session_state.get(WEIGHTS)
    digest = hashlib.sha256(raw).hexdigest() if raw is not None else ""
    shape = st.session_state.get(INPUT_SHAPE)
    name = st.session_state.get(WEIGHTS_NAME) or ""
    with user_errors():
        ws = _workspace(spec, digest, raw, tuple(shape) if shape else None, name)
    return ws


# -- the data ---------------------------------------------------------------------------------------
def data_problem(data_spec: str, shape: tuple[int, ...]) -> str | None:
    """Why the chosen data cannot feed a model input of `shape`, with what to choose instead; None if it can."""
    dims = "x".join(map(str, shape))
    tokens = len(shape) == 2  # (batch, tokens): a language model
    if tokens and not (data_spec == "sample" or data_spec.startswith("text:")):
        return (f"This model takes token ids ({dims}: batch x tokens), not images. Choose the sample text or a "
                "text file (.txt or .jsonl).")  # fmt: skip
    if data_spec.startswith("text:") and not tokens:
        return (f"Text feeds language models, whose input is batch x tokens, but this model takes {dims}. Choose "
                "the sample digits, an image folder or random label-free data.")  # fmt: skip
    if data_spec == "sample" and not tokens and tuple(shape[-3:]) != (1, 28, 28):
        return (f"The sample digits are 1x28x28 images, but this model takes {dims}, so they cannot feed it. "
                "Choose an image folder (your own images, resized and cropped to the model's input) or random "
                "label-free data (KL and agreement with the dense model; no accuracy).")  # fmt: skip
    if data_spec.startswith("imagefolder:") and (len(shape) < 3 or shape[-3] not in (1, 3)):
        return (f"An image folder gives grayscale or RGB images, but this model takes {dims}. Choose random "
                "label-free data, or an input shape with 1 or 3 channels.")  # fmt: skip
    return None


@st.cache_resource(max_entries=3, show_spinner="Loading the data ...")
def _data(spec: str, shape: tuple[int, ...], limit: int | None, model: str) -> EvalData:
    return load_data(spec, input_shape=shape, limit=limit, model=model)


def data(ws: Workspace) -> EvalData:
    """The chosen data for the loaded model; stops the page with what to choose instead when it cannot feed it."""
    spec, shape = st.session_state[DATA_SPEC], tuple(ws.example.shape)
    problem = data_problem(spec, shape)
    if problem is not None:
        st.error(f"{problem} (Data, on the Model page.)")
        st.stop()
    limit = st.session_state.get(DATA_LIMIT) or None
    with user_errors():
        loaded = _data(spec, shape, limit, st.session_state[MODEL_SPEC])  # the model names its tokenizer
    return loaded


# -- sweeps as jobs, curves from the run store ------------------------------------------------------
def sweep_settings() -> dict[str, Any]:
    return {
        "levels": list(st.session_state[LEVELS]), "criterion": st.session_state[CRITERION],
        "metric": list(st.session_state[METRICS]), "bn_recalibration": int(st.session_state[BN_BATCHES]),
        "calibrate": int(st.session_state[CALIBRATE]),
        "mode": st.session_state[MODE], "device": st.session_state[SWEEP_DEVICE],
        "workers": int(st.session_state[SWEEP_WORKERS]), "autocast": st.session_state[SWEEP_AUTOCAST],
        "channels_last": bool(st.session_state[SWEEP_CHANNELS_LAST]),
    }  # fmt: skip


def device_choices() -> list[str]:
    """The devices a job can run on here: "auto" (CUDA when present, else the CPU), the CPU, each GPU."""
    return ["auto", "cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def job_device(choice: str) -> str | None:
    """A `device_choices()` entry as a job's `device` field: None for "auto" (the job resolves it where it runs)."""
    return None if choice == "auto" else choice


def store_path() -> Path:
    """The run store the dashboard's sweeps fill and read: `$PRUNECORE_STORE`, else prunecore's default."""
    return default_store_path()


@contextlib.contextmanager
def _uploaded_weights() -> Iterator[str | None]:
    """The uploaded weights as a temporary file (a job digests and copies it); None without an upload."""
    raw = st.session_state.get(WEIGHTS)
    if raw is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "uploaded-weights.pt"
        path.write_bytes(raw)
        yield str(path)


def sweep_job(ws: Workspace) -> tuple[SweepJob, str]:
    """The sweep job of the current model, weights, data and sweep settings, and its key (also under `JOB`).

    The job names no weights file: an upload is only bytes here, which `submit_sweep` writes to a
    temporary file. The key digests them, so it is computed once per settings, not on every rerun.
    Stops the page when no level or no metric is chosen.
    """
    settings = sweep_settings()
    if not settings["levels"] or not settings["metric"]:
        st.warning("Choose at least one level and one metric (Sweep settings, on the Sensitivity page).")
        sidebar()
        st.stop()
    metrics = settings["metric"]
    if not data(ws).labelled:
        metrics = [m for m in metrics if not get_metric(m).needs_labels] or ["kl", "agreement"]
    if settings["calibrate"] and not {"loss", "kl"} & set(metrics):  # the predictor is fitted on one of them
        metrics = [*metrics, "loss" if data(ws).labelled else "kl"]
    device = job_device(settings["device"])
    autocast = None if settings["autocast"] == "off" else settings["autocast"]
    with user_errors():  # fp16 on the CPU: said here, not by a job that fails
        check_autocast(autocast, resolve_device(device))
    shape = st.session_state.get(INPUT_SHAPE)
    job = SweepJob(
        ws.spec, st.session_state[DATA_SPEC], str(store_path()), tuple(settings["levels"]),
        input_shape=tuple(shape) if shape else None, limit=st.session_state.get(DATA_LIMIT) or None,
        criterion=settings["criterion"], metrics=tuple(metrics), bn_recalibration=settings["bn_recalibration"],
        mode=settings["mode"], calibrate=settings["calibrate"], device=device, workers=settings["workers"],
        autocast=autocast, channels_last=settings["channels_last"],
    )  # fmt: skip
    key = _keyed(job, JOB_CACHE)
    st.session_state[JOB] = key
    _remember_run_id(ws, job, key)
    return job, key


def _remember_run_id(ws: Workspace, job: SweepJob, key: str) -> None:
    """Note the run id these settings have in the store (once per job key), so `job_status` finds a run
    that the CLI or a script swept with the same model weights, data and settings, with no job for it."""
    found = st.session_state.setdefault(FOUND, {})
    if key in found:
        return
    loaded = data(ws)
    with user_errors(stop=False):
        found[key] = sweep_run_id(ws.model, loaded.evaluation, ws.graph, job.config(), calibration=loaded.calibration)


def _keyed(job: Job, cache: str) -> str:
    """`jobs.job_key` of `job` with the uploaded weights, computed once per job and upload (under `cache`)."""
    raw = st.session_state.get(WEIGHTS)
    settings_now = (job, hashlib.sha256(raw).hexdigest() if raw is not None else "")
    cached = st.session_state.get(cache)
    if cached is None or cached[0] != settings_now:
        with user_errors(), _uploaded_weights() as path:
            cached = st.session_state[cache] = (settings_now, jobs.job_key(dataclasses.replace(job, weights=path)))
    return cached[1]


def job_status(key: str) -> JobStatus | None:
    """What the job's worker last reported; None when nothing was submitted for this key.

    A sweep with no job whose settings the store holds a complete run of (swept by the CLI or a
    script: `_remember_run_id`) reads as done, with that run.
    """
    try:
        return jobs.status(key, store_path())
    except jobs.JobError:  # no such job, or a damaged status file: submitting it again starts over
        pass
    run = st.session_state.get(FOUND, {}).get(key)
    return JobStatus(key, "done", run_id=run) if run and _complete(run) else None


def submit_job(job: Job) -> None:
    """Start the job's worker (a sweep resumes from its stored points), or join the one that runs it: an `on_click`."""
    try:
        with _uploaded_weights() as path:
            jobs.submit(dataclasses.replace(job, weights=path))
    except UserError as exc:
        st.error(str(exc))


def cancel_job(key: str) -> None:
    """Ask the job's worker to stop after its current batch or step (what is stored stays): an `on_click`."""
    if not jobs.cancel(key, store_path()):
        st.toast("The worker is not running (yet): press Cancel again in a moment.")


def _duration(seconds: float) -> str:
    """`"45 s"`, `"1 min 35 s"`, `"2 h 05 min"`."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def job_progress(status: JobStatus, kind: str = "sweep") -> tuple[float, str]:
    """A progress bar's fraction and text for a job: its state, batches (steps) done, current group (step), time left.

    >>> job_progress(JobStatus("k", "running", done=3, total=12, group="layer1.0.conv1", eta_s=95.0))
    (0.25, 'running: 3 of 12 batches, group `layer1.0.conv1`, about 1 min 35 s left')
    >>> job_progress(JobStatus("k", "running", done=2, total=5, group="evaluating", unit="steps"), kind="measure")
    (0.4, 'running: 2 of 5 steps, evaluating')
    """
    active = status.state in jobs.ACTIVE
    parts = []
    if status.total:
        parts.append(f"{status.done:,} of {status.total:,} {status.unit}")
    elif active:
        parts.append("preparing (the model, the data" + (", the dense model's metrics)" if kind == "sweep" else ")"))
    if active and status.group:
        parts.append(f"group `{status.group}`" if kind == "sweep" and status.unit == "batches" else status.group)
    if active and status.eta_s is not None:
        parts.append(f"about {_duration(status.eta_s)} left")
    fraction = min(status.done / status.total, 1.0) if status.total else 0.0
    return fraction, status.state + (": " + ", ".join(parts) if parts else "")


def worker_lines(workers: list[dict[str, Any]]) -> str:
    """Per-worker progress of a sweep over several workers, one clause each.

    >>> worker_lines([{"worker": 0, "group": "stem.0", "done": 2, "total": 5, "groups_done": 3, "restarts": 0},
    ...               {"worker": 1, "group": None, "done": 0, "total": 5, "groups_done": 4, "restarts": 1}])
    'worker 0: `stem.0`, 2 of 5 batches (3 groups done) · worker 1: idle (4 groups done, restarted once)'
    """
    parts = []
    for w in workers:
        doing = f"`{w['group']}`, {w['done']} of {w['total']} batches" if w.get("group") else "idle"
        restarts = w.get("restarts") or 0
        again = "" if not restarts else ", restarted once" if restarts == 1 else f", restarted {restarts} times"
        extra = f"{w['groups_done']} groups done{again}"
        parts.append(f"worker {w['worker']}: {doing} ({extra})")
    return " · ".join(parts)


def _complete(run_id: str | None) -> bool:
    """Whether the run store holds the run, complete."""
    if not run_id:
        return False
    runs = pc.RunStore(store_path())
    try:
        return runs.get(run_id).complete
    except StoreError:  # deleted since, or a damaged store: sweeping again is the way out
        return False
    finally:
        runs.close()


def _phase(status: JobStatus | None) -> tuple | None:
    """What the page shows of a job besides its progress: controls, and the groups stored so far."""
    return None if status is None else (status.state, status.group, status.run_id)


@dataclass(frozen=True)
class PanelText:
    """What a job panel's buttons say: the labels, keys and help of Run, Cancel and Resume."""

    run: str
    run_key: str
    run_help: str
    cancel_key: str
    cancel_help: str
    resume: str
    resume_key: str
    resume_help: str


RUN_HELP = ("Sweeps every prunable group at every level in a background process, which goes on when this tab "
            "closes; any session with the same settings follows it and uses its curves.")  # fmt: skip
SWEEP_TEXT = PanelText("Run sweep", RUN_SWEEP, RUN_HELP, CANCEL_SWEEP,
                       "Stops after the current batch; the groups finished so far stay stored.", "Resume",
                       RESUME_SWEEP, "Sweeps the groups left; the finished ones are stored.")  # fmt: skip
MEASURE_TEXT = PanelText(
    "Apply and measure", RUN_MEASURE,
    "Applies the plan and measures it in a background process (metrics after BatchNorm re-estimation, size, CPU "
    "latency); the result is stored by plan, so any session that measures the same plan reads it at once.",
    CANCEL_MEASURE, "Stops after the current step.", "Measure again", RUN_MEASURE, "Starts the measurement over.",
)  # fmt: skip


REFINE_TEXT = PanelText(
    "Refine by measuring", RUN_REFINE,
    "Measures neighbouring plans in a background process: each moves a slice of the budget from one group to another "
    "(locked groups stay), is applied, has BatchNorm re-estimated as the sweep did, and is measured on the sweep's "
    "data; a move is kept when the measured loss improves. The result is stored by plan and budget.",
    CANCEL_REFINE, "Stops after the current plan; nothing is kept.", "Refine again", RUN_REFINE,
    "Starts the refinement over.",
)  # fmt: skip


def sweep_panel(job: SweepJob, key: str, status: JobStatus | None) -> None:
    """The sweep's Run button, or its progress with Cancel (running) or Resume (cancelled, died), or its error.

    A fragment: while the job runs it reruns itself every second, and the whole page when the job's
    state or group changes (a group's points are stored, the curves are complete, other buttons apply).
    """
    every = 1.0 if status is not None and status.state in jobs.ACTIVE else None
    st.fragment(_panel, run_every=every)(job, key, _phase(status), SWEEP_TEXT)


def measure_panel(job: MeasureJob, key: str, status: JobStatus | None) -> PlanMeasurement | None:
    """The measurement's result once done; until then its Run button or progress (a fragment, as `sweep_panel`)."""
    done = None
    if status is not None and status.state == "done":
        with user_errors(stop=False):
            done = jobs.result(key, store_path())
    if done is not None:
        return done
    every = 1.0 if status is not None and status.state in jobs.ACTIVE else None
    st.fragment(_panel, run_every=every)(job, key, _phase(status), MEASURE_TEXT)
    return None


def refine_panel(job: RefineJob, key: str, status: JobStatus | None) -> Refined | None:
    """The refinement's result once done; until then its Run button or progress (a fragment, as `sweep_panel`)."""
    done = None
    if status is not None and status.state == "done":
        with user_errors(stop=False):
            done = jobs.result(key, store_path())
    if isinstance(done, Refined):
        return done
    every = 1.0 if status is not None and status.state in jobs.ACTIVE else None
    st.fragment(_panel, run_every=every)(job, key, _phase(status), REFINE_TEXT)
    return None


def describe_job(job: SweepJob) -> str:
    """One line saying what a job sweeps, beside its Run button.

    >>> describe_job(SweepJob("sample:resnet20", "sample", "runs.sqlite", (0.3, 0.6), limit=64, metrics=("kl",)))
    'Every prunable group at levels 0.3, 0.6 (criterion l1, exact), measuring kl on sample (first 64 images).'
    """
    how = [job.mode]
    if job.bn_recalibration:
        how.append(f"BatchNorm re-estimated on {job.bn_recalibration} batches")
    if job.autocast:
        how.append(f"{job.autocast} mixed precision")
    if job.channels_last:
        how.append("channels-last")
    data_ = job.data + (f" (first {job.limit:,} images)" if job.limit else "")
    then = (f" Then {job.calibrate} random plans and each method's plans at a few budgets are measured to fit "
            "the predictor that knows damage compounds." if job.calibrate else "")  # fmt: skip
    return (f"Every prunable group at levels {', '.join(f'{v:g}' for v in job.levels)} (criterion {job.criterion}, "
            f"{', '.join(how)}), measuring {', '.join(job.metrics)} on {data_}.{then}")


def _finished(job: Job, key: str, status: JobStatus | None) -> bool:
    """Whether the job's result is there: a sweep's complete run in the store, a measurement's (a fine-tuning's)
    result file."""
    if status is None or status.state != "done":
        return False
    if isinstance(job, (MeasureJob, FinetuneJob, RefineJob)):
        with contextlib.suppress(jobs.JobError):
            return jobs.result(key, store_path()) is not None
        return False
    return _complete(status.run_id)


def _panel(job: Job, key: str, shown: tuple | None, text: PanelText) -> None:
    status = job_status(key)
    if _phase(status) != shown:
        st.rerun()
    if _finished(job, key, status):
        return  # the page shows the curves, or the measurement
    if status is None or status.state in ("done", "failed"):  # done: its result was deleted since
        if status is not None and status.state == "failed":
            log = store_path().parent / "jobs" / key / "worker.log"
            st.error(f"The {job.kind} failed: {status.error} (the worker's log: `{log}`)")
        st.button(text.run, key=text.run_key, type="primary", on_click=submit_job, args=(job,), help=text.run_help)
        if isinstance(job, SweepJob):
            st.caption(describe_job(job))
        return
    fraction, line = job_progress(status, job.kind)
    st.progress(fraction, text=line)
    if status.state in jobs.ACTIVE and status.workers:
        st.caption(worker_lines(status.workers))
    if status.state in jobs.ACTIVE:
        st.button("Cancel", key=text.cancel_key, on_click=cancel_job, args=(key,), help=text.cancel_help)
    else:  # cancelled, or its worker died
        st.button(text.resume, key=text.resume_key, type="primary", on_click=submit_job, args=(job,),
                  help=text.resume_help)  # fmt: skip


def stored_curves(ws: Workspace, key: str, status: JobStatus | None, partial: bool = False) -> pd.DataFrame | None:
    """The job's curves from the run store; None when there are none (yet).

    Complete curves are kept for the session (under `CURVES`, the run id under `RUN_ID`); with
    `partial`, an unfinished run gives the groups stored so far. `frame.attrs` has the store's run id,
    model name and sweep config, and `complete`.
    """
    now = (ws.spec, st.session_state[DATA_SPEC], st.session_state.get(DATA_LIMIT), key)
    cached = st.session_state.get(CURVES)
    if cached is not None and cached[0] == now:
        return cached[1]
    if status is None or not status.run_id:
        return None
    complete = _complete(status.run_id)
    if not complete and not partial:
        return None
    runs = pc.RunStore(store_path())
    try:
        with user_errors():
            frame = runs.points(status.run_id)
    finally:
        runs.close()
    frame.attrs["complete"] = complete
    if complete:
        st.session_state[CURVES] = (now, frame)
        st.session_state[RUN_ID] = status.run_id
        sidebar()  # it names this run now
    return frame if (frame.group != DENSE).any() else None


def curves(ws: Workspace) -> pd.DataFrame:
    """The finished curves of the current settings, from the run store.

    Without them the page shows the sweep's panel (Run, or its progress) and stops there; the panel
    reruns the page when the sweep is done.
    """
    job, key = sweep_job(ws)
    status = job_status(key)
    frame = stored_curves(ws, key, status)
    if frame is None:
        st.info("This page needs the sensitivity curves of the current model, data and sweep settings: run the "
                "sweep here or on the Sensitivity page. The page opens when it is done.")  # fmt: skip
        sweep_panel(job, key, status)
        sidebar()
        st.stop()
    return frame


def measure_job(ws: Workspace, plan: pc.Plan, bn_batches: int, int8: bool = False,
                device: str = "auto") -> tuple[MeasureJob, str]:  # fmt: skip
    """The measurement job of `plan` on the current model, weights and data, and its key (also under `MEASURE_JOB`);
    `int8` also measures the pruned model as INT8 in ONNX Runtime (another job, another key); `device`, a
    `device_choices()` entry, is where its metrics are measured."""
    job = _measure_job(ws, plan, bn_recalibration=int(bn_batches), int8=bool(int8), device=job_device(device))
    key = st.session_state[MEASURE_JOB] = _keyed(job, MEASURE_CACHE)
    return job, key


def _measure_job(ws: Workspace, plan: pc.Plan, **how: Any) -> MeasureJob:
    """A measurement of `plan` on the current model, data and image limit; `how` says the rest."""
    shape = st.session_state.get(INPUT_SHAPE)
    return MeasureJob(ws.spec, st.session_state[DATA_SPEC], str(store_path()), plan.to_json(),
                      input_shape=tuple(shape) if shape else None, limit=st.session_state.get(DATA_LIMIT) or None,
                      **how)  # fmt: skip


# -- measuring the slider state in the background ------------------------------------------------------
def live_job(ws: Workspace, plan: pc.Plan, metrics: Iterable[str]) -> tuple[MeasureJob, str]:
    """The measurement of the Plan page's current plan on the sweep's data, BatchNorm re-estimated as the
    sweep did, without timing: what its predictions are checked against, number for number."""
    job = _measure_job(ws, plan, metrics=tuple(metrics), bn_recalibration=int(st.session_state[BN_BATCHES]),
                       latency=False, device=job_device(st.session_state[SWEEP_DEVICE]))  # fmt: skip
    return job, _keyed(job, LIVE_CACHE)


def live_measurement(job: MeasureJob, key: str) -> PlanMeasurement | None:
    """The current plan's measurement if done; else start it once the sliders have rested `SETTLE_S`.

    A worker process measures (`prunecore.jobs`), so no slider waits for it. A plan that changes
    before its measurement is done has it cancelled; the result of every plan measured is stored
    by plan, so moving back to one shows it at once. A fragment follows the job and reruns the page
    when it ends.
    """
    live = st.session_state.get(LIVE)
    if live is None or live["key"] != key:
        if live is not None and live["submitted"]:
            with contextlib.suppress(UserError):
                jobs.cancel(live["key"], store_path())  # the plan moved on: stop measuring the old one
        live = st.session_state[LIVE] = {"key": key, "since": time.monotonic(), "submitted": False}
    status = job_status(key)
    if status is not None and status.state == "done":
        with contextlib.suppress(UserError):
            done = jobs.result(key, store_path())
            if done is not None:
                return done
    waiting = status is None or status.state in jobs.ACTIVE
    st.fragment(_live, run_every=0.5 if waiting else None)(job, key, None if status is None else status.state)
    return None


def _live(job: MeasureJob, key: str, shown: str | None) -> None:
    live = st.session_state.get(LIVE)
    if live is None or live["key"] != key:
        return  # a fragment of a plan the page has moved on from
    status = job_status(key)
    if status is None and not live["submitted"]:
        if time.monotonic() - live["since"] >= SETTLE_S:
            submit_job(job)
            live["submitted"] = True
        st.caption(":material/hourglass_empty: Measuring this plan once the sliders rest ...")
        return
    if (None if status is None else status.state) != shown:
        st.rerun()  # the whole page: it shows the measured values, or what went wrong
    if status is None or status.state in jobs.ACTIVE:
        step = f": {status.group}" if status is not None and status.group else ""
        st.caption(f":material/hourglass_top: Measuring this plan on the sweep's data{step} ...")
    elif status.state == "failed":
        st.warning(f"Measuring this plan failed: {status.error}")
    else:  # cancelled (by another session), or its worker died
        st.caption(f"The measurement {status.state}.")
        st.button("Measure this plan", key="live_measure_again", on_click=submit_job, args=(job,))


# -- refining the plan by measuring, in the background ---------------------------------------------------
def refine_job(ws: Workspace, plan: pc.Plan, run_id: str, frozen: Iterable[str],
               ties: Sequence[Sequence[str]] = ()) -> tuple[RefineJob, str]:  # fmt: skip
    """The refinement of the Plan page's plan on the sweep's data (BatchNorm re-estimated as the sweep did), on
    the problem of run `run_id` with `ties`, `frozen` groups kept; and its key (also under `REFINE_JOB`)."""
    shape = st.session_state.get(INPUT_SHAPE)
    job = RefineJob(ws.spec, st.session_state[DATA_SPEC], str(store_path()), run_id, plan.to_json(),
                    input_shape=tuple(shape) if shape else None, limit=st.session_state.get(DATA_LIMIT) or None,
                    steps=int(st.session_state[REFINE_STEPS]), bn_recalibration=int(st.session_state[BN_BATCHES]),
                    frozen=tuple(frozen), ties=tuple(tuple(t) for t in ties),
                    device=job_device(st.session_state[SWEEP_DEVICE]))  # fmt: skip
    key = st.session_state[REFINE_JOB] = _keyed(job, REFINE_CACHE)
    return job, key


# -- fine-tuning the plan in the background --------------------------------------------------------------
FINETUNE_TEXT = PanelText(
    "Fine-tune", RUN_FINETUNE,
    "Applies the plan, re-estimates BatchNorm and trains the pruned model in a background process, which goes on "
    "when this tab closes; every finished epoch is checkpointed, and any session with the same plan and settings "
    "follows it.",
    CANCEL_FINETUNE, "Stops after the current batch; the finished epochs stay in the job's checkpoint.", "Resume",
    RESUME_FINETUNE, "Continues from the last finished epoch.",
)  # fmt: skip


def finetune_job(ws: Workspace, plan: pc.Plan) -> tuple[FinetuneJob, str]:
    """The fine-tuning job of `plan` with the Recover page's settings, and its key (also under `FINETUNE_JOB`)."""
    job = _finetune_job(ws, plan)
    key = st.session_state[FINETUNE_JOB] = _keyed(job, FINETUNE_CACHE)
    return job, key


def _finetune_job(ws: Workspace, plan: pc.Plan) -> FinetuneJob:
    """A fine-tuning of `plan` on the current model, data and image limit, trained on the data's training split."""
    shape = st.session_state.get(INPUT_SHAPE)
    distill = float(st.session_state[FT_DISTILL]) if st.session_state[FT_DISTILL_ON] else 0.0
    return FinetuneJob(ws.spec, st.session_state[DATA_SPEC], str(store_path()), plan.to_json(),
                       input_shape=tuple(shape) if shape else None, limit=st.session_state.get(DATA_LIMIT) or None,
                       train_limit=int(st.session_state[FT_TRAIN_LIMIT]) or None,
                       epochs=int(st.session_state[FT_EPOCHS]), lr=float(st.session_state[FT_LR]), distill=distill,
                       bn_recalibration=int(st.session_state[FT_BN]),
                       device=job_device(st.session_state[FT_DEVICE]))  # fmt: skip


def train_note(data_spec: str) -> str:
    """What a fine-tuning on `data_spec` trains on (`prunecore.load_train`), in words.

    >>> train_note("sample")
    "the sample's 4,000 training digits (none of the held-out ones)"
    """
    if data_spec == "sample":
        return "the sample's 4,000 training digits (none of the held-out ones)"
    if data_spec == RANDOM_DATA:
        return "random label-free images, by distillation from the dense model"
    return "the folder's own images, so the metrics after each epoch are measured on images it trains on"


def recovered(ws: Workspace, plan: pc.Plan) -> Recovery | None:
    """The finished fine-tuning of `plan` with the Recover page's current settings, from any session; else None.

    What Validate and Export show beside the one-shot model: the same key as the Recover page's
    Run would give, so a fine-tuning with other settings (or of another plan) is not this one.
    """
    key = _keyed(_finetune_job(ws, plan), FINETUNE_CACHE)
    return _recovery(key, job_status(key))


def _recovery(key: str, status: JobStatus | None) -> Recovery | None:
    """The job's `Recovery` when it is done and its model file is there; None otherwise."""
    if status is None or status.state != "done":
        return None
    with contextlib.suppress(UserError):
        done = jobs.result(key, store_path())
        if isinstance(done, Recovery) and done.model_file and Path(done.model_file).is_file():
            return done
    return None


def finetune_panel(job: FinetuneJob, key: str, status: JobStatus | None) -> Recovery | None:
    """The fine-tuning's result once done; until then its Run button, or its progress with Cancel or Resume and
    the curve of the epochs so far (a fragment that reruns itself every second while the job runs, as `sweep_panel`)."""
    done = _recovery(key, status)
    if done is not None:
        return done
    every = 1.0 if status is not None and status.state in jobs.ACTIVE else None
    st.fragment(_finetuning, run_every=every)(job, key, _phase(status))
    return None


def _finetuning(job: FinetuneJob, key: str, shown: tuple | None) -> None:
    _panel(job, key, shown, FINETUNE_TEXT)
    so_far = None
    with contextlib.suppress(UserError):
        so_far = jobs.history(key, store_path())
    if so_far is not None:
        st.plotly_chart(charts.recovery_figure(so_far), width="stretch", key="recover_live_chart")


def jobs_table(current: str = "") -> pd.DataFrame:
    """Every sweep job of the run store, from any session, most recently updated first."""
    rows = []
    for status in jobs.list_jobs(store_path(), kind="sweep"):
        job = jobs.read_job(status.key, store_path())
        rows.append({
            "job": status.key, "these settings": status.key == current, "model": job.model,
            "data": job.data + (f" (first {job.limit:,})" if job.limit else ""),
            "levels": ", ".join(f"{v:g}" for v in job.levels), "metrics": ", ".join(job.metrics),
            "state": status.state, "progress": f"{status.done:,} of {status.total:,} batches" if status.total else "",
            "updated": status.updated,
        })  # fmt: skip
    columns = ["job", "these settings", "model", "data", "levels", "metrics", "state", "progress", "updated"]
    return pd.DataFrame(rows, columns=columns)


# -- the allocation problem ------------------------------------------------------------------------
@st.cache_resource(max_entries=4, show_spinner="Ranking units and building the cost model ...")
def _problem(spec: str, run_id: str, _ws: Workspace, _curves: pd.DataFrame) -> pc.AllocationProblem:
    return pc.allocation_problem(_curves, _ws.graph, _ws.model, model_name=spec)


@st.cache_resource(max_entries=4)
def _calibrated(spec: str, run_id: str, tag: str, _base: pc.AllocationProblem, _stored: dict) -> pc.AllocationProblem:
    return pc.with_predictor(_base, Predictor.from_dict(_stored))


def problem(ws: Workspace, frame: pd.DataFrame) -> pc.AllocationProblem:
    """The allocation problem of the curves, predicting with the run's fitted predictor once the sweep job
    has stored one (its calibration ends after the curves are complete), else adding up the curves."""
    run = frame.attrs.get("run_id", "")
    with user_errors():
        made = _problem(ws.spec, run, ws, frame)
        stored = stored_predictor(run) if run else None
        if stored is not None:
            tag = hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()[:16]
            made = _calibrated(ws.spec, run, tag, made, stored)
    return made


def stored_predictor(run_id: str) -> dict | None:
    """The run's predictor from the run store (`prunecore.predict`); None when it was not calibrated."""
    runs = pc.RunStore(store_path())
    try:
        return runs.get_predictor(run_id)
    finally:
        runs.close()


def problem_tag(made: pc.AllocationProblem) -> str:
    """What tells the cached results of one problem from another's with the same run: its predictor."""
    if made.predictor is None:
        return ""
    return hashlib.sha256(json.dumps(made.predictor.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# -- predicted latency on the Plan page ---------------------------------------------------------------
# The Plan page's "Measure latency tables" builds a `prunecore.latency.LatencyModel` of the loaded model
# (`measure_latency`); from then on `latency` gives it (cached, its tables in the run store), the allocation
# problem prices latency with it and the budget may be in milliseconds.
@st.cache_resource(max_entries=4, show_spinner="Measuring latency tables: each layer alone at a few widths, then "
                   "the whole model at a few plans (tens of seconds the first time; the run store keeps them) ...")
def _latency(key: tuple, store: str, runtime: str, batch: int, round_to: int, _ws: Workspace) -> LatencyModel:
    runs = pc.RunStore(store)
    try:
        return latency_model(_ws.model, _ws.example, _ws.graph, runtime=runtime, batch=batch, store=runs,
                             round_to=round_to, progress=False)  # fmt: skip
    finally:
        runs.close()


def measure_latency(ws: Workspace, round_to: int) -> None:
    """Build the latency model of the chosen runtime and batch size and predict with it from now on (the Plan
    page's button); the latency budget starts at `latency_budget_default` of its dense latency."""
    st.session_state[LATENCY] = (ws.key, st.session_state[LATENCY_RUNTIME], int(st.session_state[LATENCY_BATCH]))
    made = latency(ws, round_to)
    if made is not None:
        st.session_state[LATENCY_MS] = latency_budget_default(made.dense_ms)


def latency(ws: Workspace, round_to: int) -> LatencyModel | None:
    """The latency model last measured for this model (`measure_latency`), from the cache; None before one is,
    or when building it failed (its message shows; the page predicts no latency until measured again)."""
    built = st.session_state.get(LATENCY)
    if built is None or built[0] != ws.key:
        return None
    with user_errors(stop=False):
        return _latency(ws.key, str(store_path()), built[1], built[2], int(round_to), ws)
    st.session_state[LATENCY] = None
    return None


def with_latency_model(made: pc.AllocationProblem, lm: LatencyModel | None) -> pc.AllocationProblem:
    """The allocation problem pricing latency with `lm` (reports carry latency, budgets may be in ms)."""
    return made if lm is None else with_latency(made, lm)


def latency_budget_default(dense_ms: float) -> float:
    """The latency budget offered first: 70 % of the dense model's, to 3 significant digits.

    >>> latency_budget_default(1.2715), latency_budget_default(41.2)
    (0.89, 28.8)
    """
    return float(f"{0.7 * dense_ms:.3g}")


def latency_step(dense_ms: float) -> float:
    """The step of the latency budget's input: about a hundredth of the dense latency, a power of ten.

    >>> latency_step(1.27), latency_step(41.2), latency_step(0.05)
    (0.01, 0.1, 0.0001)
    """
    return float(f"{10.0 ** (math.floor(math.log10(dense_ms)) - 2):.1g}") if dense_ms > 0 else 0.001


BUDGET_LABELS = {"flops": "flops", "params": "params", "latency": "latency (ms)"}  # budget kind -> its label
LATENCY_MIN_MS = 1e-4  # the least latency budget the input takes


def budget_kinds(lm: LatencyModel | None) -> list[str]:
    """The budget kinds the Plan page offers: FLOPs and params, and latency while a latency model is there (a
    latency budget chosen before falls back to FLOPs without one). Call it before the budget widgets are drawn."""
    kinds = ["flops", "params", *(["latency"] if lm is not None else [])]
    if st.session_state.get(BUDGET_KIND) not in kinds:
        st.session_state[BUDGET_KIND] = "flops"
    if lm is not None:
        st.session_state.setdefault(LATENCY_MS, latency_budget_default(lm.dense_ms))
    return kinds


def chosen_budget() -> pc.Budget:
    """The Plan page's budget: a fraction of FLOPs or params, or milliseconds of latency."""
    kind = st.session_state[BUDGET_KIND]
    if kind == "latency":
        return pc.Budget(latency=float(st.session_state[LATENCY_MS]))
    return pc.Budget(**{kind: st.session_state[BUDGET_VALUE]})


def statable_limits(ws: Workspace) -> pc.Statable | None:
    """How to allocate so that transformers' `from_pretrained` loads the plan; None for a model without a config."""
    if getattr(getattr(ws.model, "config", None), "model_type", None) is None:
        return None
    return pc.statable(ws.model, ws.graph)


def pretrained_zip(ws: Workspace, plan: pc.Plan) -> bytes:
    """The plan applied and saved with `prunecore.save_pretrained`, as a zip of the folder (HFError if it cannot)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = pc.save_pretrained(pc.apply_plan(ws.model, plan, graph=ws.graph), Path(tmp) / "pruned")
        archive = shutil.make_archive(str(Path(tmp) / "pruned"), "zip", root_dir=folder)
        return Path(archive).read_bytes()


def _budget_target(made: pc.AllocationProblem, spent: pc.Budget) -> str:
    """What an allocation was for, in `sync_sliders`' target: the budget, and for milliseconds what predicts them."""
    if spent.kind == "latency" and made.latency is not None:
        return f"{spent} ({made.latency.runtime}, batch {made.latency.batch})"
    return str(spent)


@st.cache_data(max_entries=16, show_spinner="Computing each method's Pareto front ...")
def pareto(spec: str, run_id: str, kind: str, tag: str, _problem: pc.AllocationProblem) -> pd.DataFrame:
    return pc.pareto(_problem, budgets=(0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3), kind=kind)


# -- who can reach the app, and so whether the Factory box runs code -------------------------------
FACTORY_DISABLED = (
    "The Factory box is off: a factory spec imports a module and runs a function on this machine, which "
    "nobody reaching the dashboard from another machine should be able to do. Serve it on 127.0.0.1 (the "
    f"default) to use it, or set {REMOTE_ENV}=1 if everyone who can reach it may run code here."
)


def is_loopback(address: str | None) -> bool:
    """Whether a `server.address` serves this machine only; unset or empty means every interface.

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("::1"), is_loopback(""), is_loopback("0.0.0.0")
    (True, True, True, False, False)
    """
    host = (address or "").strip().removeprefix("[").removesuffix("]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or nothing: other machines may reach it
        return False


def factory_allowed(address: str | None, environ: Mapping[str, str]) -> bool:
    """Offer the Factory box on a loopback address, or elsewhere only on `REMOTE_ENV=1` (explicit opt-in)."""
    return is_loopback(address) or environ.get(REMOTE_ENV) == "1"


def exposure_warning(address: str | None, environ: Mapping[str, str]) -> str | None:
    """What to tell the user when other machines can reach the app and nobody opted in; None when local."""
    if factory_allowed(address, environ):
        return None
    where = f"`{address}`" if address else "every network interface"
    return f"This dashboard listens on {where}, so other machines can reach it (it has no login). {FACTORY_DISABLED}"


def factory_enabled() -> bool:
    """`factory_allowed` for the address this server was started on and this process's environment."""
    return factory_allowed(st.get_option("server.address"), os.environ)


def runs_code(spec: str) -> bool:
    """Whether loading a model spec imports and calls code (`package.module:function`), not a registered name."""
    return spec.partition(":")[0] not in DATA_SPEC_KINDS


# -- shared pieces ----------------------------------------------------------------------------------
@contextlib.contextmanager
def user_errors(stop: bool = True) -> Iterator[None]:
    """Show a `UserError` raised in the block as an `st.error`, the app still running.

    `stop=True` ends this page's run there (what follows needs the block's result); `stop=False`
    carries on after the block. Any other exception is a bug and keeps its traceback. Either way
    the sidebar is drawn again: the block loads models, data and sweeps, and it names what is loaded.
    """
    try:
        yield
    except UserError as exc:
        st.error(str(exc))
        if stop:
            sidebar()  # nothing draws after st.stop()
            st.stop()
    sidebar()


def page(title: str) -> None:
    """Start a page: session defaults (and widget values kept across pages), the sidebar, the title."""
    init()
    st.session_state[SIDEBAR] = st.sidebar.empty()  # drawn now, again after each load and when the page is done
    sidebar()
    st.title(title)


# -- the sidebar and the help texts -----------------------------------------------------------------
def sidebar() -> None:
    """The shared sidebar: the model, data and sweep run the pages use now, and what the numbers mean.

    Drawn into `SIDEBAR`, the placeholder `page()` makes: when the page starts (a page that stops
    early keeps it), after every `user_errors` block (where models, data and sweeps load), after a
    sweep, and when the page is done (app.py); so it names what the page has just loaded, never
    what the previous run had, the run id included.
    """
    slot = st.session_state.get(SIDEBAR)
    if slot is None:
        slot = st.session_state[SIDEBAR] = st.sidebar.empty()
    limit = st.session_state.get(DATA_LIMIT)
    lines = [f"**Model** `{st.session_state.get(MODEL_SPEC, '')}`",
             f"**Data** `{st.session_state.get(DATA_SPEC, '')}`" + (f" (at most {limit:,} images)" if limit else "")]
    raw = st.session_state.get(WEIGHTS)
    if raw is not None:
        lines.append(f"**Weights** uploaded, sha256 `{hashlib.sha256(raw).hexdigest()[:12]}`")
    run = current_run()
    lines.append(f"**Sweep** `{run}`" if run else "**Sweep** none yet for this model and data")
    with slot.container():
        st.caption("prunecore")
        st.markdown("  \n".join(lines))
        with st.expander("What the numbers mean"):
            st.markdown(glossary())


def current_run() -> str:
    """The run id of the curves the pages use now; "" when the last curves belong to another model, data or sweep."""
    cached = st.session_state.get(CURVES)
    now = (st.session_state.get(MODEL_SPEC), st.session_state.get(DATA_SPEC), st.session_state.get(DATA_LIMIT),
           st.session_state.get(JOB))  # fmt: skip
    if cached is None or tuple(cached[0]) != now:
        return ""
    return str(cached[1].attrs.get("run_id", ""))


METRIC_HELP = {
    "accuracy": "Shown in %; its changes in percentage points (pp): 97.0 % to 95.0 % is -2.00 pp.",
    "agreement": "How often the pruned model answers like the dense one, right or wrong; needs no labels. "
                 "Shown in %; its changes in percentage points (pp).",
    "kl": "Kullback-Leibler divergence of the pruned model's class probabilities from the dense model's, in nats, "
          "averaged over images: 0 means the same outputs. It grows as confidence drifts, before the top-1 answer "
          "changes; needs no labels. Lower is better.",
    "loss": "Cross-entropy against the labels. Lower is better.",
}  # fmt: skip
BN_HELP = (
    "BatchNorm re-estimation: pruning changes what each BatchNorm layer sees, so its running mean and variance "
    "no longer fit. Running a few batches of calibration images through the pruned model (no training, no labels) "
    "recomputes them, which often recovers much of the lost accuracy. 0 turns it off."
)
FLOP_SHARE_HELP = (
    "A group's share of FLOPs is the part of the dense model's MACs in layers whose weights its channels touch. "
    "A convolution's MACs depend on both its input and its output channels, so it counts for the group feeding "
    "it and for the group it feeds: the shares overlap and add up to more than 100 %."
)
CRITERIA_HELP = "A criterion ranks the units of each group; pruning removes the lowest-ranked units first."


def metric_help(name: str) -> str:
    """What a metric measures (its registry doc) and how the dashboard shows it."""
    return f"{get_metric(name).doc}. {METRIC_HELP.get(name, '')}".strip()


def glossary() -> str:
    """Markdown explaining criteria, metrics, BatchNorm re-estimation and FLOP shares, from the registries."""
    criteria = "\n".join(f"- `{name}`: {get_criterion(name).doc}" for name in pc.list_criteria())
    metrics = "\n".join(f"- `{name}`: {metric_help(name)}" for name in pc.list_metrics())
    return (f"**Criteria.** {CRITERIA_HELP}\n{criteria}\n\n**Metrics.**\n{metrics}\n\n{BN_HELP}\n\n"
            f"{FLOP_SHARE_HELP}")  # fmt: skip


# -- plan editing: sliders in unit steps, locks, re-allocation ---------------------------------------
# A group's slider moves its sparsity one unit (one round_to multiple) a step, so every position is a
# kept count, and a lock pins that count. `ALLOCATED` is the method's last applied allocation, in
# kept counts; it moves the sliders of unlocked groups only, and never over an edit unasked: when the
# user presses Re-allocate, or when the budget, method or sweep changed and no unlocked slider
# differs from it.
def kept_options(size: int, round_to: int = 1) -> list[int]:
    """The kept counts a group of `size` units can have (`prunecore.kept_units`' values), smallest first.

    >>> kept_options(4), kept_options(10, round_to=4)
    ([1, 2, 3, 4], [4, 8, 10])
    """
    step = min(round_to, size)
    return sorted({*range(step, size + 1, step), size})


def kept_of(sparsity: float, size: int, round_to: int = 1) -> int:
    """The units a slider at `sparsity` keeps, by prunecore's one rounding rule (out-of-range values clamped).

    >>> kept_of(0.25, 4), kept_of(0.53, 16), kept_of(1.0, 16), kept_of(0.6, 16, round_to=4)
    (3, 8, 1, 8)
    """
    return pc.kept_units(size, min(max(float(sparsity), 0.0), 0.999999), round_to)


def sparsity_of(kept: int, size: int) -> float:
    """The sparsity that keeps exactly `kept` of `size` units: `kept_of` gives `kept` back.

    >>> sparsity_of(3, 4), kept_of(sparsity_of(2, 3), 3)
    (0.25, 2)
    """
    return 1.0 - kept / size


def kept_label(kept: int, size: int) -> str:
    """`"12 / 16 kept"`: what a group's slider keeps, beside it."""
    return f"{kept} / {size} kept"


def unlocked_edits(current: Mapping[str, int], reference: Mapping[str, int], locked: Iterable[str]) -> list[str]:
    """Groups whose slider differs from the method's allocation and that are not locked (re-allocation moves them)."""
    pinned = set(locked)
    return [n for n, k in current.items() if n not in pinned and reference.get(n) != k]


def slider_kept(problem: pc.AllocationProblem) -> dict[str, int]:
    """Each group's kept count as its slider holds it (dense when unset); puts the slider exactly on it.

    Call it before the sliders are drawn: a slider's value may be written only then.
    """
    out = {}
    for name in problem.cost.groups:
        size = problem.graph[name].size
        out[name] = kept_of(st.session_state.get(sparsity_key(name), 0.0), size, problem.round_to)
        st.session_state[sparsity_key(name)] = sparsity_of(out[name], size)  # a float's last bit, or a stale value
    return out


def locked_groups(names: Iterable[str]) -> list[str]:
    return [n for n in names if st.session_state.get(lock_key(n))]


def sync_sliders(problem: pc.AllocationProblem, budget: pc.Budget, method: str, run: str,
                 reallocate: bool, exclude: Sequence[str] = ()) -> tuple[dict[str, int], str | None]:  # fmt: skip
    """Apply the method to the unlocked sliders when it should (see above); its allocation and a note.

    A new model (or an allocation for other groups) starts over: every slider at the method's
    value, no locks. An uploaded plan (`load_sliders`) is the reference until re-allocated. A
    re-allocation passes every locked group's kept count to `prunecore.solve` as its locked
    sparsity, so locked groups keep exactly their counts; `exclude` (and the problem's ties) go to
    `solve` as they are. When `solve` fails (a budget the locks make impossible) its message shows
    and the sliders stay as they are.
    """
    names = list(problem.cost.groups)
    target = (problem.model_name, run, _budget_target(problem, budget), method, problem.ties, tuple(exclude))
    loaded = st.session_state.pop(LOADED, None)
    if loaded is not None:  # the plan's groups are on the sliders; the groups it leaves out are dense
        for name in set(names) - set(loaded):
            st.session_state[sparsity_key(name)] = 0.0
    current = slider_kept(problem)
    if loaded is not None:
        st.session_state[ALLOCATED] = {"target": target, "kept": current}
        return current, None
    allocated = st.session_state.get(ALLOCATED)
    fresh = allocated is None or allocated["target"][0] != target[0] or set(allocated["kept"]) != set(names)
    locked: dict[str, int] = {}
    if fresh:
        for name in names:
            st.session_state[lock_key(name)] = False
    else:
        locked = {n: current[n] for n in locked_groups(names)}
        edits = unlocked_edits(current, allocated["kept"], locked)
        if not reallocate and (allocated["target"] == target or edits):
            note = None if allocated["target"] == target else (
                f"{len(edits)} edited group(s) keep your values. Press Re-allocate unlocked groups to apply "
                f"{method} at {budget} to every unlocked group.")  # fmt: skip
            return allocated["kept"], note
    with user_errors(stop=False):
        sizes = {n: problem.graph[n].size for n in locked}
        plan = pc.solve(problem, budget, method, locked={n: sparsity_of(k, sizes[n]) for n, k in locked.items()},
                        exclude=[n for n in exclude if n not in locked])  # fmt: skip
        kept = {n: len(g.keep) for n, g in plan.groups.items()}
        for name in names:
            if name not in locked:
                st.session_state[sparsity_key(name)] = sparsity_of(kept[name], problem.graph[name].size)
        st.session_state[ALLOCATED] = {"target": target, "kept": kept}
        return kept, None
    if fresh:  # the method failed on a new model: dense sliders are the reference
        st.session_state[ALLOCATED] = {"target": target, "kept": current}
    return st.session_state[ALLOCATED]["kept"], None
