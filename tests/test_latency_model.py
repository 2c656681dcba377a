"""Latency model: layer tables read right, a runtime whose time is affine in MACs is predicted exactly,
tables and calibrations are reused from the store, and `Budget(latency=ms)` is met by every method.

Most tests time on a fake runtime (`MacClock`): a layer or a model "takes" a fixed time per MAC, so
every number is exact and nothing depends on this machine. Two smoke tests build real tables on
PyTorch and ONNX Runtime and assert only what timing cannot break.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import toy_models as toys
from prunecore import latency as lat
from prunecore.allocate import AllocationError, allocation_problem, list_methods, pareto, solve, with_latency
from prunecore.cost import count
from prunecore.errors import ArgumentError
from prunecore.graph import trace
from prunecore.plan import Budget, kept_units
from prunecore.prune import make_plan
from prunecore.sensitivity import DENSE
from prunecore.store import RunStore
from prunecore.surgery import apply_plan

SECONDS_PER_MAC = 1e-9
OVERHEAD_S = 2e-4  # what a whole model costs beyond its MACs


class _Call:
    """A stand-alone layer's fake timing: its MACs on its input, at `SECONDS_PER_MAC`."""

    def __init__(self, layer: nn.Module, x: torch.Tensor) -> None:
        self.seconds = count(layer, x).flops * x.shape[0] * SECONDS_PER_MAC

    def __call__(self) -> None:
        raise AssertionError("fake calls are never run: _time_calls is replaced")


class MacClock:
    """The fake runtime's bookkeeping: how many layer points and models it was asked to time."""

    def __init__(self) -> None:
        self.points = 0
        self.models = 0

    def time_calls(self, calls, rounds=5, min_seconds=0.01, on_each=None):
        self.points += len(calls)
        return [c.seconds for c in calls]

    def time_models(self, models, inputs):
        self.models += len(models)
        batch = inputs[0].shape[0]
        return [OVERHEAD_S + count(m, inputs).flops * batch * SECONDS_PER_MAC for m in models]


@pytest.fixture
def clock(monkeypatch):
    clock = MacClock()
    monkeypatch.setattr(lat, "_time_calls", clock.time_calls)
    lat.register_runtime(lat.Runtime("macs", "fake: time proportional to MACs", _Call, clock.time_models,
                                     lambda: "macs 1"))  # fmt: skip
    yield clock
    lat._RUNTIMES.pop("macs", None)


def _toy(cls: type[toys.Toy]):
    model = toys.randomize_norms_(cls().eval())
    x = model.example()
    return model, x, trace(model, x)


# -- tables ------------------------------------------------------------------------------------------------
def _table(block: int = 1, align: int = 1, penalty=(1.0, 1.0), dims=(0, 1)) -> lat.LayerTable:
    out, in_ = np.array([2.0, 4.0, 8.0]), np.array([3.0, 6.0])
    ms = 1.0 + 0.5 * out[:, None] * in_[None, :]  # affine in MACs: bilinear reading is exact
    return lat.LayerTable("conv", dims, out, in_, ms, positions=10.0, kernel=9.0, block=block, align=align,
                          penalty=penalty)  # fmt: skip


def test_a_table_reads_bilinearly_between_grid_points_and_holds_its_edges():
    t = _table()
    o, i = np.array([3.0, 5.0, 8.0, 1.0, 16.0]), np.array([4.0, 5.0, 6.0, 3.0, 12.0])
    expected = 1.0 + 0.5 * np.clip(o, 2, 8) * np.clip(i, 3, 6)
    np.testing.assert_allclose(t.at(o, i), expected)


def test_a_table_reads_at_widths_padded_to_the_block_and_charges_misaligned_widths():
    t = _table(block=4, align=2, penalty=(1.5, 2.0))
    # out 6 pads to 8; both widths are aligned: the plain value at (8, 4)
    np.testing.assert_allclose(t.at(np.array([6.0]), np.array([4.0])), [1.0 + 0.5 * 8 * 4])
    # out 3 is odd (pays 1.5) and pads to 4; in 5 is odd (pays 2.0) and pads to 6 (clamped to the grid's 6)
    np.testing.assert_allclose(t.at(np.array([3.0]), np.array([5.0])), [(1.0 + 0.5 * 4 * 6) * 1.5 * 2.0])
    fixed = _table(align=2, penalty=(1.5, 2.0), dims=(0, -1))  # the input width never changes: never charged
    np.testing.assert_allclose(fixed.at(np.array([4.0]), np.array([3.0])), [1.0 + 0.5 * 4 * 3])


