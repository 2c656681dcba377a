"""What the dashboard shows, as pure functions from prunecore's plain values: plotly figures, and the
tables, cards and texts around them (metric and latency formatting, the deployment and calibration
tables).

No Streamlit here, so every chart and table is testable on its own; pages pass the result to
`st.plotly_chart`, `st.dataframe` or `st.metric`. Each figure sets `uirevision`, so zoom and legend
clicks survive reruns (a new metric resets them).

    >>> fig = curves_figure(sweep(model, data, example, metric="accuracy"), "accuracy")
"""

from __future__ import annotations

import math
import numbers
from itertools import cycle
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from prunecore.cost import Latency, format_latency, speedup
from prunecore.evaluate import get_metric, list_metrics
from prunecore.jobs import Recovery
from prunecore.measure import PlanMeasurement
from prunecore.sensitivity import DENSE

__all__ = [
    "allocation_figure",
    "calibration_rows",
    "curves_figure",
    "deployment_rows",
    "format_delta",
    "format_metric",
    "format_ms",
    "heatmap_figure",
    "is_fraction",
    "latency_card",
    "latency_note",
    "pareto_figure",
    "predicted_vs_measured_figure",
    "recovery_figure",
    "recovery_metric",
    "short_label",
]

TEMPLATE = "plotly_white"
PALETTE = qualitative.Dark24  # long enough that neighbouring groups rarely share a colour
WORSE_TO_BETTER = "RdBu"  # red = worse than dense, blue = better; centred on no change
_NOT_METRICS = frozenset({"group", "sparsity", "kept", "size", "params", "flops", "method", "budget"})
_SPARSITY_AXIS = "sparsity (fraction of units removed)"
_COSTS = {"flops": ("FLOPs", "MACs"), "params": ("params", "params")}  # cost column -> (label, unit)


# -- formatting -----------------------------------------------------------------------------------
def is_fraction(metric: str) -> bool:
    """Whether a metric is a 0..1 fraction (accuracy, agreement), shown as a percentage."""
    return metric in list_metrics() and get_metric(metric).bounds == (0.0, 1.0)


def format_metric(name: str, value: float) -> str:
    """`"97.10 %"` for fractions, 4 significant digits otherwise, `"n/a"` for a missing value."""
    if pd.isna(value):
        return "n/a"
    return f"{value * 100:.2f} %" if is_fraction(name) else f"{value:.4g}"


def format_delta(name: str, delta: float) -> str:
    """A change of a metric in its own unit: percentage points for fractions, a plain number otherwise.

    `"-2.00 pp"` for accuracy 0.968 -> 0.948 (not `"-0.0200"`), `"+0.0312"` for loss, `"n/a"` for a
    missing value. The sign leads, so `st.metric` draws the arrow the right way.
    """
    if pd.isna(delta):
        return "n/a"
    return f"{delta * 100:+.2f} pp" if is_fraction(name) else f"{delta:+.4g}"


def _d3(metric: str, signed: bool = False) -> str:
    """The d3 format of a metric's values in hover text (`:.2%`, `:+.4g`)."""
    return (":+" if signed else ":") + (".2%" if is_fraction(metric) else ".4g")


def _metric_axis(metric: str) -> dict:
    return {"title": {"text": metric}, "tickformat": ".0%" if is_fraction(metric) else None}


def _layout(fig: go.Figure, title: str, uirevision: str, height: int, **more) -> go.Figure:
    fig.update_layout(title={"text": title}, template=TEMPLATE, height=height, uirevision=uirevision, **more)
    return fig


def _rows_height(n: int, per_row: int = 18, base: int = 140, low: int = 320, high: int = 1400) -> int:
    """A figure height that grows with its number of rows (groups), within [low, high] pixels."""
    return int(min(max(base + per_row * n, low), high))


_LABEL_PX = 7  # width of one tick-label character at plotly's default 12 px font, a little generous
_MAX_LABEL = 48  # characters of a group name an axis shows; the hover shows the whole name


def short_label(name: str, limit: int = _MAX_LABEL) -> str:
    """`name` cut in its middle to at most `limit` characters, keeping both ends (where names differ).

    >>> short_label("encoder.layers.encoder_layer_11.self_attention", 24)
    'encoder.lay…lf_attention'
    """
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[len(name) - (limit - 1 - head):]


