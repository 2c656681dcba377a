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
  constant `shape`, re-derived after slicing; the attention reshapes its output to the input width,
  so heads are tied to the width channels at their positions.
- Weight-standardised convs (`StdConv2d`, `ScaledStdConv2d`: NFNet, BiT): the standardisation
  runs over each filter's input channels, so removing input channels would change the kept
  weights; their output channels (and `gain`) can go, their inputs stay.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from timm.layers import Attention, BlurPool2d
from timm.models import metaformer
from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

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


def metaformer_attention(c: Call) -> Label:
    """MetaFormer's (CAFormer's) attention: like timm's, but its output is reshaped to the *input* width.

    `x.transpose(1, 2).reshape(B, N, C)` with `C` read from the input only works while the inner
    width equals the model width, so input channel i is tied to inner position i: heads go whole
    together with the model-width channels at their positions, in every block of the stage.
    """
    m, x = c.module, c.args[0]
    if m.qkv.weight.shape[0] != 3 * x.shape[-1]:
        return unsupported(c)
    label = _fused_qkv(c, m.head_dim)
    ids_in = c.st.channel_vector(c.labels[0], x.dim() - 1, x.shape[-1], c.where)
    heads = c.st.origin(c.name, m.num_heads)
    c.st.unify(ids_in, heads.repeat_interleave(m.head_dim), f"is the width {c.where} reshapes its heads back to")
    return label


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


def _fix_metaformer_attention(m: metaformer.Attention) -> None:
    m.num_heads = m.qkv.weight.shape[0] // (3 * m.head_dim)
    m.attention_dim = m.num_heads * m.head_dim


def _fix_metaformer_scale(m: metaformer.Scale) -> None:
    m.shape = (m.scale.shape[0],) + tuple(m.shape[1:])  # the layer scale's view shape, (dim, 1, 1) or (dim,)


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
    Handler((metaformer.Attention,), rule=metaformer_attention, fix=_fix_metaformer_attention,
            flops=_attention_flops, constants=True),  # fmt: skip
    Handler((metaformer.Scale,), fix=_fix_metaformer_scale, constants=True),
    Handler(_STD_CONVS, rule=std_conv),
    # a depthwise blur whose group count is the attribute `channels`
    Handler((BlurPool2d,), fix=_fix_blur_pool, constants=True),
]
