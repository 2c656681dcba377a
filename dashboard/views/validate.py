"""Validate page: apply the edited plan, re-estimate BatchNorm, measure it next to the prediction."""

import pandas as pd
import streamlit as st

import prunecore as pc
from dashboard import charts, state
from prunecore.cost import compare_latency, format_latency, format_speedup

state.page("Validate")
plan = st.session_state.get(state.EDITED_PLAN)
if plan is None:
    st.info("Make a plan on the Plan page first.")
    st.stop()
ws = state.workspace()
data = state.data(ws)
metrics = list(plan.predicted) or (["accuracy", "loss"] if data.labelled else ["kl", "agreement"])
bn = st.number_input("BatchNorm re-estimation batches (0: off)", 0, 200, 50, key="validate_bn")
st.caption(f"Measured on {data.description}; BatchNorm statistics re-estimated on its calibration images.")

key = (state.plan_key(plan), bn)
result = st.session_state.get(state.VALIDATION)
if st.button("Apply and measure", type="primary", key="validate_run"):
    with state.user_errors(), st.status("Applying the plan and measuring ...", expanded=True) as status:
        st.write("Applying the plan (physical channel removal) ...")
        pruned = pc.apply_plan(ws.model, plan, graph=ws.graph)
        st.write("Re-estimating BatchNorm statistics and evaluating ...")
        measured = pc.evaluate_plan(ws.model, plan, data.evaluation, metrics, bn_recalibration=bn,
                                    calibration=data.calibration, graph=ws.graph)  # fmt: skip
        dense = pc.evaluate(ws.model, data.evaluation, metrics, reference=ws.model)
        st.write("Timing both models on the CPU, in alternating rounds ...")
        cost = pc.count(pruned, ws.example)
        latency = compare_latency(ws.model, pruned, ws.example)  # the same measurement the CLI reports
        status.update(label="Measured", state="complete")
    result = {"key": key, "measured": measured, "dense": dense, "params": cost.params, "flops": cost.flops,
              "latency": latency}  # fmt: skip
    st.session_state[state.VALIDATION] = result

if result is None or result["key"] != key:
    st.info("Press the button to measure this plan.")
    st.stop()
c1, c2, c3 = st.columns(3)
c1.metric("Params kept", f"{result['params'] / ws.cost.params:.1%}", help=f"{result['params']:,} of {ws.cost.params:,}")
c2.metric("FLOPs kept", f"{result['flops'] / ws.cost.flops:.1%}", help=f"{result['flops']:,} of {ws.cost.flops:,} MACs")
dense_t, pruned_t = result["latency"]
speed = format_speedup(dense_t, pruned_t)  # "1.44x faster (median of 7 rounds, ...)": the ratio on the card
c3.metric("CPU latency", format_latency(pruned_t), delta=speed.split(" (")[0].split(":")[0], delta_color="off",
          help=f"{speed}. Dense model: {format_latency(dense_t)}.")  # fmt: skip
rows = pd.DataFrame([{"metric": m, "dense": result["dense"].get(m), "predicted": plan.predicted.get(m),
                      "measured": result["measured"].get(m)} for m in metrics])  # fmt: skip
st.plotly_chart(charts.predicted_vs_measured_figure(rows), width="stretch", key="validate_chart")
st.dataframe(rows, hide_index=True, key="validate_table")