def _axis_labels(names: Sequence[str], limit: int = _MAX_LABEL) -> list[str]:
    """The names cut by `short_label` to the shortest limit (from `limit`) that still tells them all apart."""
    longest = max(map(len, names), default=0)
    while limit < longest:
        labels = [short_label(n, limit) for n in names]
        if len(set(labels)) == len(labels):
            return labels
        limit += 8
    return list(names)


# -- input checks ---------------------------------------------------------------------------------
def _check_columns(frame: pd.DataFrame, what: str, needed: Sequence[str]) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lack the column(s) {', '.join(map(repr, missing))}")
    if frame.empty:
        raise ValueError(f"{what} are empty: nothing to plot")


def _check_metric(frame: pd.DataFrame, what: str, metric: str) -> None:
    if metric not in frame.columns:
        have = [str(c) for c in frame.columns if c not in _NOT_METRICS]
        raise ValueError(f"{what} have no metric column {metric!r}; metrics present: {', '.join(have) or 'none'}")


def _split_curves(curves: pd.DataFrame, metric: str) -> tuple[float, pd.DataFrame, list[str]]:
    """(dense value, the per-group rows sorted by sparsity, groups in model order)."""
    _check_columns(curves, "the curves", ("group", "sparsity"))
    _check_metric(curves, "the curves", metric)
    base = curves[curves.group == DENSE]
    if len(base) != 1:
        raise ValueError(f"the curves need exactly one {DENSE!r} baseline row, found {len(base)}: "
                         "pass the whole frame sweep() returned")  # fmt: skip
    rows = curves[curves.group != DENSE]
    if rows.empty:
        raise ValueError("the curves hold only the dense baseline: no group was swept")
    order = list(pd.unique(rows.group))  # sweep() writes groups in model order
    return float(base[metric].iloc[0]), rows.sort_values("sparsity", kind="stable"), order


# -- sensitivity ----------------------------------------------------------------------------------
def curves_figure(curves: pd.DataFrame, metric: str, groups: Sequence[str] | None = None) -> go.Figure:
    """One line per group of `metric` against sparsity, each starting at the dense value.

    `groups` limits the lines drawn (default all); lines keep the model's order whatever the
    order of `groups`. The dense value is a dashed horizontal reference line.
    """
    dense, rows, order = _split_curves(curves, metric)
    if groups is not None:
        unknown = [g for g in groups if g not in order]
        if unknown:
            raise ValueError(f"unknown group(s) {', '.join(map(repr, unknown))}; the curves hold {len(order)} groups")
        wanted = set(groups)
        order = [g for g in order if g in wanted]
    has_units = {"kept", "size"} <= set(rows.columns)
    hover = (
        "<b>%{fullData.name}</b><br>sparsity %{x:.0%}"
        + ("<br>kept %{customdata[0]:.0f} / %{customdata[1]:.0f} units" if has_units else "")
        + f"<br>{metric} %{{y{_d3(metric)}}}<extra></extra>"
    )
    fig = go.Figure()
    for i, group in enumerate(order):
        part = rows[rows.group == group]
        size = float(part["size"].iloc[0]) if has_units else math.nan
        units = np.column_stack([[size, *part["kept"]], [size, *part["size"]]]) if has_units else None
        fig.add_trace(go.Scatter(
            x=[0.0, *part.sparsity], y=[dense, *part[metric]], name=str(group), mode="lines+markers",
            customdata=units, hovertemplate=hover, line={"color": PALETTE[i % len(PALETTE)]},
        ))  # fmt: skip
    fig.add_hline(y=dense, line_dash="dash", line_color="grey", annotation_text=f"dense {format_metric(metric, dense)}",
                  annotation_position="top right")  # fmt: skip
    fig.update_xaxes(title={"text": _SPARSITY_AXIS}, tickformat=".0%", rangemode="tozero")
    fig.update_yaxes(**_metric_axis(metric))
    return _layout(
        fig, f"Sensitivity: {metric} with one group pruned", f"curves:{metric}", 520,
        legend={"title": {"text": "group (click hides, double-click isolates)"}, "itemclick": "toggle",
                "itemdoubleclick": "toggleothers"},
        hovermode="closest",
    )  # fmt: skip