def test_measured_tables_are_made_monotone():
    t = lat._replace_table(_table(), np.array([[1.0, 3.0], [2.0, 2.5], [1.5, 4.0]]))
    assert t.ms.tolist() == [[1.0, 3.0], [2.0, 3.0], [2.0, 4.0]]


# -- a runtime affine in MACs is predicted exactly ---------------------------------------------------------
@pytest.mark.parametrize("cls", [toys.TwoResiduals, toys.Depthwise, toys.Grouped, toys.Concat, toys.TinyTransformer,
                                 toys.Transposed, toys.Reused, toys.FlattenLinear])  # fmt: skip
@pytest.mark.parametrize("in_context", [False, True])
def test_predictions_equal_a_runtime_whose_time_is_affine_in_macs(cls, in_context, clock, tmp_path):
    model, x, graph = _toy(cls)
    lm = lat.latency_model(model, x, graph, runtime="macs", store=tmp_path / "s.sqlite", progress=False,
                           in_context=in_context)  # fmt: skip
    assert lm.in_context == (in_context and bool(graph.prunable))
    rng = np.random.default_rng(3)
    plans = [make_plan(model, graph, {g.name: float(rng.uniform(0, 0.8)) for g in graph.prunable}, seed=s)
             for s in range(4)]  # fmt: skip
    plans.append(make_plan(model, graph, 0.5))
    measured = lat.measure_plans_ms(model, x, graph, [None, *plans], runtime="macs")
    predicted = [lm.dense_ms, *(lm.predict(p) for p in plans)]
    # in context, ops without a table (nn.MultiheadAttention's packed projection, transposed convs) have their
    # groups' interaction in them unmodelled, and a group that is both a layer's input and output (Reused) costs
    # the square of its width, which its timed levels interpolate linearly: a few % here; the rest is exact
    rtol = 0.05 if in_context and cls in (toys.TinyTransformer, toys.Transposed, toys.Reused) else 1e-6
    np.testing.assert_allclose(predicted, measured, rtol=rtol)
    assert lm.error < rtol


MISALIGNED_S = 3e-8  # what each input element of a layer whose input width is not a multiple of 4 costs


def _misaligned_inputs(model: nn.Module, x: torch.Tensor) -> float:
    """Input elements (at output positions) of the convs and Linears whose input width is not a multiple of 4."""
    total = 0.0

    def hook(module, args, out):
        nonlocal total
        width = module.weight.shape[1] * getattr(module, "groups", 1)
        if width % 4:
            total += out.numel() / out.shape[1 if isinstance(module, nn.Conv2d) else -1] * width

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


@pytest.fixture
def aligned(clock):
    """A runtime that also pays per input element of every layer whose input width breaks its alignment (4)."""

    def time_models(models, inputs):
        return [s + MISALIGNED_S * _misaligned_inputs(m, inputs[0]) for s, m in
                zip(clock.time_models(models, inputs), models)]  # fmt: skip

    lat.register_runtime(lat.Runtime("aligned", "fake: MACs and layout conversions", _Call, time_models,
                                     lambda: "aligned 1", align=4))  # fmt: skip
    yield "aligned"
    lat._RUNTIMES.pop("aligned", None)


def test_layout_conversions_around_misaligned_widths_are_predicted(aligned, tmp_path):
    model, x, graph = _toy(toys.TwoResiduals)
    lm = lat.latency_model(model, x, graph, runtime=aligned, store=tmp_path / "s.sqlite", progress=False,
                           in_context=False)  # fmt: skip
    plans = [make_plan(model, graph, s) for s in (0.25, 0.4, 0.6)]  # 8 and 6 channels -> 6/5/4 and 3/3/2
    measured = lat.measure_plans_ms(model, x, graph, [None, *plans], runtime=aligned)
    np.testing.assert_allclose([lm.dense_ms, *(lm.predict(p) for p in plans)], measured, rtol=1e-6)
    assert lm.coef[lat.FEATURES.index("misaligned inputs")] == pytest.approx(MISALIGNED_S * 1e9)


