"""Export page: download the plan JSON, the pruned model (and for a transformers model a folder `from_pretrained`
reads) and, once the Recover page has fine-tuned this plan, the recovered model; upload a plan to continue editing
it."""

import tempfile
from pathlib import Path

import jsonschema
import streamlit as st

import prunecore as pc
from dashboard import charts, state
from prunecore.plan import json_schema

JSON_PX = 400  # the plan JSON scrolls inside this height: a big model's plan is thousands of lines

state.page("Export")
ws = state.workspace()
plan = state.measured_plan()
if plan is None:
    st.info("Make a plan on the Plan page first, or upload one below.")
else:
    text = plan.to_json()
    jsonschema.validate(plan.to_dict(), json_schema())  # what we offer is what the format promises
    assert pc.Plan.from_json(text) == plan
    pruned_groups = sum(len(g.keep) < g.size for g in plan.groups.values())
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Groups pruned", f"{pruned_groups} of {len(plan.groups)}")
    if plan.totals is not None:
        t = plan.totals
        c2.metric("Params kept", f"{t.params_after / t.params_before:.1%}",
                  help=f"{t.params_after:,} of {t.params_before:,}")  # fmt: skip
        c3.metric("MACs kept", f"{t.flops_after / t.flops_before:.1%}",
                  help=f"{t.flops_after:,} of {t.flops_before:,} MACs per example")  # fmt: skip
    if plan.allocation is not None:
        c4.metric("Method", plan.allocation.method, help=f"budget {plan.allocation.budget}; sliders may have been "
                  "edited after the method allocated")  # fmt: skip
        c4.caption(f"Budget `{plan.allocation.budget}`")
    left, right = st.columns(2)
    left.download_button("Download the plan (JSON)", text, file_name="plan.json", mime="application/json",
                         key="download_plan", type="primary")  # fmt: skip
    left.caption("Measured metrics included." if plan.measured else "Validate the plan to include measured metrics.")
    if right.button("Build the pruned model file", key="build_pruned"):
        with state.user_errors(stop=False), st.spinner("Applying the plan ..."), tempfile.TemporaryDirectory() as tmp:
            pruned = pc.apply_plan(ws.model, plan, graph=ws.graph)
            path = pc.save_pruned(Path(tmp) / "pruned.pt", pruned, plan, ws.spec)
            st.session_state["pruned_file"] = (state.plan_key(plan), path.read_bytes())
    built = st.session_state.get("pruned_file")
    if built is not None and built[0] == state.plan_key(plan):
        right.download_button("Download the pruned model (.pt)", built[1], file_name="pruned.pt",
                              mime="application/octet-stream", key="download_pruned")  # fmt: skip
        right.caption("Rebuild it with `model, plan = prunecore.load_pruned('pruned.pt')`.")
    if state.statable_limits(ws) is not None:  # a transformers model: a folder its from_pretrained reads
        if right.button("Build a transformers folder (.zip)", key="build_pretrained",
                        help="The plan applied and saved with prunecore.save_pretrained; refused, with the reason, "
                             "when the model's config cannot state the pruned sizes (allocate with Only what "
                             "transformers can load on the Plan page)."):  # fmt: skip
            with state.user_errors(stop=False), st.spinner("Applying the plan and saving the folder ..."):
                st.session_state["pretrained_zip"] = (state.plan_key(plan), state.pretrained_zip(ws, plan))
        folder = st.session_state.get("pretrained_zip")
        if folder is not None and folder[0] == state.plan_key(plan):
            right.download_button("Download the transformers folder (.zip)", folder[1], file_name="pruned-hf.zip",
                                  mime="application/zip", key="download_pretrained")  # fmt: skip
            right.caption("Unzip it and load it with `from_pretrained(folder)`: its config states the pruned sizes.")
    recovery = state.recovered(ws, plan)
    if recovery is not None:
        name = charts.recovery_metric(recovery)
        # the file is read when the button is clicked, not on every rerun
        right.download_button("Download the recovered model (.pt)", Path(recovery.model_file).read_bytes,
                              file_name="recovered.pt", mime="application/octet-stream",
                              key="download_recovered_export")  # fmt: skip
        right.caption(f"The pruned model is the plan applied, untrained; the recovered model is it fine-tuned for "
                      f"{len(recovery.history)} epoch(s) on the Recover page ({name} "
                      f"{charts.format_metric(name, recovery.before[name])} one-shot, "
                      f"{charts.format_metric(name, recovery.metrics[name])} recovered, on {recovery.data}). "
                      "Load it the same way: `prunecore.load_pruned('recovered.pt')`.")  # fmt: skip
    with st.expander(f"Plan JSON ({len(text):,} characters)"), st.container(height=JSON_PX, key="plan_json"):
        st.code(text, language="json")

st.subheader("Continue from a plan file")
upload = st.file_uploader("Plan JSON", type=["json"], key="plan_uploader")
if upload is not None and st.button("Load this plan into the sliders", key="load_plan"):
    loaded = state.read_plan(upload.getvalue(), ws)
    if isinstance(loaded, str):
        st.error(loaded)
    else:
        state.load_sliders(loaded)
        st.success(f"Loaded {upload.name}: {len(loaded.groups)} groups. Continue on the Plan page.")
