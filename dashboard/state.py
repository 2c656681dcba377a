"""Session-state keys, cached loaders and the shared sidebar: where every page gets its data.

Pages read the user's choices from `st.session_state` under the keys below and get models,
data, curves and allocation problems from the cached loaders, so a rerun (every widget change)
recomputes nothing it does not have to. Nothing here prunes: it calls prunecore.

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
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pandas as pd
import streamlit as st
import torch
from torch.utils.data import DataLoader, Dataset

import prunecore as pc
from prunecore.cost import cost_model
from prunecore.datasets import EvalData, load_data
from prunecore.errors import UserError
from prunecore.evaluate import get_metric
from prunecore.importance import get_criterion
from prunecore.models import DATA_SPEC_KINDS, ModelSpecError, default_input_shape, load_model

# -- session-state keys (every widget's key= is one of these, or built by a function below) -------
MODEL_SPEC = "model_spec"
WEIGHTS = "weights_bytes"  # the uploaded state_dict's bytes (the uploader widget itself is per page)
WEIGHTS_NAME = "weights_name"  # the upload's own file name, what errors call it (the bytes go via a temp file)
INPUT_SHAPE = "input_shape"
DATA_SPEC = "data_spec"
DATA_LIMIT = "data_limit"
RUN_ID = "run_id"
CRITERION = "sweep_criterion"
LEVELS = "sweep_levels"
METRICS = "sweep_metrics"
BN_BATCHES = "sweep_bn_batches"
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
VALIDATION = "validation"  # the last measurement: {"key": (plan_key, bn batches), "measured": {...}, ...}

DEFAULTS: dict[str, Any] = {
    MODEL_SPEC: "sample:resnet20",
    DATA_SPEC: "sample",
    DATA_LIMIT: 500,
    CRITERION: "l1",
    LEVELS: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
    METRICS: ["accuracy", "loss"],
    BN_BATCHES: 2,
    MODE: "exact",
    BUDGET_KIND: "flops",
    BUDGET_VALUE: 0.5,
    METHOD: "dp",
    SEARCH: "",
    ORDER: "position",
}
MODEL_PAGE_WIDGETS = ("model_source", "sample_name", "tv_name", "timm_name", "arg_num_classes", "arg_in_chans",
                      "arg_img_size", "arg_extra", "factory_spec", "input_shape_text", "data_source",
                      "data_folder")  # fmt: skip
RANDOM_DATA = "random"
"""The dashboard's own data spec: seeded Gaussian noise of the model's input shape, unlabelled (KL, agreement)."""
RANDOM_IMAGES = 256  # random images when no limit is set
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
        if isinstance(key, str) and (key in DEFAULTS or key in MODEL_PAGE_WIDGETS
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


def plan_key(plan: pc.Plan) -> tuple:
    """What identifies a plan's pruned model (its kept units), unlike its JSON, which has a timestamp."""
    return tuple(sorted((name, g.keep) for name, g in plan.groups.items()))


def measured_plan() -> pc.Plan | None:
    """The edited plan, carrying its measured metrics when the Validate page measured this very plan."""
    plan = st.session_state.get(EDITED_PLAN)
    result = st.session_state.get(VALIDATION)
    if plan is not None and result is not None and result["key"][0] == plan_key(plan):
        plan = dataclasses.replace(plan, measured=result["measured"])
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
    """A loaded, traced model and what every page shows about it."""

    spec: str
    model: torch.nn.Module
    example: torch.Tensor
    graph: pc.ChannelGraph
    cost: pc.Cost
    flop_shares: dict[str, float]


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
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    graph = pc.trace(model, example)
    shares = cost_model(model, example, graph).flop_shares()
    return Workspace(spec, model, example, graph, pc.count(model, example), shares)


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
class _Noise(Dataset):
    """Image i is standard Gaussian noise seeded by i: the same images on every run, made when read."""

    def __init__(self, count: int, shape: tuple[int, ...]) -> None:
        self.count, self.shape = count, shape

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(i))  # (C, H, W)


def random_data(shape: tuple[int, ...], count: int) -> EvalData:
    """`count` unlabelled noise images for an example input of `shape` (B, ...): label-free metrics only."""
    images = _Noise(count, tuple(shape[1:]))
    dims = "x".join(map(str, shape[1:]))
    description = f"random label-free data ({count:,} Gaussian noise images of {dims}; KL and agreement only)"
    return EvalData(DataLoader(images, 64), DataLoader(images, 64), labelled=False, description=description)


def data_problem(data_spec: str, shape: tuple[int, ...]) -> str | None:
    """Why the chosen data cannot feed a model input of `shape`, with what to choose instead; None if it can."""
    dims = "x".join(map(str, shape))
    if data_spec == "sample" and tuple(shape[-3:]) != (1, 28, 28):
        return (f"The sample digits are 1x28x28 images, but this model takes {dims}, so they cannot feed it. "
                "Choose an image folder (your own images, resized and cropped to the model's input) or random "
                "label-free data (KL and agreement with the dense model; no accuracy).")  # fmt: skip
    if data_spec.startswith("imagefolder:") and (len(shape) < 3 or shape[-3] not in (1, 3)):
        return (f"An image folder gives grayscale or RGB images, but this model takes {dims}. Choose random "
                "label-free data, or an input shape with 1 or 3 channels.")  # fmt: skip
    return None


