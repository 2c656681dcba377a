"""Recover page: fine-tune the edited plan's pruned model in a background job, with a live curve.

One-shot pruning loses accuracy that a few epochs of training win back. The job
(`prunecore.jobs.FinetuneJob`: apply the plan, re-estimate BatchNorm, `prunecore.recover.finetune`)
runs in a worker process that checkpoints every epoch, so Cancel keeps the finished epochs and
Resume continues from them. Nothing starts until Run is pressed. The result is stored by plan and
settings, so Validate and Export (of any session) find the recovered model.
"""

from pathlib import Path

import streamlit as st

from dashboard import charts, state
from prunecore.evaluate import get_metric

state.page("Recover")
plan = state.edited_plan()
ws = state.workspace()
data = state.data(ws)
c1, c2, c3, c4 = st.columns(4, vertical_alignment="bottom")
c1.number_input("Epochs", 1, 100, step=1, key=state.FT_EPOCHS)
c2.select_slider("Learning rate", state.LR_CHOICES, format_func="{:g}".format, key=state.FT_LR,
                 help="SGD with Nesterov momentum, decayed by one cosine to 0 over all steps.")  # fmt: skip
c3.toggle("Distil from the dense model", key=state.FT_DISTILL_ON,
          help="The dense model teaches the pruned one (KL on softened outputs, temperature 4) besides the labels; "
               "off: labels only.")  # fmt: skip
c4.slider("Distillation weight", 0.1, 1.0, step=0.1, key=state.FT_DISTILL,
          disabled=not st.session_state[state.FT_DISTILL_ON],
          help="The share of distillation in the loss; 1.0: distillation only, the labels unused.")  # fmt: skip
with st.expander("More settings"):
    e1, e2, e3 = st.columns(3)
    e1.number_input("BatchNorm re-estimation batches before training (0: off)", 0, 200, key=state.FT_BN,
                    help=state.BN_HELP)  # fmt: skip
    e2.number_input("Training images (0: all)", 0, None, step=100, key=state.FT_TRAIN_LIMIT,
                    help="Train on the first N images of the training data only: a quick try.")  # fmt: skip
    e3.selectbox("Device", state.device_choices(), key=state.FT_DEVICE,
                 help="where it trains and is measured; auto: CUDA when present, else the CPU")  # fmt: skip
if not data.labelled and not st.session_state[state.FT_DISTILL_ON]:
    st.warning("This data has no labels: only distillation from the dense model can train on it. Turn it on.")
    st.stop()
limit = st.session_state[state.FT_TRAIN_LIMIT]
st.caption(f"Trains on {state.train_note(st.session_state[state.DATA_SPEC])}" + (f", the first {limit:,}" if limit
           else "") + f"; the metrics after each epoch are measured on {data.description}.")  # fmt: skip

job, key = state.finetune_job(ws, plan)
recovery = state.finetune_panel(job, key, state.job_status(key))
if recovery is None:
    state.sidebar()
    st.stop()
name = charts.recovery_metric(recovery)
before, after = recovery.before[name], recovery.metrics[name]
cards = st.columns(3)
cards[0].metric(f"Dense {name}", charts.format_metric(name, recovery.dense.get(name, float("nan"))))
cards[1].metric(f"One-shot {name}", charts.format_metric(name, before),
                help="The plan applied and BatchNorm re-estimated, before any training.")  # fmt: skip
cards[2].metric(f"Recovered {name}", charts.format_metric(name, after),
                delta=charts.format_delta(name, after - before), delta_description="vs one-shot",
                delta_color="normal" if get_metric(name).higher_is_better else "inverse",
                help=f"After {len(recovery.history)} epoch(s) of fine-tuning on {recovery.train}.")  # fmt: skip
st.plotly_chart(charts.recovery_figure(recovery, name), width="stretch", key="recover_chart")
# the file is read when the button is clicked, not on every rerun
st.download_button("Download the recovered model (.pt)", Path(recovery.model_file).read_bytes,
                   file_name="recovered.pt", mime="application/octet-stream", key="download_recovered",
                   type="primary")  # fmt: skip
st.caption("The pruned model after fine-tuning; its plan carries the last epoch's metrics. Load it with "
           "`model, plan = prunecore.load_pruned('recovered.pt')`.")
