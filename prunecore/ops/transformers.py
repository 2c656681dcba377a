"""Handlers for HuggingFace `transformers`; consulted only once `transformers` has been imported.

Most of a transformers model needs nothing here. Its attention modules view their projections
as `(*, -1, head_dim)` and call `F.scaled_dot_product_attention` (or the eager matmuls), which the
generic rules follow: whole heads (q, k, v rows, output-projection columns) form one group, and
with grouped-query attention a key/value head goes with the query heads it serves (one KV group).
Rotary embeddings act inside a head, so the head dim is never cut. What needs knowledge:

- GPT-2's `Conv1D`: a Linear whose weight is stored (in, out).
- Attention modules keep their head count in attributes (`num_heads`, `n_heads`, `split_size`,
  `inner_dim`, ...) that `fix` re-derives from the sliced query projection, so that the pruned
  module describes itself and GPT-2's `split(self.split_size)` follows pruned heads.
- Swin's relative position bias table has a column per head, cut with its head.
- RMSNorm (Llama, Mistral, Qwen2, Qwen3, Gemma, T5) computes its statistics in the forward; followed whole, the
  model width goes through it like through a LayerNorm (statistics over the kept channels).
- The model's `config`: `fix` on the `PreTrainedModel` writes the pruned sizes (heads, KV heads,
  head dim, MLP width) where the architecture's config can state them, so `save_pretrained` →
  `from_pretrained` rebuilds the pruned model. Where it cannot (sizes that differ between layers,
  or BERT-style configs that derive the head size from `hidden_size / num_attention_heads`), the
  reasons go in `config.prunecore_unstated` and `prunecore.save_pretrained` refuses the model.

Classes are named by import path and looked up only in modules already imported, so importing
prunecore never imports transformers' model code.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunecore._labels import along
from prunecore._rules import Call, Label, rms_norm
from prunecore.ops.handler import FlopTerm, Handler, arg

UNSTATED = "prunecore_unstated"  # config attribute: why the config cannot state the pruned sizes


@dataclass(frozen=True)
class Attention:
    """Where one attention class keeps its heads.

    `query` is the projection whose rows are `copies * heads * head_dim` (GPT-2 fuses q | k | v,
    so 3); `key` the key projection when it has its own head count (grouped-query attention).
    `heads_attrs` hold the head count, `inner_attrs` heads * head_dim.
    """

    query: str
    head_dim: str  # the attribute holding the head size (never cut)
    key: str | None = None
    copies: int = 1
    heads_attrs: tuple[str, ...] = ()
    inner_attrs: tuple[str, ...] = ()

    def head_size(self, m: nn.Module) -> int:
        return int(getattr(m, self.head_dim))

    def heads(self, m: nn.Module) -> int:
        return _out_features(m.get_submodule(self.query)) // (self.copies * self.head_size(m))

    def kv_heads(self, m: nn.Module) -> int | None:
        return None if self.key is None else _out_features(m.get_submodule(self.key)) // self.head_size(m)


@dataclass(frozen=True)
class ConfigKeys:
    """The config attributes one architecture builds its sizes from (None: it cannot state that size).

    `head_dim` None means the architecture derives the head size as hidden_size / heads, so a
    pruned head count is stated only if that quotient stays the head size.
    """

    heads: str | None
    mlp: str | None
    head_dim: str | None = None
    kv_heads: str | None = None
    width_too: tuple[str, ...] = ()  # other sizes that equal hidden_size in the dense model and follow it


_LLAMA = Attention("q_proj", "head_dim", key="k_proj")
ATTENTION: dict[str, Attention] = {
    "transformers.models.bert.modeling_bert.BertSelfAttention": Attention(
        "query", "attention_head_size", heads_attrs=("num_attention_heads",), inner_attrs=("all_head_size",)),
    "transformers.models.roberta.modeling_roberta.RobertaSelfAttention": Attention(
        "query", "attention_head_size", heads_attrs=("num_attention_heads",), inner_attrs=("all_head_size",)),
    "transformers.models.distilbert.modeling_distilbert.DistilBertSelfAttention": Attention(
        "q_lin", "attention_head_size", heads_attrs=("n_heads",)),
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention": Attention(
        "c_attn", "head_dim", copies=3, heads_attrs=("num_heads",), inner_attrs=("split_size",)),
    "transformers.models.t5.modeling_t5.T5Attention": Attention(
        "q", "key_value_proj_dim", heads_attrs=("n_heads",), inner_attrs=("inner_dim",)),
    "transformers.models.vit.modeling_vit.ViTAttention": Attention(
        "q_proj", "head_dim", heads_attrs=("num_attention_heads",)),
    "transformers.models.clip.modeling_clip.CLIPAttention": Attention("q_proj", "head_dim", heads_attrs=("num_heads",)),
    "transformers.models.swin.modeling_swin.SwinAttention": Attention(
        "q_proj", "head_dim", heads_attrs=("num_attention_heads",)),
    "transformers.models.llama.modeling_llama.LlamaAttention": _LLAMA,
    "transformers.models.mistral.modeling_mistral.MistralAttention": _LLAMA,
    "transformers.models.qwen2.modeling_qwen2.Qwen2Attention": _LLAMA,
    "transformers.models.qwen3.modeling_qwen3.Qwen3Attention": _LLAMA,
    "transformers.models.gemma.modeling_gemma.GemmaAttention": _LLAMA,
    "transformers.models.opt.modeling_opt.OPTAttention": Attention("q_proj", "head_dim", heads_attrs=("num_heads",)),
}  # fmt: skip

MLP: dict[str, str] = {  # MLP class -> its projection whose outputs are the neurons
    "transformers.models.bert.modeling_bert.BertIntermediate": "dense",
    "transformers.models.roberta.modeling_roberta.RobertaIntermediate": "dense",
    "transformers.models.distilbert.modeling_distilbert.FFN": "lin1",
    "transformers.models.gpt2.modeling_gpt2.GPT2MLP": "c_fc",
    "transformers.models.t5.modeling_t5.T5DenseActDense": "wi",
    "transformers.models.t5.modeling_t5.T5DenseGatedActDense": "wi_0",
    "transformers.models.vit.modeling_vit.ViTMLP": "fc1",
    "transformers.models.clip.modeling_clip.CLIPMLP": "fc1",
    "transformers.models.swin.modeling_swin.SwinMLP": "fc1",
    "transformers.models.llama.modeling_llama.LlamaMLP": "up_proj",
    "transformers.models.mistral.modeling_mistral.MistralMLP": "up_proj",
    "transformers.models.qwen2.modeling_qwen2.Qwen2MLP": "up_proj",
    "transformers.models.qwen3.modeling_qwen3.Qwen3MLP": "up_proj",
    "transformers.models.gemma.modeling_gemma.GemmaMLP": "up_proj",
    "transformers.models.opt.modeling_opt.OPTDecoderLayer": "fc1",  # OPT's MLP has no module of its own
}

NORMS = (  # RMSNorms with a weight per channel of the last dim (`_rules.rms_norm`)
    "transformers.models.llama.modeling_llama.LlamaRMSNorm",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
    "transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm",  # also q_norm / k_norm, over the head dim (never cut)
    "transformers.models.gemma.modeling_gemma.GemmaRMSNorm",  # x / rms * (1 + w): the weight is still per channel
    "transformers.models.t5.modeling_t5.T5LayerNorm",
)

_LLAMA_KEYS = ConfigKeys("num_attention_heads", "intermediate_size", head_dim="head_dim",
                         kv_heads="num_key_value_heads")  # fmt: skip
CONFIG: dict[str, ConfigKeys] = {  # config.model_type -> keys
    "bert": ConfigKeys("num_attention_heads", "intermediate_size"),
    "roberta": ConfigKeys("num_attention_heads", "intermediate_size"),
    "distilbert": ConfigKeys("n_heads", "hidden_dim"),
    "gpt2": ConfigKeys("n_head", "n_inner"),
    "t5": ConfigKeys("num_heads", "d_ff", head_dim="d_kv"),
    "vit": ConfigKeys("num_attention_heads", "intermediate_size", head_dim="head_dim"),
    "clip_vision_model": ConfigKeys("num_attention_heads", "intermediate_size"),
    "clip_text_model": ConfigKeys("num_attention_heads", "intermediate_size"),
    "swin": ConfigKeys(None, None),  # per-stage heads and an MLP ratio: nothing stated, the shape check refuses
    "llama": _LLAMA_KEYS,
    "mistral": _LLAMA_KEYS,
    "qwen2": _LLAMA_KEYS,
    "qwen3": _LLAMA_KEYS,
    "gemma": _LLAMA_KEYS,
    "opt": ConfigKeys("num_attention_heads", "ffn_dim", width_too=("word_embed_proj_dim",)),  # head size derived
}


def _out_features(layer: nn.Module) -> int:
    """Output width of a Linear or of GPT-2's Conv1D (weight stored (in, out))."""
    return layer.weight.shape[0] if isinstance(layer, nn.Linear) else layer.weight.shape[1]