@st.cache_resource(max_entries=3, show_spinner="Loading the data ...")
def _data(spec: str, shape: tuple[int, ...], limit: int | None) -> EvalData:
    if spec == RANDOM_DATA:
        return random_data(shape, limit or RANDOM_IMAGES)
    return load_data(spec, input_shape=shape, limit=limit)


def data(ws: Workspace) -> EvalData:
    """The chosen data for the loaded model; stops the page with what to choose instead when it cannot feed it."""
    spec, shape = st.session_state[DATA_SPEC], tuple(ws.example.shape)
    problem = data_problem(spec, shape)
    if problem is not None:
        st.error(f"{problem} (Data, on the Model page.)")
        st.stop()
    limit = st.session_state.get(DATA_LIMIT) or None
    with user_errors():
        loaded = _data(spec, shape, limit)
    return loaded


# -- curves and the allocation problem --------------------------------------------------------------
def sweep_settings() -> dict[str, Any]:
    return {
        "levels": list(st.session_state[LEVELS]), "criterion": st.session_state[CRITERION],
        "metric": list(st.session_state[METRICS]), "bn_recalibration": int(st.session_state[BN_BATCHES]),
        "mode": st.session_state[MODE],
    }  # fmt: skip


def curves(ws: Workspace) -> pd.DataFrame:
    """The curves of the current settings: from the run store at once, else swept with a progress bar."""
    data_ = data(ws)
    settings = sweep_settings()
    if not data_.labelled:
        settings["metric"] = [m for m in settings["metric"] if not get_metric(m).needs_labels] or ["kl", "agreement"]
    key = (ws.spec, st.session_state[DATA_SPEC], st.session_state.get(DATA_LIMIT), repr(settings))
    cached = st.session_state.get("curves_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    bar = st.progress(0.0, text="Looking for stored curves, else sweeping every group at every level ...")

    def report(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"Sweeping: {done} of {total} batches")

    with user_errors():
        frame = pc.sweep(
            ws.model, data_.evaluation, ws.example, graph=ws.graph, store=pc.RunStore(), model_name=ws.spec,
            calibration=data_.calibration, progress=report, **settings,
        )  # fmt: skip
    bar.empty()
    st.session_state["curves_cache"] = (key, frame)
    st.session_state[RUN_ID] = frame.attrs.get("run_id", "")
    sidebar()  # it names this run now
    return frame


@st.cache_resource(max_entries=4, show_spinner="Ranking units and building the cost model ...")
def _problem(spec: str, run_id: str, _ws: Workspace, _curves: pd.DataFrame) -> pc.AllocationProblem:
    return pc.allocation_problem(_curves, _ws.graph, _ws.model, model_name=spec)


def problem(ws: Workspace, frame: pd.DataFrame) -> pc.AllocationProblem:
    with user_errors():
        made = _problem(ws.spec, frame.attrs.get("run_id", ""), ws, frame)
    return made


@st.cache_data(max_entries=16, show_spinner="Computing each method's Pareto front ...")
def pareto(spec: str, run_id: str, kind: str, _problem: pc.AllocationProblem) -> pd.DataFrame:
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
    """The run id of the curves the pages use now; "" when the last curves belong to another model or data."""
    cached = st.session_state.get("curves_cache")
    now = (st.session_state.get(MODEL_SPEC), st.session_state.get(DATA_SPEC), st.session_state.get(DATA_LIMIT))
    if cached is None or tuple(cached[0][:3]) != now:
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
                 reallocate: bool) -> tuple[dict[str, int], str | None]:  # fmt: skip
    """Apply the method to the unlocked sliders when it should (see above); its allocation and a note.

    A new model (or an allocation for other groups) starts over: every slider at the method's
    value, no locks. An uploaded plan (`load_sliders`) is the reference until re-allocated. A
    re-allocation passes every locked group's kept count to `prunecore.solve` as its locked
    sparsity, so locked groups keep exactly their counts. When `solve` fails (a budget the locks
    make impossible) its message shows and the sliders stay as they are.
    """
    names = list(problem.cost.groups)
    target = (problem.model_name, run, str(budget), method)
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
        plan = pc.solve(problem, budget, method, locked={n: sparsity_of(k, sizes[n]) for n, k in locked.items()})
        kept = {n: len(g.keep) for n, g in plan.groups.items()}
        for name in names:
            if name not in locked:
                st.session_state[sparsity_key(name)] = sparsity_of(kept[name], problem.graph[name].size)
        st.session_state[ALLOCATED] = {"target": target, "kept": kept}
        return kept, None
    if fresh:  # the method failed on a new model: dense sliders are the reference
        st.session_state[ALLOCATED] = {"target": target, "kept": current}
    return st.session_state[ALLOCATED]["kept"], None
