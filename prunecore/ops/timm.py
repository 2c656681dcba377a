"""Handlers for timm, beyond the generic op rules; imported only when timm is installed.

Most of timm needs nothing here: norm-act layers, `Conv2dSame`, squeeze-excitation gates, layer
scales and MetaFormer blocks are followed op by op through the functionals they call. What needs
knowledge is what the ops alone cannot say:

- `timm.layers.Attention` (ViT, DeiT and most plain vision transformers): its forward reshapes
  the fused qkv output by the constants `num_heads` / `head_dim` / `attn_dim`. Followed whole,
  a unit is one head (its q, k, v rows and its `proj` columns), and `num_heads` / `attn_dim` are
  re-derived from the sliced `qkv` after removal, so the module's own forward runs pruned.
- `BlurPool2d` (TResNet, anti-aliased models) runs a depthwise conv with `groups=self.channels`,
  re-derived from its filter after slicing.
- MetaFormer (PoolFormer, ConvFormer, CAFormer): the layer scales view their parameter to the
  constant `shape`, re-derived after slicing.
- Attention that reshapes its heads back to the *input* width (`x.reshape(B, N, C)` with `C` read
  from the input: MetaFormer, BEiT, EVA, DaViT): the inner width must stay equal to the model width,
  so heads are tied to the width channels at their positions (`tied_attention`). BEiT's and EVA's
  heads also own their q/k/v bias rows and bias-table columns.
- PVT-v2's spatial-reduction attention: the reduction conv and its LayerNorm run at the model width
  and the heads are tied to it, as above.
- Weight-standardised convs (`StdConv2d`, `ScaledStdConv2d`: NFNet, BiT): the standardisation
  runs over each filter's input channels, so removing input channels would change the kept
  weights; their output channels (and `gain`) can go, their inputs stay.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import Attention, BlurPool2d
from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from timm.models import beit, davit, eva, metaformer, pvt_v2
from torch import nn

from prunecore._labels import along
from prunecore._rules import Call, Label, conv, unsupported
from prunecore.ops.handler import FlopTerm, Handler, arg

_STD_CONVS = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)


def attention(c: Call) -> Label:
    """timm's fused-qkv attention: heads go whole, the model width through `qkv` columns and `proj` rows."""
    m, x = c.module, c.args[0]
    mask = c.arg(1, "attn_mask")
    plain = m.gate is None and isinstance(m.norm, nn.Identity) and mask is None
    if not plain or m.qkv.in_features != x.shape[-1]:
        return unsupported(c)
    return _fused_qkv(c, m.head_dim)


def _fused_qkv(c: Call, head_dim: int) -> Label:
    """Heads of a fused (3 * heads * head_dim, width) `qkv` and its `proj`; the output label."""
    m, name, st = c.module, c.name, c.st
    x, lab = c.args[0], c.labels[0]
    qkv, proj = f"{name}.qkv", f"{name}.proj"
    heads = st.origin(name, m.num_heads, names_group=True)
    per_head = heads.repeat_interleave(head_dim)  # (heads * head_dim,): rows of one of q, k, v
    st.record((qkv, "weight", 1), st.channel_vector(lab, x.dim() - 1, x.shape[-1], c.where))
    st.record((qkv, "weight", 0), per_head.repeat(3), output=True)  # (3 * attn_dim,): q | k | v
    if m.qkv.bias is not None:
        st.record((qkv, "bias", 0), per_head.repeat(3))
    ids_out = st.origin(proj, m.proj.out_features)
    st.record((proj, "weight", 1), per_head)
    st.record((proj, "weight", 0), ids_out, output=True)
    if m.proj.bias is not None:
        st.record((proj, "bias", 0), ids_out)
    return along(ids_out, c.out.dim() - 1, c.out.dim())


