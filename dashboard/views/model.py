"""Model page: choose the model and the data; see its size and its channel groups."""

import importlib.util

import pandas as pd
import streamlit as st
import torchvision

import prunecore as pc
from dashboard import state
from prunecore.models import canonical_spec, with_args

SAMPLE, TORCHVISION, TIMM, FACTORY = "Sample model", "torchvision architecture", "timm architecture", "Factory function"
HF = "HuggingFace folder"
DIGITS, FOLDER, RANDOM, TEXT = "Sample held-out data", "Image folder", "Random (label-free)", "Text file"
HAS_TIMM = importlib.util.find_spec("timm") is not None
HAS_HF = importlib.util.find_spec("transformers") is not None


def weights_uploader() -> None:
    """A state_dict upload: its bytes and its file name (what errors call it) go to session state."""
    limit = st.get_option("server.maxUploadSize")
    upload = st.file_uploader("Weights (a state_dict, loaded with weights_only=True)", type=["pt", "pth"],
                              key="weights_uploader",
                              help=f"A torch.save'd state_dict, up to {limit:,} MB (Streamlit's "
                                   "server.maxUploadSize); no pickled code is run.")  # fmt: skip
    st.session_state[state.WEIGHTS] = upload.getvalue() if upload is not None else None
    st.session_state[state.WEIGHTS_NAME] = upload.name if upload is not None else None


def constructor_args(library: str) -> tuple[dict[str, int | None], str]:
    """The architecture's constructor-argument fields (None: its default) and the other arguments typed."""
    blank = "Blank: the architecture's default."
    cols = st.columns(3 if library == "timm" else 1)
    fields = {"num_classes": cols[0].number_input("Classes (num_classes)", min_value=1, value=None, step=1,
                                                  key="arg_num_classes", help=blank)}  # fmt: skip
    if library == "timm":
        fields["in_chans"] = cols[1].number_input("Input channels (in_chans)", min_value=1, value=None, step=1,
                                                  key="arg_in_chans", help=blank)  # fmt: skip
        fields["img_size"] = cols[2].number_input("Image size (img_size)", min_value=1, value=None, step=1,
                                                  key="arg_img_size", help=f"{blank} Not every timm model takes it.")
    extra = st.text_input("Other constructor arguments", key="arg_extra", placeholder="drop_rate=0.1,global_pool='avg'",
                          help="name=value pairs, separated by commas. Values are plain data (numbers, strings, "
                               "True/False/None, tuples), never code. They become part of the model spec.")  # fmt: skip
    return fields, extra


def use_data(choice: str) -> None:
    st.session_state["data_source"] = choice  # a button callback: runs before the radio is drawn again


state.page("Model")
left, right = st.columns(2)
spec = None
with left:
    sources = [SAMPLE, TORCHVISION, *([TIMM] if HAS_TIMM else []), *([HF] if HAS_HF else []), FACTORY]
    source = st.radio("Model", sources, key="model_source", horizontal=True)
    if source == SAMPLE:
        names = pc.list_samples()
        current = st.session_state[state.MODEL_SPEC].removeprefix("sample:")
        name = st.selectbox("Sample", names, index=names.index(current) if current in names else 0, key="sample_name")
        spec = f"sample:{name}"
        st.session_state[state.WEIGHTS] = st.session_state[state.WEIGHTS_NAME] = None
    elif source in (TORCHVISION, TIMM):
        library = "torchvision" if source == TORCHVISION else "timm"
        if library == "timm":
            import timm

            names = timm.list_models()
        else:
            names = torchvision.models.list_models(module=torchvision.models)
        name = st.selectbox("Architecture", names, index=names.index("resnet18") if "resnet18" in names else 0,
                            key="tv_name" if library == "torchvision" else "timm_name")  # fmt: skip
        fields, extra = constructor_args(library)
        with state.user_errors(stop=False):
            spec = with_args(f"{library}:{name}({extra})", fields)
        weights_uploader()
    elif source == HF:
        path = st.text_input("Local model folder (config.json, model.safetensors, tokenizer.json) or config file",
                             key="hf_path", placeholder="/models/my-llama",
                             help="Nothing is downloaded and no code from the folder runs; weights are read "
                                  "only from safetensors. A config file alone builds the model with random "
                                  "weights.")  # fmt: skip
        task = st.selectbox("Model class", ["from the config", *pc.hf.TASKS], key="hf_task",
                            help="Which transformers class to build: the config's own `architectures` by default.")
        if not path.strip():
            st.info("Type the folder of a HuggingFace model.")
            st.stop()
        args = "" if task == "from the config" else f"(task={task!r})"
        with state.user_errors(stop=False):
            spec = canonical_spec(f"hf:{path.strip()}{args}")
    elif state.factory_enabled():
        typed = st.text_input("Factory: imports the module and runs the function, on this machine",
                              "torchvision.models:resnet18", key="factory_spec",
                              help="package.module:function, or package.module:function(name=value,...) to pass "
                                   "arguments (plain values only). The dashboard imports package.module and calls "
                                   "the function in its own process, on the machine it runs on, with its user's "
                                   "permissions; it must return an nn.Module. Name only code you trust.")  # fmt: skip
        with state.user_errors(stop=False):
            spec = canonical_spec(typed)
        weights_uploader()
    else:  # never read a spec from a box that is not offered
        st.info(state.FACTORY_DISABLED)
        st.stop()
    shape_text = st.text_input("Input shape (blank: the model's own)", key="input_shape_text",
                               help="e.g. 1,3,224,224")  # fmt: skip