def heatmap_figure(curves: pd.DataFrame, metric: str) -> go.Figure:
    """Groups (rows, model order top to bottom) x sparsity levels: the change from dense.

    Colour is the change signed so that positive is better (`metric - dense` when higher is
    better, `dense - metric` otherwise): worse is always red, whatever the metric's direction.
    """
    dense, rows, order = _split_curves(curves, metric)
    better = get_metric(metric).higher_is_better  # raises ValueError for an unregistered metric
    grid = rows.pivot(index="group", columns="sparsity", values=metric)
    grid = grid.reindex(index=order, columns=sorted(rows.sparsity.unique()))  # (G, L)
    values = grid.to_numpy(dtype=float)
    change = values - dense
    signed = change if better else -change
    levels = [f"{s * 100:.4g}%" for s in grid.columns]
    fig = go.Figure(go.Heatmap(
        z=signed, x=levels, y=[str(g) for g in order], customdata=np.dstack([values, change]),
        colorscale=WORSE_TO_BETTER, zmid=0.0, xgap=1, ygap=1,
        colorbar={"title": {"text": "better →<br>← worse"}, "tickformat": ".0%" if is_fraction(metric) else None},
        hovertemplate=(f"<b>%{{y}}</b> at %{{x}} sparsity<br>{metric} %{{customdata[0]{_d3(metric)}}}"
                       f"<br>change from dense %{{customdata[1]{_d3(metric, signed=True)}}}<extra></extra>"),
    ))  # fmt: skip
    fig.update_xaxes(title={"text": _SPARSITY_AXIS}, type="category", side="top")
    fig.update_yaxes(title={"text": "group"}, type="category", autorange="reversed")
    return _layout(fig, f"Change in {metric} from dense ({format_metric(metric, dense)})", f"heatmap:{metric}",
                   _rows_height(len(order)))  # fmt: skip


# -- allocation -----------------------------------------------------------------------------------
def allocation_figure(
    sparsities: Mapping[str, float],
    reference: Mapping[str, float] | None = None,
    order: Sequence[str] | None = None,
) -> go.Figure:
    """Horizontal bars of the current plan's per-group sparsity, groups top to bottom.

    `reference` (the allocation method's own plan) shows as diamond markers; bars of groups the
    user moved away from it are highlighted. `order` sorts the groups; groups it does not name
    follow in their own order.
    """
    if not sparsities:
        raise ValueError("the plan has no groups: nothing to plot")
    for name, value in {**sparsities, **(reference or {})}.items():
        if not (isinstance(value, numbers.Real) and 0.0 <= value <= 1.0):
            raise ValueError(f"sparsity of {name!r} must be a number in [0, 1], got {value!r}")
    ranked = [g for g in (order or ()) if g in sparsities]
    names = ranked + [g for g in sparsities if g not in set(ranked)]
    current = [float(sparsities[g]) for g in names]
    ref = None if reference is None else [float(reference.get(g, math.nan)) for g in names]
    edited = [False] * len(names)
    if ref is not None:  # a group the reference lacks (NaN) never counts as edited
        edited = [abs(c - r) > 1e-9 for c, r in zip(current, ref)]
    fig = go.Figure(go.Bar(
        x=current, y=names, orientation="h", name="current plan",
        marker={"color": ["#EF553B" if e else "#636EFA" for e in edited]},
        customdata=[("edited" if e else "") for e in edited],
        hovertemplate="<b>%{y}</b><br>sparsity %{x:.1%} %{customdata}<extra></extra>",
    ))  # fmt: skip
    if ref is not None:
        fig.add_trace(go.Scatter(
            x=ref, y=names, mode="markers", name="method's plan",
            marker={"symbol": "diamond", "size": 9, "color": "black", "line": {"width": 1, "color": "white"}},
            hovertemplate="<b>%{y}</b><br>method's sparsity %{x:.1%}<extra></extra>",
        ))  # fmt: skip
    fig.update_xaxes(title={"text": _SPARSITY_AXIS}, tickformat=".0%", range=[0, 1])
    labels = _axis_labels(names)  # long names would squash the bars: cut, whole in the hover
    fig.update_yaxes(type="category", autorange="reversed", tickvals=names, ticktext=labels)
    title = "Per-group sparsity" + (" (red: edited)" if any(edited) else "")
    height = _rows_height(len(names), per_row=22, high=22 * 400)  # a readable row per group; pages scroll it
    margin = {"l": 24 + _LABEL_PX * max(map(len, labels)), "r": 20, "t": 80, "b": 50}
    return _layout(fig, title, "allocation", height, legend={"orientation": "h", "y": 1.0, "yanchor": "bottom", "x": 0},
                   bargap=0.2, margin=margin)


