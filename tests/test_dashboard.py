"""The dashboard through Streamlit's AppTest: every page runs, widgets drive the numbers, errors stay on the page.

Pages that need curves use the module's one quick sweep, which the first of them runs as a job (Run sweep).
"""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch
from streamlit.testing.v1 import AppTest

import prunecore as pc
from dashboard import charts, state
from prunecore import jobs
from dashboard_sweeps import open_app, run_sweep, store, wait_for_job  # noqa: F401 (store: the module's run store)
from prunecore.cost import Latency, format_latency
from prunecore.measure import Int8Measurement, PlanMeasurement
from prunecore.plan import json_schema

@pytest.fixture(scope="module")
def swept():
    """The quick sweep of the sample resnet20, done (a job's key names it: later sessions find it)."""
    run_sweep(app("sensitivity"))


def app(page: str | None = None, **state) -> AppTest:
    return open_app(page, **state)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_model_page_shows_the_default_sample_and_its_groups():
    at = app()
    sample = pc.load_sample("resnet20")
    graph = pc.trace(sample.model, sample.example)
    assert metric(at, "Parameters") == f"{pc.count(sample.model, sample.example).params:,}"
    table = at.dataframe[0].value.set_index("group")
    assert list(table.index) == [g.name for g in graph.groups]
    prunable = [g.name for g in graph.prunable]
    assert table.loc[prunable, "share of FLOPs"].between(0, 1).all()
    assert table.drop(index=prunable)["share of FLOPs"].isna().all()
    fixed = [g for g in graph.groups if not g.prunable]  # their whole reasons, not the table's clipped cells
    why = next(e for e in at.expander if e.label.startswith("Why"))
    assert why.label == f"Why {len(fixed)} group{'s' * (len(fixed) != 1)} cannot be pruned"
    assert all(g.reason in why.markdown[0].value for g in fixed)
    at.selectbox(key="sample_name").set_value("vit").run()
    assert not at.exception
    assert at.session_state["model_spec"] == "sample:vit"
    assert int(metric(at, "Prunable")) == 9  # 4 MLP hidden groups, 4 attention-head groups, the embedding dim


def test_model_page_errors_stay_on_the_page():
    at = app()
    at.radio(key="model_source").set_value("Factory function").run()
    at.text_input(key="factory_spec").set_value("no_such_package.models:build").run()
    assert not at.exception
    assert any("no_such_package" in e.value for e in at.error)
    at.text_input(key="input_shape_text").set_value("1,x,28").run()
    assert any("comma-separated integers" in e.value for e in at.error)


def test_sensitivity_page_sweeps_as_a_job_then_any_session_loads_the_stored_curves():
    at = run_sweep(app("sensitivity"))
    assert not at.exception
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    curves = at.dataframe[-1].value
    assert set(curves.sparsity) == {0.0, 0.3, 0.6}
    run = at.session_state["run_id"]
    again = app("sensitivity")  # a new session: the curves at once, no button to press
    assert again.session_state["run_id"] == run
    assert again.dataframe[-1].value.equals(curves)
    assert not again.button


def test_plan_page_sliders_update_the_numbers_without_touching_the_model(swept):
    at = app("plan")
    flops = metric(at, "FLOPs kept")
    assert float(flops.rstrip("%")) <= 50.0  # the default budget keeps half the FLOPs
    group = "layer3.0.conv1"
    at.slider(key=f"sparsity::{group}").set_value(0.9).run()
    assert not at.exception
    assert float(metric(at, "FLOPs kept").rstrip("%")) < float(flops.rstrip("%"))
    plan = at.session_state["edited_plan"]
    assert plan.groups[group].sparsity == pytest.approx(1 - pc.kept_units(64, 0.9) / 64)
    at.button(key="reallocate").click().run()
    assert metric(at, "FLOPs kept") == flops


