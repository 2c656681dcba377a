"""Editing a plan on the dashboard keeps what the user set, and the pages say what they show.

Locks pin the current kept counts, re-allocation moves unlocked groups only, edits survive a new
budget until the user re-allocates, a slider steps one unit of its group; metric deltas are in the
metric's own unit; the sidebar names the model, data and run the page uses; the Export page is a
summary, a download and a collapsed fixed-height JSON. Pure helpers first, then the app (AppTest).
"""

from __future__ import annotations


import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

import prunecore as pc
from dashboard import charts, state
from prunecore import jobs
from dashboard_sweeps import open_app, run_sweep, wait_for_job, worker_log
from dashboard_sweeps import store  # noqa: F401 (the module's run store)

HEADS = "encoder.layers.encoder_layer_0.self_attention"  # 4 attention heads in the sample ViT


# -- pure helpers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("round_to", [1, 2, 3, 4, 8])
def test_kept_options_are_exactly_the_counts_the_rounding_rule_gives(round_to):
    grid = np.linspace(0.0, 0.999, 4001)
    for size in range(1, 41):
        options = state.kept_options(size, round_to)
        assert options == sorted({pc.kept_units(size, float(s), round_to) for s in grid})
        for kept in options:  # every position of a slider is the count it says, and back
            assert state.kept_of(state.sparsity_of(kept, size), size, round_to) == kept


def test_a_four_head_group_moves_in_quarters():
    assert state.kept_options(4) == [1, 2, 3, 4]
    assert [state.sparsity_of(k, 4) for k in (4, 3, 2, 1)] == [0.0, 0.25, 0.5, 0.75]
    assert state.kept_of(0.53, 16) == 8 and state.kept_label(8, 16) == "8 / 16 kept"
    assert state.kept_of(2.0, 16) == 1 and state.kept_of(-1.0, 16) == 16  # stale values are clamped


def test_unlocked_edits_are_the_moved_groups_that_are_not_locked():
    reference = {"a": 8, "b": 16, "c": 4}
    assert state.unlocked_edits({"a": 8, "b": 12, "c": 2}, reference, locked=["c"]) == ["b"]
    assert state.unlocked_edits(reference, reference, locked=[]) == []


def test_the_glossary_explains_every_criterion_metric_and_the_overlapping_flop_shares():
    text = state.glossary()
    for name in [*pc.list_criteria(), *pc.list_metrics()]:
        assert f"`{name}`" in text
    assert "BatchNorm" in text and "more than 100 %" in text
    assert "percentage points" in state.metric_help("accuracy") and "nats" in state.metric_help("kl")


# -- the app --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swept():
    """The quick sweeps of the sample resnet20 and ViT, done as jobs: the Plan page finds their curves."""
    for model in ("sample:resnet20", "sample:vit"):
        run_sweep(app("sensitivity", model_spec=model))


def app(page: str | None = None, **values) -> AppTest:
    at = open_app(page, **values)
    ok(at)
    return at


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def sliders(at: AppTest) -> dict[str, float]:
    return {s.label: s.value for s in at.slider if s.key.startswith("sparsity::")}


def kept(at: AppTest) -> dict[str, int]:
    return {name: len(g.keep) for name, g in at.session_state["edited_plan"].groups.items()}


def card(at: AppTest, label: str):
    return next(m for m in at.metric if m.label == label)


def flops_kept(at: AppTest) -> float:
    return float(card(at, "FLOPs kept").value.rstrip("%"))


def nodes(node):
    yield node
    for child in getattr(node, "children", {}).values():
        yield from nodes(child)


def block(at: AppTest, key: str):
    return next(n for n in nodes(at.main) if n.type == "flex_container" and n.proto.id.endswith(f"-{key}"))


def sidebar_text(at: AppTest) -> str:
    return "\n".join(m.value for m in at.sidebar.markdown)


def resnet20_problem(curves) -> pc.AllocationProblem:
    sample = pc.load_sample("resnet20")
    graph = pc.trace(sample.model, sample.example)
    return pc.allocation_problem(curves, graph, sample.model, model_name="sample:resnet20")