def pareto_figure(
    front: pd.DataFrame,
    metric: str,
    current: tuple[float, float] | None = None,
    dense: tuple[float, float] | None = None,
    *,
    cost: str = "flops",
    measured: Sequence[tuple[float, float]] = (),
) -> go.Figure:
    """Predicted `metric` against FLOPs (or params, `cost="params"`), one line per allocation method.

    `current` and `dense` are `(cost, metric value)` in the front's units (MACs or params). With
    `dense` the x axis is the cost kept as a fraction of dense and the dense model is a point at
    x = 1; without it the x axis is the raw cost. The current plan is a star; `uniform` is dashed grey.
    `measured` are plans measured on the same data, `(cost, measured value)`: green diamonds, so the
    gap between the predicted lines and the truth is in view.
    """
    if cost not in _COSTS:
        raise ValueError(f"cost must be one of {', '.join(_COSTS)}, got {cost!r}")
    _check_columns(front, "the Pareto front", ("method", "budget", cost))
    _check_metric(front, "the Pareto front", metric)
    label, unit = _COSTS[cost]
    scale, x_axis = 1.0, {"title": {"text": f"{unit} per example" if cost == "flops" else unit}}
    if dense is not None:
        if not dense[0] > 0:
            raise ValueError(f"the dense model's {label} must be positive, got {dense[0]!r}")
        scale, x_axis = float(dense[0]), {"title": {"text": f"{label} kept (fraction of dense)"}, "tickformat": ".0%"}
    kept = f"{label} kept " + ("%{x:.1%}" if dense is not None else f"%{{x:,.0f}} {unit}")
    fig = go.Figure()
    colours = cycle(qualitative.Plotly)
    for method in pd.unique(front.method):
        part = front[front.method == method].sort_values(cost)
        if method == "uniform":  # the baseline the other methods should beat
            line, marker = {"color": "grey", "dash": "dash"}, {"color": "grey", "symbol": "circle-open"}
        else:
            colour = next(colours)
            line, marker = {"color": colour}, {"color": colour}
        fig.add_trace(go.Scatter(
            x=part[cost] / scale, y=part[metric], name=str(method), mode="lines+markers", line=line, marker=marker,
            customdata=np.column_stack([part.budget, part[cost]]),
            hovertemplate=(f"<b>%{{fullData.name}}</b> at budget %{{customdata[0]:.0%}}<br>{kept}"
                           f"<br>predicted {metric} %{{y{_d3(metric)}}}<extra></extra>"),
        ))  # fmt: skip
    if len(measured):
        xs, ys = zip(*measured)
        fig.add_trace(go.Scatter(
            x=np.asarray(xs, dtype=float) / scale, y=list(ys), name="measured plans", mode="markers",
            marker={"symbol": "diamond", "size": 10, "color": "#00CC96", "line": {"width": 1, "color": "black"}},
            hovertemplate=f"<b>measured</b><br>{kept}<br>{metric} %{{y{_d3(metric)}}}<extra></extra>",
        ))  # fmt: skip
    star = {"symbol": "star", "size": 20, "color": "gold", "line": {"width": 1.5, "color": "black"}}
    for point, name, marker in ((current, "current plan", star), (dense, "dense", {"size": 11, "color": "black"})):
        if point is not None:
            fig.add_trace(go.Scatter(
                x=[point[0] / scale], y=[point[1]], name=name, mode="markers+text", text=[name],
                textposition="top center", marker=marker,
                hovertemplate=f"<b>{name}</b><br>{kept}<br>{metric} %{{y{_d3(metric)}}}<extra></extra>",
            ))  # fmt: skip
    fig.update_xaxes(**x_axis)
    fig.update_yaxes(**{**_metric_axis(metric), "title": {"text": f"predicted {metric}"}})
    return _layout(fig, f"Predicted {metric} against {label}, per allocation method", f"pareto:{metric}:{cost}", 500,
                   legend={"title": {"text": "method"}})  # fmt: skip