def test_a_latency_budget_keeps_widths_to_the_runtimes_alignment(aligned, tmp_path):
    model, x, graph = _toy(toys.TwoResiduals)
    lm = lat.latency_model(model, x, graph, runtime=aligned, store=tmp_path / "s.sqlite", progress=False)
    assert lm.align == 4
    problem = allocation_problem(_curves(graph), graph, model, latency=lm)
    assert problem.round_to == 1  # the curves'
    for guide in ("flops", "latency"):
        plan = solve(problem, Budget(latency=0.8 * lm.dense_ms), "dp", max_sparsity=0.9, guide=guide)
        assert plan.round_to == 4 and any(g.sparsity > 0 for g in plan.groups.values())
        assert all(len(g.keep) % 4 == 0 or len(g.keep) == g.size for g in plan.groups.values())
        assert lm.predict(plan) <= 0.8 * lm.dense_ms * (1 + 1e-9)
    floor = problem.floor("latency", "dp", max_sparsity=0.9)  # every group at 4 units: 8, 6 and 5 wide
    assert floor == pytest.approx(lm.predict(make_plan(model, graph, {g.name: 0.5 for g in graph.prunable},
                                                       round_to=4)))  # fmt: skip
    assert solve(problem, Budget(flops=0.6), "dp").round_to == 1  # FLOPs and params budgets keep the curves' widths


def test_measuring_with_another_thread_count_is_refused(clock, tmp_path):
    model, x, graph = _toy(toys.TwoResiduals)
    lm = lat.latency_model(model, x, graph, runtime="macs", store=tmp_path / "s.sqlite", progress=False)
    assert lm.threads == torch.get_num_threads()
    assert lm.measure(model, x, graph, [None]) == pytest.approx([lm.measured_dense_ms])
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(lat.LatencyError, match=f"timed with {threads} thread"):
            lm.measure(model, x, graph, [None])
    finally:
        torch.set_num_threads(threads)


def test_batch_scales_the_inputs_and_the_prediction(clock, tmp_path):
    model, x, graph = _toy(toys.TwoResiduals)
    one = lat.latency_model(model, x[:1], graph, runtime="macs", batch=1, store=tmp_path / "s.sqlite", progress=False)
    eight = lat.latency_model(model, x[:1], graph, runtime="macs", batch=8, store=tmp_path / "s.sqlite",
                              progress=False)  # fmt: skip
    assert (one.batch, eight.batch) == (1, 8)
    macs_ms = count(model, x[:1]).flops * SECONDS_PER_MAC * 1e3
    overhead_ms = OVERHEAD_S * 1e3
    np.testing.assert_allclose([one.dense_ms, eight.dense_ms], [overhead_ms + macs_ms, overhead_ms + 8 * macs_ms])


def test_tables_and_calibration_come_from_the_store_the_second_time(clock, tmp_path):
    model, x, graph = _toy(toys.TwoResiduals)
    store = RunStore(tmp_path / "s.sqlite")
    first = lat.latency_model(model, x, graph, runtime="macs", store=store, progress=False, in_context=True)
    timed = (clock.points, clock.models)
    plans = 1 + len(lat.CALIBRATION) + 3 + len(lat._group_plans(first.cost, 1))  # dense, uniform, random, alone
    assert first.in_context and timed[0] > 0 and timed[1] == plans + math.ceil(plans / lat.CHUNK)  # + dense each
    again = lat.latency_model(model, x, graph, runtime="macs", store=store, progress=False, in_context=True)
    assert (clock.points, clock.models) == timed  # nothing timed again
    np.testing.assert_array_equal(again.coef, first.coef)
    assert again.calibration == first.calibration and len(again.effects) == len(first.effects) > 0
    lat.latency_model(model, x, graph, runtime="macs", store=store, progress=False, in_context=True, seed=1)
    assert clock.points == timed[0] and clock.models > timed[1]  # other plans: calibrated anew, tables reused