def _tie_width_to_heads(c: Call, head_dim: int) -> None:
    """Input channel i goes with inner position i: the forward reshapes the heads to the input width."""
    x = c.args[0]
    ids_in = c.st.channel_vector(c.labels[0], x.dim() - 1, x.shape[-1], c.where)
    per_head = c.st.origin(c.name, c.module.num_heads).repeat_interleave(head_dim)
    c.st.unify(ids_in, per_head, f"is the width {c.where} reshapes its heads back to")


def tied_attention(c: Call) -> Label:
    """Fused-qkv attention whose output is reshaped to the input width (MetaFormer, BEiT, EVA, DaViT).

    Heads own their rows of `qkv` (and of `q_bias`/`k_bias`/`v_bias`), their `proj` columns and
    (BEiT) their column of the relative-position-bias table; they are tied to the width channels
    at their positions, as in MetaFormer. q/k norms and rotary embeddings act inside a head and
    stay; so does DaViT's channel attention, which attends within each head.
    """
    m, x = c.module, c.args[0]
    extra = [v for k, v in c.kwargs.items() if k in ("attn_mask", "shared_rel_pos_bias")] + list(c.args[2:])
    plain = m.qkv is not None and isinstance(getattr(m, "norm", nn.Identity()), nn.Identity)
    if not plain or getattr(m, "gate", None) is not None or any(v is not None for v in extra):
        return unsupported(c)
    head_dim = _head_dim(m)
    if m.qkv.weight.shape[0] != 3 * x.shape[-1] or m.num_heads * head_dim != x.shape[-1]:
        return unsupported(c)
    label = _fused_qkv(c, head_dim)
    per_head = c.st.origin(c.name, m.num_heads).repeat_interleave(head_dim)
    for bias in ("q_bias", "k_bias", "v_bias"):
        if isinstance(getattr(m, bias, None), torch.Tensor):  # k_bias is a zero buffer
            c.st.record((c.name, bias, 0), per_head)
    if isinstance(getattr(m, "relative_position_bias_table", None), nn.Parameter):
        c.st.record((c.name, "relative_position_bias_table", 1), c.st.origin(c.name, m.num_heads))
    _tie_width_to_heads(c, head_dim)
    return label


def pvt_attention(c: Call) -> Label:
    """PVT-v2's spatial-reduction attention: q, kv and proj by heads, the reduction conv at full width.

    Its forward reshapes the reduced map and the heads back to the input width `C`, so the
    reduction conv's channels and the heads are tied to the width channels at their positions;
    the reduction's LayerNorm then normalises over the kept width (a masked norm in mask mode).
    """
    m, name, st = c.module, c.name, c.st
    x, lab = c.args[0], c.labels[0]
    width = x.shape[-1]
    if m.num_heads * m.head_dim != width or m.kv.out_features != 2 * width or m.q.out_features != width:
        return unsupported(c)
    ids = st.channel_vector(lab, x.dim() - 1, width, c.where)  # (width,): also the ids of every inner position
    heads = st.origin(name, m.num_heads, names_group=True)
    st.unify(ids, heads.repeat_interleave(m.head_dim), f"is the width {c.where} reshapes its heads back to")
    for linear, rows in (("q", ids), ("kv", ids.repeat(2)), ("proj", None)):
        layer = getattr(m, linear)
        out = rows if rows is not None else st.origin(f"{name}.proj", layer.out_features)
        st.record((f"{name}.{linear}", "weight", 1), ids)
        st.record((f"{name}.{linear}", "weight", 0), out, output=True)
        if layer.bias is not None:
            st.record((f"{name}.{linear}", "bias", 0), out)
    if m.sr is not None:
        st.record((f"{name}.sr", "weight", 1), ids)
        st.record((f"{name}.sr", "weight", 0), ids, output=True)
        if m.sr.bias is not None:
            st.record((f"{name}.sr", "bias", 0), ids)
        for tensor in ("weight", "bias"):
            if getattr(m.norm, tensor, None) is not None:
                st.record((f"{name}.norm", tensor, 0), ids)
        st.norm_dims[f"{name}.norm"] = -1  # (B, tokens, width)
    proj_out = st.origin(f"{name}.proj", m.proj.out_features)
    return along(proj_out, c.out.dim() - 1, c.out.dim())