with right:
    data_source = st.radio("Data", [DIGITS, FOLDER, RANDOM, TEXT], key="data_source", horizontal=True,
                           help="A language model (the tinylm sample, a HuggingFace decoder) reads the sample "
                                "text under the first choice, or a text file.")  # fmt: skip
    folder = text_file = ""
    if data_source == FOLDER:
        folder = st.text_input("Folder (class subfolders: labelled; flat: unlabelled, label-free metrics)",
                               key="data_folder")  # fmt: skip
    elif data_source == TEXT:
        text_file = st.text_input("Text file (.txt, or .jsonl with a \"text\" field per line)", key="text_file",
                                  help="Cut into blocks of the model's input length, tokenised with the model "
                                       "folder's tokenizer.json, or as UTF-8 bytes.")  # fmt: skip
    data_spec = (state.RANDOM_DATA if data_source == RANDOM else f"imagefolder:{folder}" if folder
                 else f"text:{text_file}" if text_file else "sample")  # fmt: skip
    st.number_input("Use at most N images or text blocks (0: all)", min_value=0, step=100, key=state.DATA_LIMIT)

if spec is None:  # the arguments could not be read: the error is shown above
    st.stop()
with state.user_errors():
    st.session_state[state.INPUT_SHAPE] = state.parse_shape(shape_text)
if spec != st.session_state[state.MODEL_SPEC] or data_spec != st.session_state[state.DATA_SPEC]:
    st.session_state[state.MODEL_SPEC], st.session_state[state.DATA_SPEC] = spec, data_spec
    st.session_state.pop(state.ALLOCATED, None)

ws = state.workspace()
if ws.example.dim() == 2 and st.session_state[state.METRICS] == state.DEFAULTS[state.METRICS]:
    st.session_state[state.METRICS] = ["perplexity", "loss", "accuracy"]  # a language model: per-token metrics
c1, c2, c3, c4 = st.columns(4)
c1.metric("Parameters", f"{ws.cost.params:,}")
c2.metric("MACs per example", f"{ws.cost.flops:,}")
c3.metric("Channel groups", len(ws.graph.groups))
c4.metric("Prunable", len(ws.graph.prunable))
problem = state.data_problem(data_spec, tuple(ws.example.shape))
if problem is not None and data_source == FOLDER and not folder:
    st.info("Type the folder of your images under Data; until then the data is the sample digits, which do not fit.")
elif problem is not None:
    st.warning(problem)
    b1, b2, _ = st.columns([1, 1, 2])
    b1.button("Use random label-free data", key="use_random_data", on_click=use_data, args=(RANDOM,))
    b2.button("Use an image folder", key="use_image_folder", on_click=use_data, args=(FOLDER,))
else:
    st.caption(f"Data: {state.data(ws).description}")  # loaded (and checked) here, cached for the other pages

st.subheader("Channel groups")
st.dataframe(
    pd.DataFrame([{
        "group": g.name, "channels": g.channels or g.size, "units": g.size,
        "producers": g.producers[0] + (f" (+{len(g.producers) - 1} more)" if len(g.producers) > 1 else ""),
        "members": len(g.members), "share of FLOPs": ws.flop_shares.get(g.name),
        "prunable": "yes" if g.prunable else f"no: {g.reason}",
    } for g in ws.graph.groups]),  # fmt: skip
    column_config={
        "group": st.column_config.TextColumn(width="medium"),
        "share of FLOPs": st.column_config.ProgressColumn(
            format="percent", min_value=0, max_value=1,
            help="MACs of the ops whose input or output channels are in the group. A conv belongs to the group "
                 "of its inputs and to that of its outputs, so shares add up to more than 100 %."),
        "prunable": st.column_config.TextColumn(width="large", help="Why a group stays: the full reasons are below"),
    },
    hide_index=True, width="stretch", key="groups_table",
)  # fmt: skip
fixed = [g for g in ws.graph.groups if not g.prunable]
if fixed:
    with st.expander(f"Why {len(fixed)} group{'s' if len(fixed) != 1 else ''} cannot be pruned"):
        st.markdown("\n".join(f"- **{g.name}** ({g.size} units): {g.reason}" for g in fixed))
