"""Sensitivity page: run or load a sweep; curves, heatmap and table of every group's sensitivity."""

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
if not st.session_state[state.LEVELS] or not st.session_state[state.METRICS]:
    st.warning("Choose at least one level and one metric.")
    st.stop()

frame = state.curves(ws)
metrics = [m for m in pc.list_metrics() if m in frame.columns]
metric = st.selectbox("Metric", metrics, key="curve_metric")
st.caption(f"Run `{frame.attrs.get('run_id', '')}`: {frame.group.nunique() - 1} groups; stored in the run store, "
           "so the next start loads it at once.")  # fmt: skip
st.plotly_chart(charts.curves_figure(frame, metric), width="stretch", key="curves_chart")
st.plotly_chart(charts.heatmap_figure(frame, metric), width="stretch", key="heatmap_chart")
st.dataframe(frame, hide_index=True, width="stretch", key="curves_table")
st.download_button("Download curves (CSV)", frame.to_csv(index=False), file_name="curves.csv", mime="text/csv",
                   key="download_curves")  # fmt: skip