def _head_dim(m: nn.Module) -> int:
    """EVA keeps `head_dim`; BEiT only its scale, head_dim ** -0.5."""
    return int(m.head_dim) if hasattr(m, "head_dim") else round(m.scale ** -2)


def std_conv(c: Call) -> Label:
    """A weight-standardised conv: output channels and `gain` go, input channels stay."""
    m = c.module
    c.st.block(c.labels[0], f"enters {c.where}, whose weight standardisation runs over its input channels")
    label = conv(c)
    if isinstance(getattr(m, "gain", None), nn.Parameter):
        c.st.record((c.name, "gain", 0), label.reshape(-1))  # the conv's output ids (grouped convs too)
    return label


def _fix_attention(m: Attention) -> None:
    m.num_heads = m.qkv.weight.shape[0] // (3 * m.head_dim)
    m.attn_dim = m.num_heads * m.head_dim


def _fix_blur_pool(m: BlurPool2d) -> None:
    if m.channels is not None:
        m.channels = m.filt.shape[0]


def _fix_metaformer_scale(m: metaformer.Scale) -> None:
    m.shape = (m.scale.shape[0],) + tuple(m.shape[1:])  # the layer scale's view shape, (dim, 1, 1) or (dim,)


def _fix_tied_attention(m: nn.Module) -> None:
    m.num_heads = m.qkv.weight.shape[0] // (3 * _head_dim(m))
    if hasattr(m, "dim"):  # DaViT
        m.dim = m.qkv.weight.shape[1]
    if hasattr(m, "attention_dim"):  # MetaFormer
        m.attention_dim = m.num_heads * _head_dim(m)


def _fix_pvt_attention(m: pvt_v2.Attention) -> None:
    m.dim = m.q.weight.shape[0]
    m.num_heads = m.dim // m.head_dim


def _attention_flops(module: Attention, args: tuple, kwargs: dict, out: Any) -> list[FlopTerm]:
    """`qkv` and `proj` run as modules; add Q K^T and attn V over every pair of tokens."""
    x = arg(args, kwargs, 0, "x")  # (B, N, C)
    pairs = x.shape[0] * x.shape[1] ** 2  # B*N*N
    return [
        FlopTerm("", "qkv", "weight", (0,), pairs, part=(0, 3)),  # Q K^T: N*N*attn_dim per example
        FlopTerm("", "proj", "weight", (1,), pairs),  # attn V
    ]


HANDLERS: list[Handler] = [
    Handler((Attention,), rule=attention, fix=_fix_attention, flops=_attention_flops, constants=True),
    Handler((metaformer.Attention,), rule=tied_attention, fix=_fix_tied_attention, flops=_attention_flops,
            constants=True),  # fmt: skip
    Handler((metaformer.Scale,), fix=_fix_metaformer_scale, constants=True),
    Handler((pvt_v2.Attention,), rule=pvt_attention, fix=_fix_pvt_attention, constants=True),
    Handler((beit.Attention, eva.EvaAttention), rule=tied_attention, fix=_fix_tied_attention,
            flops=_attention_flops, constants=True),  # fmt: skip
    # not NesT's attention: it lays its output out head-minor (`permute(0, 2, 3, 4, 1)`), so `proj` sees d * H + h
    Handler((davit.WindowAttention, davit.ChannelAttention), rule=tied_attention,
            fix=_fix_tied_attention, constants=True),  # fmt: skip
    Handler(_STD_CONVS, rule=std_conv),
    # a depthwise blur whose group count is the attribute `channels`
    Handler((BlurPool2d,), fix=_fix_blur_pool, constants=True),
]
