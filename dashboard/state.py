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
from typing import Any, Iterator, Mapping

import pandas as pd
import streamlit as st
import torch

import prunecore as pc
from prunecore.cost import cost_model
from prunecore.datasets import EvalData, load_data
from prunecore.errors import UserError
from prunecore.evaluate import get_metric
from prunecore.models import DATA_SPEC_KINDS, ModelSpecError, default_input_shape, load_model

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


def load_sliders(sparsities: dict[str, float]) -> None:
    """Put a plan's sparsities on the Plan page's sliders, and keep the method from overwriting them."""
    for name, s in sparsities.items():
        st.session_state[sparsity_key(name)] = min(s, 0.99)
    st.session_state[LOADED] = dict(sparsities)


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
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if _weights is not None:  # load_model reads a file; weights_only=True there
            path = Path(tmp) / "uploaded-weights.pt"
            path.write_bytes(_weights)
        model = load_model(spec, path)
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
    with user_errors():
        ws = _workspace(spec, digest, raw, tuple(shape) if shape else None)
    return ws


@st.cache_resource(max_entries=3, show_spinner="Loading the data ...")
def _data(spec: str, shape: tuple[int, ...], limit: int | None) -> EvalData:
    return load_data(spec, input_shape=shape, limit=limit)


def data(ws: Workspace) -> EvalData:
    limit = st.session_state.get(DATA_LIMIT) or None
    with user_errors():
        loaded = _data(st.session_state[DATA_SPEC], tuple(ws.example.shape), limit)
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
    carries on after the block. Any other exception is a bug and keeps its traceback.
    """
    try:
        yield
    except UserError as exc:
        st.error(str(exc))
        if stop:
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
