"""Dashboard charts: each figure shows exactly the data it is given, serialises, and rejects bad input."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

import prunecore as pc
from prunecore.datasets import load_data
from prunecore.evaluate import get_metric

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for the dashboard package
from dashboard import charts  # noqa: E402

LEVELS = [0.3, 0.6]


@pytest.fixture(scope="module")
def real():
    """One real sweep of the sample ResNet-20 (13 groups x 2 levels) and its Pareto front."""
    s = pc.load_sample("resnet20")
    data = load_data("sample", limit=64)
    graph = pc.trace(s.model, s.example)
    curves = pc.sweep(s.model, data.evaluation, s.example, levels=LEVELS, metric=["accuracy", "loss"], progress=False,
                      graph=graph)
    problem = pc.allocation_problem(curves, graph, s.model)
    front = pc.pareto(problem, budgets=(0.8, 0.5))
    return curves, front


@pytest.fixture
def curves(real) -> pd.DataFrame:
    return real[0].copy()


@pytest.fixture
def front(real) -> pd.DataFrame:
    return real[1].copy()


def groups_of(curves: pd.DataFrame) -> list[str]:
    return list(pd.unique(curves.group[curves.group != pc.DENSE]))


def dense_of(curves: pd.DataFrame, metric: str) -> float:
    return float(curves.loc[curves.group == pc.DENSE, metric].iloc[0])


def serialises(fig: go.Figure) -> dict:
    assert isinstance(fig, go.Figure)
    out = json.loads(fig.to_json())
    assert out["layout"]["template"]["layout"]  # plotly_white, resolved
    assert fig.layout.title.text and fig.layout.uirevision and fig.layout.height
    return out


# -- curves ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_curves_one_line_per_group_starting_at_dense(curves, metric):
    fig = charts.curves_figure(curves, metric)
    groups, dense = groups_of(curves), dense_of(curves, metric)
    assert [t.name for t in fig.data] == groups  # model order
    for trace, group in zip(fig.data, groups):
        rows = curves[curves.group == group].sort_values("sparsity")
        assert list(trace.x) == [0.0, *rows.sparsity]
        np.testing.assert_allclose(trace.y, [dense, *rows[metric]])
        assert trace.mode == "lines+markers"
        size = rows["size"].iloc[0]
        np.testing.assert_allclose(np.asarray(trace.customdata), np.column_stack([[size, *rows.kept], [size] * 3]))
        assert "%{fullData.name}" in trace.hovertemplate and "units" in trace.hovertemplate
    (line,) = fig.layout.shapes
    assert line.y0 == line.y1 == pytest.approx(dense) and line.line.dash == "dash"
    assert fig.layout.annotations[0].text == f"dense {charts.format_metric(metric, dense)}"
    assert fig.layout.xaxis.tickformat == ".0%" and fig.layout.xaxis.title.text.startswith("sparsity")
    assert fig.layout.yaxis.title.text == metric
    assert fig.layout.yaxis.tickformat == (".0%" if metric == "accuracy" else None)
    assert fig.layout.uirevision == f"curves:{metric}"
    serialises(fig)


def test_curves_groups_filter_keeps_model_order(curves):
    everything = groups_of(curves)
    picked = [everything[5], everything[0]]  # asked out of order
    fig = charts.curves_figure(curves, "accuracy", groups=picked)
    assert [t.name for t in fig.data] == [everything[0], everything[5]]
    assert len(charts.curves_figure(curves, "accuracy", groups=[]).data) == 0
    with pytest.raises(ValueError, match="unknown group.*'nope'"):
        charts.curves_figure(curves, "accuracy", groups=["nope"])


def test_curves_without_unit_columns(curves):
    fig = charts.curves_figure(curves.drop(columns=["kept", "size"]), "loss")
    assert fig.data[0].customdata is None and "units" not in fig.data[0].hovertemplate
    serialises(fig)


# -- heatmap --------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_heatmap_worse_is_always_negative(curves, metric):
    fig = charts.heatmap_figure(curves, metric)
    (heat,) = fig.data
    groups, dense = groups_of(curves), dense_of(curves, metric)
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (len(groups), len(LEVELS))
    assert list(heat.y) == groups and list(heat.x) == ["30%", "60%"]
    assert fig.layout.yaxis.autorange == "reversed"  # first group on top
    sign = 1.0 if metric == "accuracy" else -1.0  # loss: higher is worse
    for i, g in enumerate(groups):
        for j, s in enumerate(LEVELS):
            value = curves.loc[(curves.group == g) & (curves.sparsity == s), metric].item()
            assert z[i, j] == pytest.approx(sign * (value - dense))
            assert heat.customdata[i][j] == pytest.approx([value, value - dense])  # hover: value, raw change
    assert z.min() < 0  # the stem pruned at 60 % is much worse on both metrics, so both show it negative
    assert heat.zmid == 0 and heat.colorscale[0][1] != heat.colorscale[-1][1]
    serialises(fig)


def test_heatmap_missing_point_is_nan_and_height_is_capped(curves):
    g = groups_of(curves)[2]
    fig = charts.heatmap_figure(curves[~((curves.group == g) & (curves.sparsity == 0.6))], "loss")
    assert math.isnan(fig.data[0].z[2][1])
    serialises(fig)
    many = pd.concat([curves.iloc[:1]] + [curves.iloc[1:3].assign(group=f"g{i}") for i in range(500)])
    tall = charts.heatmap_figure(many, "accuracy").layout.height
    short = charts.heatmap_figure(curves, "accuracy").layout.height
    assert short < tall <= 1400  # grows with the groups, capped


# -- allocation -----------------------------------------------------------------------------------
def test_allocation_bars_follow_order_and_reference_shows_edits():
    plan = {"b": 0.5, "a": 0.25, "c": 0.0}
    fig = charts.allocation_figure(plan, order=["a", "b", "zzz"])  # names not in the plan are skipped
    (bars,) = fig.data
    assert list(bars.y) == ["a", "b", "c"] and list(bars.x) == [0.25, 0.5, 0.0]
    assert bars.orientation == "h" and fig.layout.xaxis.tickformat == ".0%"
    serialises(fig)

    fig = charts.allocation_figure(plan, reference={"a": 0.25, "b": 0.4, "c": 0.0})
    bars, ref = fig.data
    assert list(bars.y) == list(plan) and list(bars.x) == list(plan.values())
    assert ref.name == "method's plan" and list(ref.y) == list(plan) and list(ref.x) == [0.4, 0.25, 0.0]
    assert list(bars.customdata) == ["edited", "", ""]  # only b moved away from the method's plan
    assert len(set(bars.marker.color)) == 2
    serialises(fig)

    fig = charts.allocation_figure(plan, reference={"a": 0.25})  # groups the method's plan lacks: no marker
    assert math.isnan(fig.data[1].x[0]) and list(fig.data[0].customdata) == ["", "", ""]
    serialises(fig)


def test_allocation_sizes_its_margin_and_height_to_the_group_names():
    short = charts.allocation_figure({"a": 0.5, "b": 0.25})
    names = [f"model.backbone.encoder.stages.stage_with_a_long_name.block_{i}.mlp.fc1" for i in range(200)]
    fig = charts.allocation_figure(dict.fromkeys(names, 0.5))
    (bars,) = fig.data
    assert list(bars.y) == names and list(fig.layout.yaxis.tickvals) == names  # whole names: the hover, the keys
    labels = list(fig.layout.yaxis.ticktext)
    assert max(map(len, labels)) <= 48 and all("…" in t for t in labels) and len(set(labels)) == len(names)
    assert short.layout.margin.l < fig.layout.margin.l <= 24 + 7 * 48  # room for the labels, not more
    assert fig.layout.height >= 200 * 20  # a readable row per group however many there are
    serialises(fig)
    alike = [f"encoder.layers.encoder_layer_{i}.self_attention.out_proj.extra_long_suffix" for i in range(12)]
    labels = list(charts.allocation_figure(dict.fromkeys(alike, 0.5)).layout.yaxis.ticktext)
    assert len(set(labels)) == len(alike)  # cut further from the middle only while they stay apart


def test_allocation_rejects_bad_plans():
    with pytest.raises(ValueError, match="no groups"):
        charts.allocation_figure({})
    with pytest.raises(ValueError, match="'a'.*\\[0, 1\\]"):
        charts.allocation_figure({"a": 1.5})
    with pytest.raises(ValueError, match="'b'"):
        charts.allocation_figure({"a": 0.5}, reference={"b": float("nan")})


# -- pareto ---------------------------------------------------------------------------------------
def test_pareto_one_line_per_method_with_current_and_dense(curves, front):
    dense = (float(curves.loc[curves.group == pc.DENSE, "flops"].item()), dense_of(curves, "accuracy"))
    current = (float(front.flops.iloc[0]), float(front.accuracy.iloc[0]))
    fig = charts.pareto_figure(front, "accuracy", current=current, dense=dense)
    methods = list(pd.unique(front.method))
    assert [t.name for t in fig.data] == [*methods, "current plan", "dense"]
    for trace, method in zip(fig.data, methods):
        rows = front[front.method == method].sort_values("flops")
        np.testing.assert_allclose(trace.x, rows.flops / dense[0])
        np.testing.assert_allclose(trace.y, rows.accuracy)
        np.testing.assert_allclose(np.asarray(trace.customdata)[:, 0], rows.budget)
    uniform = fig.data[methods.index("uniform")]
    assert uniform.line.dash == "dash" and uniform.line.color == "grey"
    assert all(t.line.dash is None for t in fig.data[: len(methods)] if t.name != "uniform")
    star, base = fig.data[-2:]
    assert star.marker.symbol == "star" and star.x[0] == pytest.approx(current[0] / dense[0])
    assert star.y[0] == current[1] and list(star.text) == ["current plan"]
    assert (base.x[0], base.y[0]) == (1.0, dense[1])
    assert fig.layout.xaxis.tickformat == ".0%" and "fraction of dense" in fig.layout.xaxis.title.text
    serialises(fig)


def test_pareto_without_dense_uses_raw_macs(front):
    fig = charts.pareto_figure(front, "loss")
    assert len(fig.data) == front.method.nunique()
    assert max(max(t.x) for t in fig.data) == front.flops.max()
    assert "MACs" in fig.layout.xaxis.title.text
    serialises(fig)
    with pytest.raises(ValueError, match="positive"):
        charts.pareto_figure(front, "loss", dense=(0, 1.0))


def test_pareto_against_params(curves, front):
    dense_params = float(curves.loc[curves.group == pc.DENSE, "params"].item())
    current = (front.params.iloc[0], 1.0)
    fig = charts.pareto_figure(front, "loss", current=current, dense=(dense_params, 0.1), cost="params")
    dp = fig.data[list(pd.unique(front.method)).index("dp")]
    np.testing.assert_allclose(dp.x, front[front.method == "dp"].sort_values("params").params / dense_params)
    assert fig.data[-2].x[0] == pytest.approx(front.params.iloc[0] / dense_params)
    assert fig.layout.xaxis.title.text == "params kept (fraction of dense)"
    with pytest.raises(ValueError, match="cost must be one of flops, params"):
        charts.pareto_figure(front, "loss", cost="latency")


# -- predicted vs measured ------------------------------------------------------------------------
def test_predicted_vs_measured_omits_nan_bars():
    rows = pd.DataFrame({"metric": ["accuracy", "loss"], "dense": [0.97, 0.11],
                         "predicted": [0.9, float("nan")], "measured": [0.91, 0.4]})  # fmt: skip
    fig = charts.predicted_vs_measured_figure(rows)
    assert len(fig.data) == 6  # (dense, predicted, measured) per metric, each metric its own panel
    got = {(t.xaxis, t.name): t.y[0] for t in fig.data}
    assert got[("x", "predicted")] == 0.9 and got[("x2", "measured")] == 0.4
    assert got[("x2", "predicted")] is None
    assert [t.showlegend for t in fig.data] == [True] * 3 + [False] * 3
    out = serialises(fig)
    assert out["data"][4]["y"] == [None]
    assert [a.text for a in fig.layout.annotations] == ["accuracy", "loss"]


# -- input checks and formatting ------------------------------------------------------------------
@pytest.mark.parametrize("make", [charts.curves_figure, charts.heatmap_figure])
def test_bad_curves_raise(curves, make):
    with pytest.raises(ValueError, match="no metric column 'kl'.*accuracy, loss"):
        make(curves, "kl")
    with pytest.raises(ValueError, match="empty"):
        make(curves.iloc[:0], "accuracy")
    with pytest.raises(ValueError, match="baseline"):
        make(curves[curves.group != pc.DENSE], "accuracy")
    with pytest.raises(ValueError, match="no group was swept"):
        make(curves[curves.group == pc.DENSE], "accuracy")
    with pytest.raises(ValueError, match="DataFrame"):
        make(None, "accuracy")


def test_bad_front_and_rows_raise(front):
    with pytest.raises(ValueError, match="no metric column 'kl'"):
        charts.pareto_figure(front, "kl")
    with pytest.raises(ValueError, match="empty"):
        charts.pareto_figure(pd.DataFrame(columns=front.columns), "accuracy")
    with pytest.raises(ValueError, match="'measured'"):
        charts.predicted_vs_measured_figure(pd.DataFrame({"metric": ["loss"], "dense": [1.0], "predicted": [1.0]}))


def test_format_metric():
    assert charts.format_metric("accuracy", 0.971) == "97.10 %"
    assert charts.format_metric("agreement", 1.0) == "100.00 %"
    assert charts.format_metric("loss", 0.112736) == "0.1127"
    assert charts.format_metric("kl", 12345.6) == "1.235e+04"
    assert charts.format_metric("loss", float("nan")) == "n/a"


@pytest.mark.parametrize("metric", pc.list_metrics())
def test_format_delta_is_in_the_metrics_own_unit(metric):
    text = charts.format_delta(metric, -0.02)
    if get_metric(metric).bounds == (0.0, 1.0):  # a fraction shown in %: its change in percentage points
        assert text == "-2.00 pp"
    else:
        assert text == "-0.02"
    assert charts.format_delta(metric, 0.0312).startswith("+") and charts.format_delta(metric, float("nan")) == "n/a"


def test_format_delta_of_the_reported_accuracy_drop():
    assert charts.format_delta("accuracy", 0.948 - 0.968) == "-2.00 pp"  # not "-0.0200"
    assert charts.format_delta("loss", 0.0312) == "+0.0312"


def test_format_ms_keeps_three_significant_digits_and_whole_ms_from_100():
    assert charts.format_ms(0.91234) == "0.912 ms"
    assert charts.format_ms(41.26) == "41.3 ms"
    assert charts.format_ms(1234.5) == "1,234 ms"  # not "1.23e+03 ms"
    assert charts.format_ms(float("nan")) == "n/a"


def test_latency_card_is_milliseconds_and_the_fraction_of_dense():
    assert charts.latency_card(0.9, 1.2) == ("0.9 ms", "75.0 % of dense")
    assert charts.latency_card(41.26, 41.26) == ("41.3 ms", "100.0 % of dense")
    assert charts.latency_card(1.0, 0.0)[1] == "n/a"


def test_latency_note_says_the_runtime_batch_machine_and_calibration_error():
    note = charts.latency_note(1.2, runtime="onnxruntime", batch=8, machine="Xeon, 2 cores, 2 threads, onnxruntime",
                               error=0.0213, timings=7)  # fmt: skip
    for part in ("batch size 8", "on onnxruntime", "Xeon, 2 cores, 2 threads", "dense model: 1.2 ms",
                 "median error 2.1 % over 7 whole-model timings."):
        assert part in note, part
    assert "over 1 whole-model timing." in charts.latency_note(1.0, runtime="torch", batch=1, machine="m", error=0.0,
                                                               timings=1)  # fmt: skip


def test_calibration_rows_are_the_timings_with_their_relative_error():
    rows = charts.calibration_rows([("dense", 2.0, 2.1), ("uniform 0.5", 1.0, 0.95)])
    assert list(rows.columns) == ["timing", "measured ms", "predicted ms", "error"]
    assert rows.timing.tolist() == ["dense", "uniform 0.5"]
    assert rows.error.tolist() == pytest.approx([0.05, -0.05])
    assert charts.calibration_rows([]).empty
