"""Validate page: measure the edited plan in a background job, next to its prediction.

The measurement (`prunecore.measure.measure_plan`: apply, re-estimate BatchNorm, evaluate both
models, count, time both in alternating rounds) runs in a worker process (`state.measure_panel`),
so the page stays responsive and the job outlives the tab. Its result is stored by the plan's kept
units: coming back to a plan measured before, from any session, shows it at once. When the Recover
page has fine-tuned this plan with its current settings, the recovered metrics show beside the one-shot ones.
With "Also INT8", the job also exports the pruned model to ONNX and quantises it, and a table compares
dense, pruned and pruned + INT8 (`charts.deployment_rows`).
"""

import math

import pandas as pd
import streamlit as st

from dashboard import charts, state
from prunecore.cost import format_latency
from prunecore.evaluate import get_metric

state.page("Validate")
plan = state.edited_plan()
ws = state.workspace()
data = state.data(ws)
v1, v2 = st.columns([3, 1])
bn = v1.number_input("BatchNorm re-estimation batches (0: off)", 0, 200, 50, key="validate_bn", help=state.BN_HELP)
device = v2.selectbox("Device", state.device_choices(), key="validate_device",
                      help="where the metrics are measured; auto: CUDA when present, else the CPU. Latency is "
                           "timed on the CPU.")  # fmt: skip
int8 = st.checkbox("Also INT8 (ONNX Runtime)", value=False, key="validate_int8",
                   help="Also exports the pruned model to ONNX, quantises it to INT8 (static, calibrated on the "
                        "calibration images; dynamic for language models) and measures and times it in ONNX Runtime "
                        "beside the dense and pruned models. Needs onnx, onnxscript and onnxruntime.")  # fmt: skip
st.caption(f"Measured on {data.description}; BatchNorm statistics re-estimated on its calibration images.")

job, key = state.measure_job(ws, plan, bn, int8, device)
measured = state.measure_panel(job, key, state.job_status(key))
if measured is None:
    state.sidebar()
    st.stop()
st.session_state[state.VALIDATION] = {"key": (state.plan_key(plan), bn), "measurement": measured}
c1, c2, c3 = st.columns(3)
c1.metric("Params kept", f"{measured.params / measured.dense_params:.1%}",
          help=f"{measured.params:,} of {measured.dense_params:,}")  # fmt: skip
c2.metric("FLOPs kept", f"{measured.flops / measured.dense_flops:.1%}",
          help=f"{measured.flops:,} of {measured.dense_flops:,} MACs")  # fmt: skip
dense_t, pruned_t = measured.latency
speed = measured.speedup_text()  # "1.44x faster (median of 7 rounds, ...)": the ratio on the card
c3.metric("CPU latency", format_latency(pruned_t), delta=speed.split(" (")[0].split(":")[0], delta_color="off",
          help=f"{speed}. Dense model: {format_latency(dense_t)}. Timed in the measurement's worker process.")
metrics = list(measured.metrics)
rows = pd.DataFrame([{"metric": m, "dense": measured.dense.get(m), "predicted": plan.predicted.get(m),
                      "measured": measured.metrics.get(m)} for m in metrics])  # fmt: skip
recovery = state.recovered(ws, plan)
if recovery is not None:
    name = charts.recovery_metric(recovery)
    one_shot, after = measured.metrics.get(name, math.nan), recovery.metrics[name]
    r1, r2, _ = st.columns(3)
    r1.metric(f"One-shot {name}", charts.format_metric(name, one_shot),
              help=f"Measured above: the plan applied, BatchNorm re-estimated on {bn} batches, no training.")
    gap = after - one_shot
    r2.metric(f"Recovered {name}", charts.format_metric(name, after),
              delta=None if math.isnan(gap) else charts.format_delta(name, gap), delta_description="vs one-shot",
              delta_color="normal" if get_metric(name).higher_is_better else "inverse",
              help=f"Fine-tuned for {len(recovery.history)} epoch(s) on {recovery.train}, measured on "
                   f"{recovery.data}.")  # fmt: skip
    st.caption(f"Recovered: this plan fine-tuned on the Recover page ({len(recovery.history)} epoch(s)); download "
               "the recovered model on the Export page.")  # fmt: skip
    rows["recovered"] = [recovery.metrics.get(m) for m in metrics]
st.plotly_chart(charts.predicted_vs_measured_figure(rows), width="stretch", key="validate_chart")
st.dataframe(rows, hide_index=True, key="validate_table")
if measured.int8 is not None:
    st.subheader("Dense, pruned and pruned + INT8")
    st.dataframe(charts.deployment_rows(measured), hide_index=True, key="validate_int8_table")
    st.caption(f"INT8: {measured.int8.mode}; the float ONNX export equals PyTorch within "
               f"{measured.int8.max_abs_diff:.1e}. All three timed in the same interleaved rounds.")  # fmt: skip
elif measured.int8_error:
    st.warning(f"INT8 was not measured: {measured.int8_error}")