def test_in_context_none_times_groups_alone_only_when_the_tables_say_it_is_quick(clock, tmp_path, monkeypatch):
    model, x, graph = _toy(toys.TwoResiduals)
    store = tmp_path / "s.sqlite"
    assert not lat.latency_model(model, x, graph, runtime="macs", store=store, progress=False).in_context  # default
    assert lat.latency_model(model, x, graph, runtime="macs", store=store, progress=False, in_context=None).in_context
    monkeypatch.setattr(lat, "IN_CONTEXT_SECONDS", 0.0)
    assert not lat.latency_model(model, x, graph, runtime="macs", store=store, progress=False,
                                 in_context=None).in_context  # fmt: skip


def test_repeated_layers_share_one_table(clock, tmp_path):
    model = nn.Sequential(*[toys.conv_bn(8, 8) for _ in range(4)]).eval()
    x = torch.randn(1, 8, 6, 6)
    lm = lat.latency_model(model, x, trace(model, x), runtime="macs", store=tmp_path / "s.sqlite", progress=False)
    grid = len(lat._grid(8, 1))
    # the first conv's input and the last conv's output never change: one row each; the two inner convs are alike
    assert len(lm.layers) == 4 and clock.points == grid + grid * grid + grid


# -- budgets --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guide", ["flops", "latency"])
@pytest.mark.parametrize("method", list_methods())
def test_every_method_meets_a_latency_budget_as_measured(method, guide, clock, tmp_path):
    model, x, graph = _toy(toys.TwoResiduals)
    lm = lat.latency_model(model, x, graph, runtime="macs", store=tmp_path / "s.sqlite", progress=False)
    curves = _curves(graph)
    problem = allocation_problem(curves, graph, model, latency=lm)
    budget = Budget(latency=0.7 * lm.dense_ms)
    plan = solve(problem, budget, method, max_sparsity=0.9, guide=guide)
    assert plan.allocation.budget == budget
    assert lm.predict(plan) <= budget.value * (1 + 1e-9)
    measured = lat.measure_plans_ms(model, x, graph, [plan], runtime="macs")[0]
    assert measured <= budget.value * (1 + 1e-6)
    report = problem.report({n: g.sparsity for n, g in plan.groups.items()}, budget)
    assert not report.over_budget and report.latency_ms == pytest.approx(lm.predict(plan))
    assert report.dense_latency_ms == pytest.approx(lm.dense_ms)


def test_an_unreachable_latency_budget_names_the_smallest_reachable_latency(clock, tmp_path):
    model, x, graph = _toy(toys.TwoResiduals)
    lm = lat.latency_model(model, x, graph, runtime="macs", store=tmp_path / "s.sqlite", progress=False)
    problem = allocation_problem(_curves(graph), graph, model, latency=lm)
    floor = float(lm.evaluate(np.array([max(1, round(s * 0.1)) for s in lm.cost.sizes]))[0])
    with pytest.raises(AllocationError, match=r"smallest reachable latency is ([0-9.]+) ms") as info:
        solve(problem, Budget(latency=lm.dense_ms * 0.01), "greedy", max_sparsity=0.9)
    assert float(info.value.args[0].split("smallest reachable latency is ")[1].split(" ms")[0]) == pytest.approx(
        floor, rel=1e-3)  # fmt: skip
    assert problem.floor("latency", "greedy", max_sparsity=0.9) == pytest.approx(floor)
    reachable = solve(problem, Budget(latency=problem.floor("latency", "greedy", max_sparsity=0.9)), "greedy",
                      max_sparsity=0.9)  # fmt: skip
    assert lm.predict(reachable) == pytest.approx(floor)