def _in_features(layer: nn.Module) -> int:
    return layer.weight.shape[1] if isinstance(layer, nn.Linear) else layer.weight.shape[0]


def qualname(cls: type) -> str:
    """A class's import path, the key of the tables above."""
    return f"{cls.__module__}.{cls.__qualname__}"


# -- GPT-2's Conv1D ----------------------------------------------------------------------------------
def conv1d(c: Call) -> Label:
    """`Conv1D`: y = x @ W + b with W (in, out): a Linear with its weight transposed."""
    m, name, st = c.module, c.name, c.st
    x = c.args[0]
    ids_in = st.channel_vector(c.labels[0], x.dim() - 1, m.weight.shape[0], c.where)
    ids_out = st.origin(name, m.weight.shape[1])
    st.record((name, "weight", 0), ids_in)
    st.record((name, "weight", 1), ids_out, output=True)
    if m.bias is not None:
        st.record((name, "bias", 0), ids_out)
    return along(ids_out, c.out.dim() - 1, c.out.dim())


def _fix_conv1d(m: nn.Module) -> None:
    m.nx, m.nf = m.weight.shape


def _conv1d_flops(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> list[FlopTerm]:
    x = arg(args, kwargs, 0, "x")  # (*, nx)
    return [FlopTerm("", "", "weight", (0, 1), x.numel() // x.shape[-1])]


# -- attention ---------------------------------------------------------------------------------------
def _fix_attention(m: nn.Module) -> None:
    """Re-derive the head count attributes from the sliced query projection."""
    spec = ATTENTION[qualname(type(m))]
    heads = spec.heads(m)
    for attr in spec.heads_attrs:
        setattr(m, attr, heads)
    for attr in spec.inner_attrs:
        setattr(m, attr, heads * spec.head_size(m))


def swin_position_bias(c: Call) -> Label:
    """Swin's relative position bias, (1, heads, N, N): a column of the table per head."""
    table = c.module.relative_position_bias_table  # (positions, heads)
    heads = c.st.origin(c.name, table.shape[1])
    c.st.record((c.name, "relative_position_bias_table", 1), heads)
    return along(heads, 1, c.out.dim())


# -- the config ----------------------------------------------------------------------------------------
def _fix_config(model: nn.Module) -> None:
    """Write the sizes the pruned layers have into `model.config`, or say why the config cannot."""
    config = getattr(model, "config", None)
    keys = CONFIG.get(getattr(config, "model_type", ""))
    if keys is None:
        return
    heads, kv_heads, head_dims, mlp, widths = [], [], set(), [], set()
    scales = []  # Gemma scales embeddings by sqrt(hidden_size), fixed at construction
    for m in model.modules():
        if isinstance(getattr(m, "scalar_embed_scale", None), float):
            scales.append((type(m).__name__, m.scalar_embed_scale))
        name = qualname(type(m))
        if name in ATTENTION:
            spec = ATTENTION[name]
            widths.add(_in_features(m.get_submodule(spec.query)))
            heads.append(spec.heads(m))
            head_dims.add(spec.head_size(m))
            if spec.key is not None:
                kv_heads.append(spec.kv_heads(m))
        elif name in MLP:
            mlp.append(_out_features(m.get_submodule(MLP[name])))
    unstated: list[str] = []
    if len(widths) == 1 and keys.heads is not None:  # the width every attention reads: the model's
        width = widths.pop()
        for key in keys.width_too:  # (OPT's word_embed_proj_dim: no projection while it equals the width)
            if getattr(config, key, None) == config.hidden_size:
                setattr(config, key, width)
        config.hidden_size = width
    if heads:
        _state(config, keys.heads, "attention heads", heads, unstated)
        if kv_heads:
            _state(config, keys.kv_heads, "key/value heads", kv_heads, unstated)
        if keys.head_dim is not None and len(head_dims) == 1:
            setattr(config, keys.head_dim, head_dims.pop())
        elif keys.heads is not None and len(set(heads)) == 1 and not _derives_head_size(config, heads[0], head_dims):
            unstated.append(f"{type(config).__name__} derives the head size from hidden_size / "
                            f"{keys.heads}, which {heads[0]} heads of {sorted(head_dims)[0]} do not fit")  # fmt: skip
    if mlp:
        _state(config, keys.mlp, "MLP neurons", mlp, unstated)
    hidden = getattr(config, "hidden_size", None)
    if scales and hidden and not math.isclose(scales[0][1], hidden**0.5, rel_tol=1e-6):
        kind, scale = scales[0]
        unstated.append(f"{kind} scales by {scale:.6g}, the square root of the dense width, and a config of width "
                        f"{hidden} would rebuild it as {hidden**0.5:.6g}")  # fmt: skip
    if unstated:
        setattr(config, UNSTATED, unstated)
    elif hasattr(config, UNSTATED):
        delattr(config, UNSTATED)


def _state(config: Any, key: str | None, what: str, sizes: list[int], unstated: list[str]) -> None:
    """Set `key` to the one size every layer has; a config with no such field states nothing here (the
    shape check of `prunecore.save_pretrained` then refuses a pruned model of it)."""
    if key is None:
        return
    if len(set(sizes)) > 1:
        unstated.append(f"{what} differ between layers ({', '.join(map(str, sizes))}); a config states one count")
    else:
        setattr(config, key, sizes[0])


def _derives_head_size(config: Any, heads: int, head_dims: set[int]) -> bool:
    hidden = getattr(config, "hidden_size", None)
    return hidden is not None and len(head_dims) == 1 and heads * next(iter(head_dims)) == hidden


# -- the registry ------------------------------------------------------------------------------------
def _class(path: str) -> type | None:
    """The class at `path` if its module is already imported, else None (prunecore imports no model code)."""
    module, _, name = path.rpartition(".")
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


_PATHS = (*ATTENTION, *NORMS, "transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.PreTrainedModel",
          "transformers.models.swin.modeling_swin.SwinRelativePositionBias")  # fmt: skip
_MODULES = tuple(sorted({p.rpartition(".")[0] for p in _PATHS}))


def loaded() -> tuple[str, ...]:
    """The modules of the classes below that are imported: the key `handlers` is cached by.

    A handful of dict lookups, because the registry asks on every module lookup of a trace.
    """
    return tuple(m for m in _MODULES if m in sys.modules)


@functools.lru_cache(maxsize=32)
def handlers(modules: tuple[str, ...]) -> tuple[Handler, ...]:
    """The records for the classes of `modules` (`loaded()`)."""
    classes = {p: _class(p) for p in _PATHS if p.rpartition(".")[0] in modules}
    classes = {p: c for p, c in classes.items() if c is not None}
    out = []
    if "transformers.pytorch_utils.Conv1D" in classes:
        out.append(Handler((classes["transformers.pytorch_utils.Conv1D"],), rule=conv1d, fix=_fix_conv1d,
                           flops=_conv1d_flops))  # fmt: skip
    attention = tuple(classes[p] for p in ATTENTION if p in classes)
    if attention:
        out.append(Handler(attention, fix=_fix_attention, constants=True))
    norms = tuple(classes[p] for p in NORMS if p in classes)
    if norms:
        out.append(Handler(norms, rule=rms_norm, whole=True))
    bias = classes.get("transformers.models.swin.modeling_swin.SwinRelativePositionBias")
    if bias is not None:
        out.append(Handler((bias,), rule=swin_position_bias))
    if "transformers.modeling_utils.PreTrainedModel" in classes:
        out.append(Handler((classes["transformers.modeling_utils.PreTrainedModel"],), fix=_fix_config))
    return tuple(out)