def test_plan_page_budget_method_lock_and_search(swept):
    at = app("plan")
    at.slider(key="budget_value").set_value(0.3).run()
    assert float(metric(at, "FLOPs kept").rstrip("%")) <= 30.0
    group = "layer1.0.conv1"
    at.slider(key=f"sparsity::{group}").set_value(0.0).run()
    at.checkbox(key=f"lock::{group}").check().run()
    at.selectbox(key="method").set_value("greedy").run()  # no unlocked edits: it re-allocates by itself
    assert at.slider(key=f"sparsity::{group}").value == 0.0  # locked through the re-allocation
    assert float(metric(at, "FLOPs kept").rstrip("%")) <= 30.0
    at.text_input(key="group_search").set_value("layer2").run()
    assert {s.label for s in at.slider if s.key.startswith("sparsity::")} == {
        g for g in at.session_state["edited_plan"].groups if "layer2" in g
    }


def test_validate_page_measures_the_plan_in_a_job_next_to_its_prediction(swept):
    at = app("plan")
    at.switch_page("views/validate.py").run()
    at.button(key="validate_run").click().run()
    assert wait_for_job(at.session_state["measure_job"]).state == "done"
    at.run()
    assert not at.exception
    table = at.dataframe[0].value.set_index("metric")
    assert set(table.index) == {"accuracy", "loss"}
    assert table[["dense", "predicted", "measured"]].notna().all().all()
    assert 0 <= table.loc["accuracy", "measured"] <= 1
    plan = at.session_state["edited_plan"]
    again = app("plan")  # another session, the same plan: the stored result, no button to press
    again.switch_page("views/validate.py").run()
    assert "validate_run" not in [b.key for b in again.button]
    assert again.dataframe[0].value.set_index("metric").loc["accuracy", "measured"] == table.loc["accuracy", "measured"]
    assert pc.Plan.from_json(again.session_state["edited_plan"].to_json()).groups == plan.groups
    assert again.selectbox(key="validate_device").options == state.device_choices()
    again.selectbox(key="validate_device").set_value("cpu").run()  # a device named: another job, measured there
    again.button(key="validate_run").click().run()
    assert wait_for_job(again.session_state["measure_job"]).state == "done"
    assert jobs.read_job(again.session_state["measure_job"], state.store_path()).device == "cpu"
    assert again.run().dataframe[0].value.set_index("metric").loc["accuracy", "measured"] == pytest.approx(
        table.loc["accuracy", "measured"])  # fmt: skip


def _with_int8(int8: Int8Measurement | None = None, error: str | None = None) -> PlanMeasurement:
    timing = (Latency(0.012, 0.02, 7, 1, 1), Latency(0.006, 0.03, 7, 1, 1))
    return PlanMeasurement({"accuracy": 0.9, "loss": 0.31}, {"accuracy": 0.95, "loss": 0.2}, 10, 20, 30, 60,
                           "sample held-out digits", 0, timing, int8=int8, int8_error=error)  # fmt: skip


INT8 = Int8Measurement({"accuracy": 0.89}, Latency(0.003, 0.02, 7, 1, 1), "static, calibrated on sample", 2e-6)


def test_deployment_rows_put_dense_pruned_and_int8_side_by_side():
    rows = charts.deployment_rows(_with_int8(INT8))
    assert list(rows.columns) == ["model", "accuracy", "loss", "latency", "speed-up vs dense"]
    assert list(rows.model) == ["dense", "pruned", "pruned + INT8 (ONNX Runtime)"]
    assert list(rows.accuracy) == [0.95, 0.9, 0.89]
    assert rows.loss.iloc[:2].tolist() == [0.2, 0.31] and math.isnan(rows.loss.iloc[2])  # INT8 measured no loss
    assert list(rows.latency) == [format_latency(Latency(t, s, 7, 1, 1)) for t, s in
                                  ((0.012, 0.02), (0.006, 0.03), (0.003, 0.02))]  # fmt: skip
    assert list(rows["speed-up vs dense"]) == ["reference", "2.00x faster", "4.00x faster"]
    noisy = _with_int8(Int8Measurement({}, Latency(0.011, 0.2, 7, 1, 1), "dynamic", 0.0))
    assert charts.deployment_rows(noisy)["speed-up vs dense"].iloc[2] == "no reliable speed-up"
    slower = _with_int8(Int8Measurement({}, Latency(0.024, 0.01, 7, 1, 1), "dynamic", 0.0))
    assert charts.deployment_rows(slower)["speed-up vs dense"].iloc[2] == "2.00x slower"
    with pytest.raises(ValueError, match="no INT8 part"):
        charts.deployment_rows(_with_int8())