def test_a_flops_guided_latency_plan_is_the_methods_plan_at_a_flops_budget(clock, tmp_path):
    """guide="flops": the plan is the method's plan for some FLOPs budget, the largest that fits the latency."""
    model, x, graph = _toy(toys.TwoResiduals)
    lm = lat.latency_model(model, x, graph, runtime="macs", store=tmp_path / "s.sqlite", progress=False)
    problem = allocation_problem(_curves(graph), graph, model, latency=lm)
    plan = solve(problem, Budget(latency=0.8 * lm.dense_ms), "dp")
    flops = plan.totals.flops_after / plan.totals.flops_before
    twin = solve(problem, Budget(flops=flops), "dp")
    assert {n: g.keep for n, g in twin.groups.items()} == {n: g.keep for n, g in plan.groups.items()}
    wider = solve(problem, Budget(flops=min(1.0, flops + 0.05)), "dp")
    assert lm.predict(wider) > 0.8 * lm.dense_ms or wider.totals == plan.totals  # the next plan up does not fit
    with pytest.raises(AllocationError, match="guide must be 'flops' or 'latency'"):
        solve(problem, Budget(latency=lm.dense_ms), "dp", guide="params")


def test_pareto_sweeps_latency_as_fractions_of_the_dense_ms(clock, tmp_path):
    model, x, graph = _toy(toys.TwoResiduals)
    lm = lat.latency_model(model, x, graph, runtime="macs", store=tmp_path / "s.sqlite", progress=False)
    problem = allocation_problem(_curves(graph), graph, model, latency=lm)
    front = pareto(problem, budgets=(0.9, 0.7), methods=["dp", "uniform"], kind="latency", max_sparsity=0.9)
    assert set(front.method) == {"dp", "uniform"} and len(front) == 4
    assert (front.latency_ms <= front.budget * lm.dense_ms * (1 + 1e-9)).all()
    row = front[(front.method == "dp") & (front.budget == 0.7)].iloc[0]
    plan = solve(problem, Budget(latency=0.7 * lm.dense_ms), "dp", max_sparsity=0.9)
    assert row.latency_ms == pytest.approx(lm.predict(plan)) and row.flops == plan.totals.flops_after
    with pytest.raises(AllocationError, match=r"fractions of the dense ms in \(0, 1\]; got \[12.0\]"):
        pareto(problem, budgets=(12.0,), kind="latency")
    with pytest.raises(AllocationError, match="a latency budget needs a latency model"):
        pareto(allocation_problem(_curves(graph), graph, model), kind="latency")


def test_a_latency_budget_without_a_latency_model_is_refused(tmp_path):
    model, x, graph = _toy(toys.TwoResiduals)
    problem = allocation_problem(_curves(graph), graph, model)
    with pytest.raises(AllocationError, match="a latency budget needs a latency model"):
        solve(problem, Budget(latency=1.0), "greedy")
    with pytest.raises(AllocationError, match="a latency budget needs a latency model"):
        problem.report({}, Budget(latency=1.0))


def test_a_latency_model_of_another_model_is_refused(clock, tmp_path):
    model, x, graph = _toy(toys.TwoResiduals)
    other, y, other_graph = _toy(toys.Depthwise)
    lm = lat.latency_model(other, y, other_graph, runtime="macs", store=tmp_path / "s.sqlite", progress=False)
    with pytest.raises(AllocationError, match="built for another model"):
        with_latency(allocation_problem(None, graph, model), lm)
    plan = make_plan(model, graph, 0.5)
    with pytest.raises(lat.LatencyError, match="does not know: it was built for another model"):
        lm.predict(plan)


