"""Model page: choose the model and the data; see its size and its channel groups."""

import pandas as pd
import streamlit as st
import torchvision

import prunecore as pc
from dashboard import state

state.page("Model")
left, right = st.columns(2)
with left:
    source = st.radio("Model", ["Sample model", "torchvision architecture", "Factory function"], key="model_source",
                      horizontal=True)  # fmt: skip
    if source == "Sample model":
        names = pc.list_samples()
        current = st.session_state[state.MODEL_SPEC].removeprefix("sample:")
        name = st.selectbox("Sample", names, index=names.index(current) if current in names else 0, key="sample_name")
        spec = f"sample:{name}"
    elif source == "torchvision architecture":
        names = torchvision.models.list_models(module=torchvision.models)
        name = st.selectbox("Architecture", names, index=names.index("resnet18"), key="tv_name")
        spec = f"torchvision:{name}"
        limit = st.get_option("server.maxUploadSize")
        upload = st.file_uploader("Weights (a state_dict, loaded with weights_only=True)", type=["pt", "pth"],
                                  key="weights_uploader",
                                  help=f"A torch.save'd state_dict, up to {limit:,} MB (Streamlit's "
                                       "server.maxUploadSize); no pickled code is run.")  # fmt: skip
        st.session_state[state.WEIGHTS] = upload.getvalue() if upload is not None else None
    elif state.factory_enabled():
        spec = st.text_input("Factory: imports the module and runs the function, on this machine",
                             "torchvision.models:resnet18", key="factory_spec",
                             help="package.module:function. The dashboard imports package.module and calls "
                                  "function() in its own process, on the machine it runs on, with its user's "
                                  "permissions; it must return an nn.Module. Name only code you trust.")  # fmt: skip
    else:  # never read a spec from a box that is not offered
        st.info(state.FACTORY_DISABLED)
        st.stop()
    shape_text = st.text_input("Input shape (blank: the model's own)", key="input_shape_text",
                               help="e.g. 1,3,224,224")  # fmt: skip
with right:
    data_source = st.radio("Data", ["Sample held-out digits", "Image folder"], key="data_source", horizontal=True)
    if data_source == "Image folder":
        folder = st.text_input("Folder (class subfolders: labelled; flat: unlabelled, label-free metrics)",
                               key="data_folder")  # fmt: skip
        data_spec = f"imagefolder:{folder}" if folder else "sample"
    else:
        data_spec = "sample"
    st.number_input("Use at most N images (0: all)", min_value=0, step=100, key=state.DATA_LIMIT)

if source != "torchvision architecture":
    st.session_state[state.WEIGHTS] = None
with state.user_errors():
    st.session_state[state.INPUT_SHAPE] = state.parse_shape(shape_text)
if spec != st.session_state[state.MODEL_SPEC] or data_spec != st.session_state[state.DATA_SPEC]:
    st.session_state[state.MODEL_SPEC], st.session_state[state.DATA_SPEC] = spec, data_spec
    st.session_state.pop(state.ALLOCATED, None)

ws = state.workspace()
c1, c2, c3, c4 = st.columns(4)
c1.metric("Parameters", f"{ws.cost.params:,}")
c2.metric("MACs per example", f"{ws.cost.flops:,}")
c3.metric("Channel groups", len(ws.graph.groups))
c4.metric("Prunable", len(ws.graph.prunable))
st.caption(f"Data: {state.data(ws).description}")  # loaded (and checked) here, cached for the other pages

st.subheader("Channel groups")
st.dataframe(
    pd.DataFrame([{
        "group": g.name, "channels": g.channels or g.size, "units": g.size, "producers": ", ".join(g.producers),
        "members": len(g.members), "share of FLOPs": ws.flop_shares.get(g.name),
        "prunable": "yes" if g.prunable else f"no: {g.reason}",
    } for g in ws.graph.groups]),  # fmt: skip
    column_config={"share of FLOPs": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1)},
    hide_index=True, width="stretch", key="groups_table",
)  # fmt: skip