# -- validation -----------------------------------------------------------------------------------
_KINDS = (("dense", "#B6B6B6"), ("predicted", "#636EFA"), ("measured", "#00CC96"))
_RECOVERED = ("recovered", "#AB63FA")


def predicted_vs_measured_figure(rows: pd.DataFrame) -> go.Figure:
    """Dense, predicted and measured value of each metric: one panel per metric, each its own scale.

    `rows` has columns metric, dense, predicted, measured, and optionally recovered (the plan's pruned
    model after fine-tuning); a NaN value draws no bar.
    """
    _check_columns(rows, "the validation rows", ("metric", "dense", "predicted", "measured"))
    kinds = (*_KINDS, _RECOVERED) if "recovered" in rows.columns else _KINDS
    metrics = [str(m) for m in rows.metric]
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"each metric must appear once in the validation rows, got {metrics}")
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics, horizontal_spacing=0.08)
    for col, row in enumerate(rows.itertuples(index=False), start=1):
        for kind, colour in kinds:
            value = getattr(row, kind)
            present = not pd.isna(value)
            fig.add_trace(go.Bar(
                x=[kind], y=[value if present else None], name=kind, legendgroup=kind, showlegend=col == 1,
                marker={"color": colour}, text=[format_metric(row.metric, value) if present else ""],
                textposition="outside", cliponaxis=False,
                hovertemplate=f"{row.metric} {kind}: %{{y{_d3(row.metric)}}}<extra></extra>",
            ), row=1, col=col)  # fmt: skip
        fig.update_yaxes(tickformat=".0%" if is_fraction(row.metric) else None, rangemode="tozero", row=1, col=col)
    title = "Dense, predicted, measured and recovered" if len(kinds) > len(_KINDS) else "Dense, predicted and measured"
    return _layout(fig, title, "validate", 420, bargap=0.3)


INT8_ROW = "pruned + INT8 (ONNX Runtime)"


def deployment_rows(measured: PlanMeasurement) -> pd.DataFrame:
    """Dense, pruned and pruned + INT8 side by side: one row each, a column per metric, then the latency
    (`format_latency`) and the speed-up over dense (all three timed in the same rounds, so they compare).

    A speed-up the timings cannot support (`cost.speedup` is None) says so instead of a ratio.
    """
    if measured.int8 is None or measured.latency is None:
        raise ValueError("the measurement has no INT8 part: measure it with int8=True")
    dense_t, pruned_t = measured.latency
    rows = [("pruned", measured.metrics, pruned_t), (INT8_ROW, measured.int8.metrics, measured.int8.latency)]
    names = list(measured.metrics)

    def row(model: str, values: Mapping[str, float], t: Latency, ratio: str) -> dict:
        return {"model": model, **{m: values.get(m, math.nan) for m in names}, "latency": format_latency(t),
                "speed-up vs dense": ratio}  # fmt: skip

    return pd.DataFrame([row("dense", measured.dense, dense_t, "reference"),
                         *(row(m, v, t, _speedup_text(dense_t, t)) for m, v, t in rows)])  # fmt: skip


def _speedup_text(dense: Latency, other: Latency) -> str:
    """`"2.31x faster"`, `"1.25x slower"`, or why there is no ratio."""
    ratio = speedup(dense, other)
    if ratio is None:
        return "no reliable speed-up"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


# -- recovery ------------------------------------------------------------------------------------
def recovery_metric(recovery: Recovery) -> str:
    """The metric a fine-tuning is shown by: accuracy, else the first 0..1 metric (agreement), else the first."""
    names = list(recovery.before)
    if not names:
        raise ValueError("the fine-tuning record has no metrics")
    return "accuracy" if "accuracy" in names else next((m for m in names if is_fraction(m)), names[0])