@pytest.mark.parametrize("kwargs, message", [
    ({"runtime": "tensorrt"}, "unknown latency runtime 'tensorrt'; choose from"),
    ({"batch": 0}, "batch must be a positive integer"),
    ({"batch": True}, "batch must be a positive integer"),
    ({"round_to": 0}, "round_to must be a positive integer"),
])  # fmt: skip
def test_bad_arguments_are_refused_before_any_timing(kwargs, message, tmp_path):
    model, x, graph = _toy(toys.TwoResiduals)
    with pytest.raises(ArgumentError, match=message):
        lat.latency_model(model, x, graph, store=tmp_path / "s.sqlite", progress=False, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_cuda_runtime_without_a_gpu_is_refused_naming_the_runtimes_that_run_here(tmp_path):
    model, x, graph = _toy(toys.TwoResiduals)
    assert "torch-cuda" in lat.list_runtimes() and "torch-cuda" not in lat.list_runtimes(usable=True)
    message = r"runtime 'torch-cuda' times on a CUDA GPU, and torch sees none on this machine; choose one of .*torch"
    with pytest.raises(lat.LatencyError, match=message):
        lat.latency_model(model, x, graph, runtime="torch-cuda", store=tmp_path / "s.sqlite", progress=False)
    with pytest.raises(lat.LatencyError, match=message):
        lat.measure_plans_ms(model, x, graph, [None], runtime="torch-cuda")
    assert not (tmp_path / "s.sqlite").exists()  # refused before the store is opened


def test_a_read_only_store_is_read_and_never_written(clock, tmp_path):
    model, x, graph = _toy(toys.TwoResiduals)
    path = tmp_path / "s.sqlite"
    lat.latency_model(model, x, graph, runtime="macs", store=path, progress=False)
    timed = (clock.points, clock.models)
    lat.latency_model(model, x, graph, runtime="macs", store=RunStore(path, read_only=True), progress=False)
    assert (clock.points, clock.models) == timed
    fresh = tmp_path / "fresh.sqlite"
    RunStore(fresh).close()
    lat.latency_model(model, x, graph, runtime="macs", store=RunStore(fresh, read_only=True), progress=False)
    assert clock.points > timed[0]  # measured, since the store had nothing, and nothing was written
    assert RunStore(fresh).get_latency("anything") is None


# -- the real runtimes (what timing cannot break) -----------------------------------------------------------
_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", pytest.param("torch-cuda", marks=_GPU)])
def test_real_runtimes_build_tables_and_predict_positive_latencies(runtime, tmp_path, monkeypatch):
    monkeypatch.setattr(lat, "FRACTIONS", (0.5, 1.0))  # four points per table: a smoke test, not a benchmark
    model, x, graph = _toy(toys.Depthwise)
    lm = lat.latency_model(model, x, graph, runtime=runtime, store=tmp_path / "s.sqlite", progress=False,
                           random_plans=1)  # fmt: skip
    assert lm.runtime == runtime and len(lm.layers) == 5 and len(lm.calibration) == 1 + len(lat.CALIBRATION) + 1
    assert all(np.all(t.ms > 0) and np.all(np.diff(t.ms, axis=0) >= 0) for t in lm.layers)
    assert np.all(lm.coef[1:] >= 0) and lm.dense_ms > 0 and np.isfinite(lm.error)
    assert lm.predict(make_plan(model, graph, 0.5)) > 0


def _curves(graph):
    """Curves in which every group loses accuracy linearly with sparsity, each at its own rate."""
    rows = [{"group": DENSE, "sparsity": 0.0, "size": 0, "kept": 0, "accuracy": 0.9}]
    for k, g in enumerate(graph.prunable):
        for s in (0.1, 0.3, 0.5, 0.7, 0.9):
            kept = kept_units(g.size, s)
            rows.append({"group": g.name, "sparsity": s, "size": g.size, "kept": kept,
                         "accuracy": 0.9 - (k + 1) * 0.05 * (1 - kept / g.size)})  # fmt: skip
    frame = pd.DataFrame(rows)
    frame.attrs["config"] = {"criterion": "l1", "round_to": 1}
    return frame


def test_apply_plan_is_what_the_calibration_times(clock, tmp_path):
    """The calibration's uniform plans are applied models: their fake time is their MACs."""
    model, x, graph = _toy(toys.TwoResiduals)
    lm = lat.latency_model(model, x, graph, runtime="macs", store=tmp_path / "s.sqlite", progress=False)
    what, measured, _ = lm.calibration[2]
    assert what == "uniform 0.5"
    pruned = apply_plan(model, make_plan(model, graph, 0.5), graph=graph)
    assert measured == pytest.approx((OVERHEAD_S + count(pruned, x).flops * x.shape[0] * SECONDS_PER_MAC) * 1e3)


class _Untranslatable(nn.Module):
    """TorchScript's exporter has no translation for cummax: it fails and prints the graph from C++."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=1)[0]


def test_a_failed_torchscript_export_prints_nothing(capfd):
    with pytest.raises(torch.onnx.OnnxExporterError, match="cummax"):
        with lat._quiet_export():
            torch.onnx.export(_Untranslatable(), (torch.randn(2, 8),), io.BytesIO(), dynamo=False)
    out, _ = capfd.readouterr()
    assert out == ""
