"""Session-state keys, cached loaders and the shared sidebar: where every page gets its data.

Pages read the user's choices from `st.session_state` under the keys below and get models,
data, curves and allocation problems from the cached loaders, so a rerun (every widget change)
recomputes nothing it does not have to. Nothing here prunes: it calls prunecore.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import streamlit as st
import torch

import prunecore as pc
from prunecore.allocate import AllocationError
from prunecore.cost import cost_model
from prunecore.datasets import DataSpecError, EvalData, load_data
from prunecore.evaluate import get_metric
from prunecore.models import ModelSpecError, default_input_shape, load_model

# -- session-state keys (every widget's key= is one of these, or built by a function below) -------
MODEL_SPEC = "model_spec"
WEIGHTS = "weights_bytes"  # the uploaded state_dict's bytes (the uploader widget itself is per page)
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
ALLOCATED = "allocated"  # {"key": what the allocation was computed for, "sparsities": {group: s}}
SEARCH = "group_search"
ORDER = "group_order"
LOADED = "loaded_plan"  # sparsities of an uploaded plan, applied on the Plan page's next run
EDITED_PLAN = "edited_plan"  # the Plan the sliders describe, rebuilt by the Plan page on every change
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
MODEL_PAGE_WIDGETS = ("model_source", "sample_name", "tv_name", "factory_spec", "input_shape_text", "data_source",
                      "data_folder")  # fmt: skip
DEFAULTS_ENV = "PRUNECORE_DASHBOARD_DEFAULTS"
"""A JSON object overriding `DEFAULTS` (e.g. a team's sweep levels, or a quick sweep for tests)."""
ERRORS = (ModelSpecError, DataSpecError, pc.TraceError, pc.PlanError, pc.SampleError, pc.StoreError, AllocationError,
          ValueError, FileNotFoundError)  # fmt: skip


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
    except pc.PlanError as exc:
        return f"This plan cannot be used with {ws.spec}: {exc}"
    return plan


def load_sliders(sparsities: dict[str, float]) -> None:
    """Put a plan's sparsities on the Plan page's sliders, and keep the method from overwriting them."""
    for name, s in sparsities.items():
        st.session_state[sparsity_key(name)] = min(s, 0.99)
    st.session_state[LOADED] = dict(sparsities)


def sparsity_key(group: str) -> str:
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
def _workspace(spec: str, weights_digest: str, _weights: bytes | None, shape: tuple[int, ...] | None) -> Workspace:
    path = None
    if _weights is not None:  # load_model reads a file; weights_only=True there
        with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
            f.write(_weights)
            path = Path(f.name)
    try:
        model = load_model(spec, path)
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
    shape = shape or default_input_shape(spec)
    if shape is None:
        raise ValueError(f"give an input shape: prunecore cannot know what input {spec} expects")
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    graph = pc.trace(model, example)
    shares = cost_model(model, example, graph).flop_shares()
    return Workspace(spec, model, example, graph, pc.count(model, example), shares)


def workspace() -> Workspace:
    """The selected model, loaded once; stops the page with the reason if it cannot be loaded."""
    raw = st.session_state.get(WEIGHTS)
    digest = hashlib.sha256(raw).hexdigest() if raw is not None else ""
    shape = st.session_state.get(INPUT_SHAPE)
    return guard(lambda: _workspace(st.session_state[MODEL_SPEC], digest, raw, tuple(shape) if shape else None))


@st.cache_resource(max_entries=3, show_spinner="Loading the data ...")
def _data(spec: str, shape: tuple[int, ...], limit: int | None) -> EvalData:
    return load_data(spec, input_shape=shape, limit=limit)


def data(ws: Workspace) -> EvalData:
    limit = st.session_state.get(DATA_LIMIT) or None
    return guard(lambda: _data(st.session_state[DATA_SPEC], tuple(ws.example.shape), limit))


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

    frame = guard(lambda: pc.sweep(
        ws.model, data_.evaluation, ws.example, graph=ws.graph, store=pc.RunStore(), model_name=ws.spec,
        calibration=data_.calibration, progress=report, **settings,
    ))  # fmt: skip
    bar.empty()
    st.session_state["curves_cache"] = (key, frame)
    st.session_state[RUN_ID] = frame.attrs.get("run_id", "")
    return frame


@st.cache_resource(max_entries=4, show_spinner="Ranking units and building the cost model ...")
def _problem(spec: str, run_id: str, _ws: Workspace, _curves: pd.DataFrame) -> pc.AllocationProblem:
    return pc.allocation_problem(_curves, _ws.graph, _ws.model, model_name=spec)


def problem(ws: Workspace, frame: pd.DataFrame) -> pc.AllocationProblem:
    return guard(lambda: _problem(ws.spec, frame.attrs.get("run_id", ""), ws, frame))


@st.cache_data(max_entries=16, show_spinner="Computing each method's Pareto front ...")
def pareto(spec: str, run_id: str, kind: str, _problem: pc.AllocationProblem) -> pd.DataFrame:
    return pc.pareto(_problem, budgets=(0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3), kind=kind)


# -- shared pieces ----------------------------------------------------------------------------------
def guard(fn: Callable[[], Any]) -> Any:
    """Run `fn`; a user error becomes an `st.error` with the reason and stops this page, not the app."""
    try:
        return fn()
    except ERRORS as exc:
        st.error(f"{type(exc).__name__}: {exc}")
        st.stop()


def page(title: str) -> None:
    """Start a page: session defaults (and widget values kept across pages), the sidebar, the title."""
    init()
    _sidebar()
    st.title(title)


def _sidebar() -> None:
    """What is loaded, on every page."""
    with st.sidebar:
        st.caption("prunecore")
        st.markdown(f"**Model** `{st.session_state[MODEL_SPEC]}`  \n**Data** `{st.session_state[DATA_SPEC]}`")
        run = st.session_state.get(RUN_ID)
        if run:
            st.markdown(f"**Sweep** `{run}`")