def recovery_figure(recovery: Recovery, metric: str | None = None) -> go.Figure:
    """Training loss (left axis) and a held-out metric (right axis) per epoch of a fine-tuning, so far.

    Epoch 0 is the one-shot model (pruned, BatchNorm re-estimated, not trained), so the curve starts
    where pruning left it; a dashed line marks the dense model. The x axis spans every epoch asked
    for, so a running job shows how far it is. `metric` defaults to `recovery_metric`.
    """
    metric = metric or recovery_metric(recovery)
    if metric not in recovery.before:
        raise ValueError(f"the fine-tuning record has no metric {metric!r}; metrics: {', '.join(recovery.before)}")
    epochs = [e.epoch for e in recovery.history]
    last = max([recovery.epochs, *epochs, 1])
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(
        x=epochs, y=[e.loss for e in recovery.history], name="training loss", mode="lines+markers",
        line={"color": "#636EFA"}, hovertemplate="epoch %{x}<br>training loss %{y:.4g}<extra></extra>",
    ), secondary_y=False)  # fmt: skip
    fig.add_trace(go.Scatter(
        x=[0, *epochs], y=[recovery.before[metric], *(e.metrics.get(metric) for e in recovery.history)],
        name=f"held-out {metric}", mode="lines+markers", line={"color": "#00CC96"},
        hovertemplate=f"epoch %{{x}}<br>held-out {metric} %{{y{_d3(metric)}}}<extra></extra>",
    ), secondary_y=True)  # fmt: skip
    if metric in recovery.dense:
        fig.add_trace(go.Scatter(
            x=[0, last], y=[recovery.dense[metric]] * 2, name=f"dense {metric}", mode="lines",
            line={"color": "#B6B6B6", "dash": "dash"},
            hovertemplate=f"dense {metric} %{{y{_d3(metric)}}}<extra></extra>",
        ), secondary_y=True)  # fmt: skip
    fig.update_xaxes(title={"text": "epoch (0: one-shot, before training)"}, range=[-0.25, last + 0.25], dtick=1)
    fig.update_yaxes(title={"text": "training loss"}, rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title={"text": f"held-out {metric}"}, tickformat=".0%" if is_fraction(metric) else None,
                     secondary_y=True)  # fmt: skip
    return _layout(fig, f"Training loss and held-out {metric} per epoch", f"recover:{metric}", 420,
                   legend={"orientation": "h", "y": -0.25})  # fmt: skip


# -- predicted latency ---------------------------------------------------------------------------
def format_ms(ms: float) -> str:
    """Milliseconds to 3 significant digits, whole ones from 100 ms, `"n/a"` for a missing value.

    >>> format_ms(0.91234), format_ms(41.26), format_ms(1234.5), format_ms(float("nan"))
    ('0.912 ms', '41.3 ms', '1,234 ms', 'n/a')
    """
    if pd.isna(ms):
        return "n/a"
    return f"{ms:,.0f} ms" if abs(ms) >= 100 else f"{ms:.3g} ms"


def latency_note(dense_ms: float, *, runtime: str, batch: int, machine: str, error: float, timings: int) -> str:
    """What predicts the Plan page's latency: the runtime, batch size, machine and calibration error of a
    `prunecore.latency.LatencyModel` (`error`: median relative error over `timings` whole-model timings)."""
    return (f"Predicted time of one forward pass at batch size {batch} on {runtime}, on {machine}; the dense model: "
            f"{format_ms(dense_ms)}. Layer tables measured on this machine, calibrated on whole models: median "
            f"error {error * 100:.1f} % over {timings} whole-model timing{'s' if timings != 1 else ''}.")


def latency_card(ms: float, dense_ms: float) -> tuple[str, str]:
    """The Plan page's predicted-latency card: its value and the fraction of the dense model's latency.

    >>> latency_card(0.9, 1.2)
    ('0.9 ms', '75.0 % of dense')
    """
    return format_ms(ms), f"{ms / dense_ms * 100:.1f} % of dense" if dense_ms > 0 else "n/a"


def calibration_rows(calibration: Sequence[tuple[str, float, float]]) -> pd.DataFrame:
    """The whole-model timings a latency model was calibrated on, one row each: measured and predicted ms and
    the relative error (predicted against measured)."""
    rows = [{"timing": what, "measured ms": measured, "predicted ms": predicted,
             "error": (predicted - measured) / measured if measured > 0 else math.nan}
            for what, measured, predicted in calibration]  # fmt: skip
    return pd.DataFrame(rows, columns=["timing", "measured ms", "predicted ms", "error"])