def test_a_lock_keeps_every_edit_and_reallocation_moves_only_unlocked_groups(swept):
    at = app("plan")
    a, b = "layer1.0.conv1", "layer2.0.conv1"  # 16 and 32 units
    edited = dict(sliders(at))
    edited[a] = 0.125 if edited[a] != 0.125 else 0.25  # keeps 14 (or 12) of 16
    edited[b] = 17 / 32 if edited[b] != 17 / 32 else 18 / 32  # "0.53": keeps 15 (or 14) of 32
    at.slider(key=state.sparsity_key(a)).set_value(edited[a]).run()
    at.slider(key=state.sparsity_key(b)).set_value(edited[b]).run()
    at.checkbox(key=state.lock_key(b)).check().run()
    ok(at)
    assert sliders(at) == edited  # locking re-allocates nothing, and moves nothing
    pinned = kept(at)[b]
    assert pinned == round((1 - edited[b]) * 32)

    at.button(key="reallocate").click().run()
    ok(at)
    assert sliders(at)[b] == edited[b] and kept(at)[b] == pinned  # the locked group keeps its exact count
    problem = resnet20_problem(at.session_state["curves_cache"][1])
    expected = pc.solve(problem, pc.Budget(flops=0.5), "dp", locked={b: state.sparsity_of(pinned, 32)})
    assert kept(at) == {name: len(g.keep) for name, g in expected.groups.items()}  # the others: the method's
    assert flops_kept(at) <= 50.0


def test_edits_survive_a_new_budget_until_the_user_reallocates(swept):
    at = app("plan")
    group = "layer3.0.conv1"
    at.slider(key=state.sparsity_key(group)).set_value(0.0).run()
    edited = sliders(at)
    at.slider(key=state.BUDGET_VALUE).set_value(0.3).run()
    ok(at)
    assert sliders(at) == edited
    assert any("Re-allocate unlocked groups" in i.value for i in at.info)
    assert any("over the budget" in w.value for w in at.warning)
    at.button(key="reallocate").click().run()
    ok(at)
    assert flops_kept(at) <= 30.0 and not at.info


def test_a_slider_steps_one_unit_of_its_group_and_shows_the_kept_count(swept):
    at = app("plan", model_spec="sample:vit")
    graph = at.session_state["edited_plan"].groups
    for s in at.slider:
        if s.key.startswith("sparsity::"):
            size = graph[s.label].size
            assert (s.min, s.max, s.step) == (0.0, 1 - 1 / size, 1 / size), s.label
    heads = at.slider(key=state.sparsity_key(HEADS))
    assert heads.step == 0.25 and heads.max == 0.75
    heads.set_value(0.5).run()
    ok(at)
    assert kept(at)[HEADS] == 2
    assert "2 / 4 kept" in [m.value for m in at.markdown]


def test_metric_cards_show_changes_in_the_metrics_unit_and_stay_above_the_scrolling_sliders(swept):
    at = app("plan")
    curves = at.session_state["curves_cache"][1]
    dense = curves[curves.group == pc.DENSE].iloc[0]
    plan = at.session_state["edited_plan"]
    accuracy = card(at, "Predicted accuracy").proto
    assert accuracy.delta == charts.format_delta("accuracy", plan.predicted["accuracy"] - dense["accuracy"])
    assert accuracy.delta.endswith(" pp") and accuracy.delta_description == "vs dense"
    loss = card(at, "Predicted loss").proto.delta
    assert "pp" not in loss and float(loss) == pytest.approx(plan.predicted["loss"] - dense["loss"], rel=1e-3)
    box = block(at, "sliders")
    assert 0 < box.proto.height_config.pixel_height <= 800  # the sliders scroll inside it
    inside = {n.key for n in nodes(box) if n.type == "slider"}
    assert inside == {state.sparsity_key(g) for g in plan.groups}
    assert not [n for n in nodes(box) if n.type == "metric"]


