"""Sensitivity page: run a sweep as a background job, follow it, and see every group's sensitivity.

Run sweep starts a worker process (`prunecore.jobs`) for the current settings; changing a setting
starts nothing. The worker outlives this tab, and any session with the same model, data and settings
finds it (the same job key) and follows it instead of starting another. The curves come from the run
store: the groups finished so far while it runs, all of them once it is done.
"""

import os

import streamlit as st

import prunecore as pc
from dashboard import charts, state

state.page("Sensitivity")
ws = state.workspace()
with st.expander("Sweep settings", expanded=False):
    c1, c2, c3 = st.columns(3)
    c1.selectbox("Criterion", pc.list_criteria(), key=state.CRITERION)
    c1.radio("Mode", ["exact", "estimate"], key=state.MODE, horizontal=True,
             help="estimate: a Taylor prediction of the loss curve, many times faster, less faithful")  # fmt: skip
    c2.multiselect("Levels", [round(0.05 * i, 2) for i in range(1, 20)], key=state.LEVELS)
    c2.multiselect("Metrics", pc.list_metrics(), key=state.METRICS)
    c3.number_input("BatchNorm re-estimation batches per point (0: off)", 0, 50, key=state.BN_BATCHES)
    c3.number_input("Calibration plans after the sweep (0: off)", 0, 200, key=state.CALIBRATE,
                    help="The sweep job then measures this many random plans, and each method's plans at a few "
                         "budgets, and fits a predictor of plans that knows damage compounds (prunecore.predict); "
                         "the Plan page predicts and allocates with it. About one minute for the sample ResNet-20.")
    c1.selectbox("Device", state.device_choices(), key=state.SWEEP_DEVICE,
                 help="where the sweep's points run; auto: CUDA when present, else the CPU")  # fmt: skip
    c2.number_input("Worker processes", 1, max(1, os.cpu_count() or 1), key=state.SWEEP_WORKERS,
                    help="measure groups in this many processes at once (each with its share of the CPU threads); "
                         "the points are the same as with one")  # fmt: skip
    c3.selectbox("Mixed precision", ["off", "bf16", "fp16"], key=state.SWEEP_AUTOCAST,
                 help="evaluate every point in bf16 or fp16 (fp16: CUDA only): faster on GPUs, and the numbers "
                      "change, so it is a sweep of its own")  # fmt: skip
    c3.checkbox("Channels-last", key=state.SWEEP_CHANNELS_LAST,
                help="evaluate convolutions on channels-last images and weights (exact mode): 1.35x faster for the "
                     "sample MobileNetV2 and 1.14x for ResNet-20 here, slower for some CNNs; the last digits can "
                     "differ, so it is a sweep of its own")  # fmt: skip

job, key = state.sweep_job(ws)
status = state.job_status(key)
state.sweep_panel(job, key, status)
with st.expander("Jobs: every session's sweeps in the run store", expanded=False), state.user_errors(stop=False):
    st.dataframe(state.jobs_table(key), hide_index=True, width="stretch", key="jobs_table")

frame = state.stored_curves(ws, key, status, partial=True)
if frame is None:
    state.sidebar()  # nothing draws after st.stop()
    st.stop()  # the panel above says what to do, or how far the sweep is
metrics = [m for m in pc.list_metrics() if m in frame.columns]
metric = st.selectbox("Metric", metrics, key="curve_metric")
groups = frame.group.nunique() - 1
if frame.attrs["complete"]:
    st.caption(f"Run `{frame.attrs['run_id']}`: {groups} groups; stored in the run store, so any session with "
               "these settings loads it at once.")  # fmt: skip
else:
    st.caption(f"Run `{frame.attrs['run_id']}` so far: {groups} of {len(ws.graph.prunable)} groups; the curves "
               "grow as the sweep stores groups.")  # fmt: skip
st.plotly_chart(charts.curves_figure(frame, metric), width="stretch", key="curves_chart")
st.plotly_chart(charts.heatmap_figure(frame, metric), width="stretch", key="heatmap_chart")
st.dataframe(frame, hide_index=True, width="stretch", key="curves_table")
st.download_button("Download curves (CSV)", frame.to_csv(index=False), file_name="curves.csv", mime="text/csv",
                   key="download_curves")  # fmt: skip