def test_validate_page_int8_checkbox_measures_another_job_and_shows_the_three_rows():
    """The result a worker would write is put where the page's job key says (the measuring is test_measure's)."""
    model = pc.load_model("sample:resnet20")
    plan = pc.make_plan(model, pc.trace(model, torch.randn(1, 1, 28, 28)), 0.3)
    at = app(edited_plan=plan)
    at.switch_page("views/validate.py").run()
    at.number_input(key="validate_bn").set_value(0).run()
    assert at.checkbox(key="validate_int8").value is False
    plain = at.session_state[state.MEASURE_JOB]
    at.checkbox(key="validate_int8").check().run()
    key = at.session_state[state.MEASURE_JOB]
    assert key != plain and [b.key for b in at.button] == [state.RUN_MEASURE]  # another job, not measured yet
    folder = state.store_path().parent / "jobs" / key
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"state": "done"}))
    (folder / "result.json").write_text(json.dumps(_with_int8(error="no onnxruntime").to_dict()))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert [w.value for w in at.warning] == ["INT8 was not measured: no onnxruntime"] and len(at.dataframe) == 1
    (folder / "result.json").write_text(json.dumps(_with_int8(INT8).to_dict()))
    at.run()
    assert not at.exception and not at.warning
    [metrics, table] = [d.value for d in at.dataframe]
    assert list(metrics.metric) == ["accuracy", "loss"]  # the page's first table stays the metric table
    assert table.equals(charts.deployment_rows(_with_int8(INT8)))
    assert any("static, calibrated on sample" in c.value for c in at.caption)
    at.checkbox(key="validate_int8").uncheck().run()
    assert at.session_state[state.MEASURE_JOB] == plain and [b.key for b in at.button] == [state.RUN_MEASURE]


def test_export_page_offers_a_valid_plan_that_round_trips(swept):
    at = app("plan")
    at.switch_page("views/export.py").run()
    assert not at.exception
    text = at.code[0].value
    jsonschema.validate(json.loads(text), json_schema())
    plan = pc.Plan.from_json(text)
    assert plan.model_name == "sample:resnet20"
    assert plan == pc.Plan.from_json(plan.to_json())
    at.button(key="build_pruned").click().run()
    assert [b.label for b in at.get("download_button")][-1].startswith("Download the pruned model")


def test_uploaded_plans_are_checked_against_the_loaded_model():
    from dashboard import state

    sample = pc.load_sample("resnet20")
    graph = pc.trace(sample.model, sample.example)
    cost = pc.count(sample.model, sample.example)
    ws = state.Workspace("sample:resnet20", sample.model, sample.example, graph, cost, {})
    good = pc.make_plan(sample.model, graph, 0.3)
    assert state.read_plan(good.to_json().encode(), ws) == good
    assert "not valid JSON" in state.read_plan(b"{not json", ws)
    other = pc.load_sample("vit")
    foreign = pc.make_plan(other.model, pc.trace(other.model, other.example), 0.3)
    assert "cannot be used with sample:resnet20" in state.read_plan(foreign.to_json().encode(), ws)


def test_choices_survive_a_visit_to_another_page():
    at = app()
    at.radio(key="model_source").set_value("torchvision architecture").run()
    at.selectbox(key="tv_name").set_value("resnet18").run()
    at.text_input(key="input_shape_text").set_value("1,3,32,32").run()
    assert at.session_state["model_spec"] == "torchvision:resnet18"
    at.switch_page("views/export.py").run()
    at.switch_page("views/model.py").run()
    assert not at.exception
    assert at.session_state["model_spec"] == "torchvision:resnet18"
    assert at.radio(key="model_source").value == "torchvision architecture"