def test_the_sidebar_names_the_model_data_and_run_the_page_uses(swept):
    at = app("plan")
    run = at.session_state["run_id"]
    assert run and f"`{run}`" in sidebar_text(at) and "`sample:resnet20`" in sidebar_text(at)
    at.switch_page("views/model.py").run()
    at.selectbox(key="sample_name").set_value("vit").run()
    ok(at)
    text = sidebar_text(at)
    assert "`sample:vit`" in text and "resnet20" not in text and run not in text  # not the previous model's run
    at.switch_page("views/plan.py").run()
    ok(at)
    vit_run = at.session_state["curves_cache"][1].attrs["run_id"]
    assert vit_run != run and f"`{vit_run}`" in sidebar_text(at) and at.session_state["run_id"] == vit_run


def test_the_export_page_is_a_summary_a_download_and_a_collapsed_fixed_height_json(swept):
    at = app("plan")
    plan = at.session_state["edited_plan"]
    at.switch_page("views/export.py").run()
    ok(at)
    assert "Download the plan (JSON)" in [b.label for b in at.get("download_button")]
    pruned = sum(len(g.keep) < g.size for g in plan.groups.values())
    assert card(at, "Groups pruned").value == f"{pruned} of {len(plan.groups)}"
    assert card(at, "Method").value == "dp"
    assert {"Params kept", "MACs kept"} <= {m.label for m in at.metric}
    (panel,) = [e for e in at.expander if e.label.startswith("Plan JSON")]
    assert not panel.proto.expanded
    box = block(at, "plan_json")
    assert 0 < box.proto.height_config.pixel_height <= 600
    assert [n.type for n in nodes(box) if n.type == "code"] == ["code"] and len(at.code) == 1
    assert pc.Plan.from_json(at.code[0].value) == pc.Plan.from_json(plan.to_json())


def test_a_transformers_model_allocates_what_its_config_states_and_exports_a_folder_from_pretrained_reads(tmp_path):
    """tinylm: the Only-what-transformers-can-load toggle ties each layer's MLP and KV groups and keeps the width;
    the Export page's zip reloads with from_pretrained and equals the plan applied."""
    import io
    import zipfile

    import torch
    import transformers

    run_sweep(app("sensitivity", model_spec="sample:tinylm"))
    at = app("plan", model_spec="sample:tinylm")
    assert not at.session_state[state.STATABLE]
    at.toggle(key=state.STATABLE).set_value(True).run()
    ok(at)
    plan = at.session_state["edited_plan"]
    for part in ("mlp.gate_proj", "self_attn.q_proj"):
        assert len({len(plan.groups[f"model.layers.{i}.{part}"].keep) for i in range(6)}) == 1, part
    assert len(plan.groups["model.embed_tokens"].keep) == 128
    assert plan.totals.flops_after <= 0.5 * plan.totals.flops_before
    assert any("stay dense" in c.value for c in at.caption)
    at.switch_page("views/export.py").run()
    at.button(key="build_pretrained").click().run()
    ok(at)
    assert not at.error and "download_pretrained" in [b.key for b in at.get("download_button")]
    zipfile.ZipFile(io.BytesIO(at.session_state["pretrained_zip"][1])).extractall(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    sample = pc.load_sample("tinylm")
    pruned = pc.apply_plan(sample.model, plan)
    with torch.no_grad():
        assert torch.equal(again(sample.example).logits, pruned(sample.example).logits)


def test_refine_by_measuring_runs_in_a_worker_and_its_plan_goes_on_the_sliders(swept):
    at = app("plan", refine_steps=5)
    at.number_input(key=state.REFINE_STEPS).set_value(6).run()
    at.button(key=state.RUN_REFINE).click().run()
    key = at.session_state[state.REFINE_JOB]
    assert wait_for_job(key).state == "done", worker_log(key)
    at.run()
    ok(at)
    refined = jobs.result(key, state.store_path())
    assert isinstance(refined, pc.Refined) and len(refined.trials) == 6
    assert refined.plan.allocation.budget == pc.Budget(flops=0.5) and refined.plan.totals.flops_after <= (
        0.5 * refined.plan.totals.flops_before)
    assert refined.moves > 0 and refined.metrics["loss"] < refined.start["loss"]
    shown = " ".join(m.value for m in at.markdown)
    assert f"{refined.moves} of 6 measured moves kept" in shown
    at.button(key=state.USE_REFINED).click().run()
    ok(at)
    assert kept(at) == {name: len(g.keep) for name, g in refined.plan.groups.items()}
