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
- Attention with heads in more places (`Heads` records, `heads_rule`): CaiT's talking heads
  (`proj_l` / `proj_w` mix heads) and class attention, XCiT's cross-covariance attention (a
  temperature per head), ConViT's gated positional attention (a gate and position projection per
  head), Swin-V2-CR's window attention (logit scale and position-bias MLP rows per head), Twins'
  window attention, VOLO's attention, outlook attention (`attn` predicts k^4 weights per head)
  and class attention, and NesT's, whose output lays heads out head-minor (`d * H + h`).
- PVT-v2's and Twins' spatial-reduction attention: the reduction conv and its LayerNorm run at the
  model width and the heads are tied to it, as above.
- GhostNet's `out[:, :out_chs]` of its primary | cheap concat takes every channel (a slice past the
  end is clamped), so it follows pruned channels; `out_chs` is re-derived.
- Weight-standardised convs (`StdConv2d`, `ScaledStdConv2d`: NFNet, BiT): the standardisation
  runs over each filter's input channels, so removing input channels would change the kept
  weights; their output channels (and `gain`) can go, their inputs stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from timm.layers import Attention, BlurPool2d
from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from timm.models import (
    beit, cait, convit, davit, eva, ghostnet, metaformer, nest, pvt_v2, swin_transformer_v2_cr, twins, volo, xcit,
)
from torch import nn

from prunecore._labels import along
from prunecore._rules import Call, Label, conv, tensor_operands, unsupported
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
    """PVT-v2's and Twins' spatial-reduction attention: q, kv and proj by heads, the reduction conv at full width.

    Its forward reshapes the reduced map and the heads back to the input width `C`, so the
    reduction conv's channels and the heads are tied to the width channels at their positions;
    the reduction's LayerNorm then normalises over the kept width (a masked norm in mask mode).
    """
    m, name, st = c.module, c.name, c.st
    x, lab = c.args[0], c.labels[0]
    width = x.shape[-1]
    if m.num_heads * _head_dim(m) != width or m.kv.out_features != 2 * width or m.q.out_features != width:
        return unsupported(c)
    ids = st.channel_vector(lab, x.dim() - 1, width, c.where)  # (width,): also the ids of every inner position
    heads = st.origin(name, m.num_heads, names_group=True)
    st.unify(ids, heads.repeat_interleave(_head_dim(m)), f"is the width {c.where} reshapes its heads back to")
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


@dataclass(frozen=True)
class Heads:
    """Where one attention class keeps its heads, for `heads_rule`, `heads_fix` and `heads_flops`.

    Most classes this describes reshape their heads back to the input width `C` (or split the
    width by `C // num_heads`), so heads are tied to the width channels at their positions: a
    width channel goes only with its whole head (`tied`). What differs between classes is where
    the rows of each head live, which this record names.
    """

    reads: tuple[tuple[str, int], ...]  # Linears on the width: (name, copies of the inner width in their rows)
    count: Callable[[nn.Module], int]  # num_heads of a (pruned) module, read from a sliced tensor
    per_head: tuple[tuple[str, int], ...] = ()  # other head-major tensors: (dotted path, dim)
    columns: tuple[str, ...] = ()  # Linears that read the width but whose rows are per head (`per_head`)
    proj: str = "proj"  # the Linear that reads the concatenated heads
    pairs: Callable[[nn.Module, tuple], int] | None = None  # (module, forward args) -> rows of Q K^T and attn V
    qk: bool = True  # False: no Q K^T product (VOLO's outlook attention predicts its weights)
    width_attrs: tuple[str, ...] = ()  # int attributes holding the width, re-derived
    head_minor: bool = False  # the output lays heads out d * H + h (NesT), not h * d + d_i
    tied: bool = True  # False: the forward reshapes by `num_heads * head_dim`, so heads go free of the width


def _all_pairs(m: nn.Module, args: tuple) -> int:
    """Every token attends to every token: x (B, N, C) or (B, H, W, C) -> B * N * N."""
    x = args[0]
    n = x.numel() // (x.shape[0] * x.shape[-1])
    return x.shape[0] * n * n


def _window_pairs(m: twins.LocallyGroupedAttn, args: tuple) -> int:
    """Each token of the padded map attends to the ws * ws tokens of its window."""
    x, (h, w) = args[0], args[1]
    padded = -(-h // m.ws) * m.ws * (-(-w // m.ws) * m.ws)
    return x.shape[0] * padded * m.ws**2


def _outlook_pairs(m: volo.OutlookAttention, args: tuple) -> int:
    """attn V: each of the (H / stride) * (W / stride) windows mixes k^2 values into k^2 outputs."""
    b, h, w, _ = args[0].shape
    return b * -(-h // m.stride) * -(-w // m.stride) * m.kernel_size**4


def _by_qkv(m: nn.Module) -> int:
    return m.qkv.weight.shape[0] // (3 * _head_dim(m))


HEADS: dict[type, Heads] = {
    cait.TalkingHeadAttn: Heads(  # heads also mix through proj_l / proj_w, Linear(heads, heads)
        reads=(("qkv", 3),), count=lambda m: m.proj_l.weight.shape[0], pairs=_all_pairs,
        per_head=(("proj_l.weight", 0), ("proj_l.weight", 1), ("proj_l.bias", 0),
                  ("proj_w.weight", 0), ("proj_w.weight", 1), ("proj_w.bias", 0)),
    ),
    cait.ClassAttn: Heads(  # the class token queries every token: B * N pairs
        reads=(("q", 1), ("k", 1), ("v", 1)), count=lambda m: m.q.weight.shape[0] // _head_dim(m),
        pairs=lambda m, args: args[0].shape[0] * args[0].shape[1],
    ),
    xcit.XCA: Heads(  # attention between the d channels of a head, over every token: B * N * d rows
        reads=(("qkv", 3),), count=lambda m: m.temperature.shape[0], per_head=(("temperature", 0),),
        pairs=lambda m, args: args[0].shape[0] * args[0].shape[1] * (args[0].shape[-1] // m.num_heads),
    ),
    convit.GPSA: Heads(  # gated positional attention: per-head position projection and gate
        reads=(("qk", 2), ("v", 1)), count=lambda m: m.gating_param.shape[0], pairs=_all_pairs,
        per_head=(("pos_proj.weight", 0), ("pos_proj.bias", 0), ("gating_param", 0)), width_attrs=("dim",),
    ),
    convit.MHSA: Heads(reads=(("qkv", 3),), count=_by_qkv, pairs=_all_pairs),
    swin_transformer_v2_cr.WindowMultiHeadAttention: Heads(  # per-head logit scale and position-bias MLP rows
        reads=(("qkv", 3),), count=lambda m: m.logit_scale.shape[0], pairs=_all_pairs, width_attrs=("in_features",),
        per_head=(("logit_scale", 0), ("meta_mlp.fc2.weight", 0), ("meta_mlp.fc2.bias", 0)),
    ),
    twins.LocallyGroupedAttn: Heads(reads=(("qkv", 3),), count=_by_qkv, pairs=_window_pairs, width_attrs=("dim",)),
    nest.Attention: Heads(  # attention within each of T blocks of N tokens; output laid out head-minor
        reads=(("qkv", 3),), count=_by_qkv, head_minor=True,
        pairs=lambda m, args: args[0].shape[0] * args[0].shape[1] * args[0].shape[2] ** 2,
    ),
    volo.Attention: Heads(reads=(("qkv", 3),), count=_by_qkv, pairs=_all_pairs),
    volo.ClassAttention: Heads(  # the class token queries every token; heads sized by `head_dim`
        reads=(("q", 1), ("kv", 2)), count=lambda m: m.q.weight.shape[0] // m.head_dim, tied=False,
        pairs=lambda m, args: args[0].shape[0] * args[0].shape[1],
    ),
    volo.OutlookAttention: Heads(  # `attn` predicts k^2 x k^2 weights per head from the pooled width
        reads=(("v", 1),), columns=("attn",), per_head=(("attn.weight", 0), ("attn.bias", 0)),
        count=lambda m: m.attn.weight.shape[0] // m.kernel_size**4, pairs=_outlook_pairs, qk=False,
    ),
}


def _tensor(m: nn.Module, path: str) -> torch.Tensor | None:
    module, _, name = path.rpartition(".")
    value = getattr(m.get_submodule(module), name, None)
    return value if isinstance(value, torch.Tensor) else None


def heads_rule(c: Call) -> Label:
    """Attention described by a `Heads` record: a unit is one head, with all of its rows and columns."""
    m, name, st = c.module, c.name, c.st
    spec = HEADS[type(m)]
    x, lab = c.args[0], c.labels[0]
    width, num_heads = x.shape[-1], m.num_heads
    head_dim = width // num_heads if spec.tied else m.head_dim
    inner_width = num_heads * head_dim
    linears = [*spec.reads, *((n, 0) for n in spec.columns)]
    per_head = [(path, dim, _tensor(m, path)) for path, dim in spec.per_head]
    per_head = [(path, dim, t) for path, dim, t in per_head if t is not None]  # biases may be off
    fits = (
        (width % num_heads == 0 or not spec.tied)
        and all(getattr(m, n).in_features == width for n, _ in linears)
        and all(getattr(m, n).out_features == k * inner_width for n, k in spec.reads)
        and getattr(m, spec.proj).in_features == inner_width
        and all(t.shape[dim] % num_heads == 0 for _, dim, t in per_head)
    )
    if not fits:
        return unsupported(c)
    for _, extra in tensor_operands(c)[1:]:  # a shift mask: nothing in it may follow the heads
        st.block(extra, f"enters {c.where} beside its input")
    ids = st.channel_vector(lab, x.dim() - 1, width, c.where)  # (width,)
    heads = st.origin(name, num_heads, names_group=True)  # (num_heads,)
    rows = heads.repeat_interleave(head_dim)  # (inner_width,): the head of each row of q, k or v
    inner = heads.repeat(head_dim) if spec.head_minor else rows  # (inner_width,): ... of each output channel
    if spec.tied:
        st.unify(ids, inner, f"is the width {c.where} reshapes its heads back to")
    for linear, copies in linears:
        layer = getattr(m, linear)
        st.record((f"{name}.{linear}", "weight", 1), ids)
        if copies:
            st.record((f"{name}.{linear}", "weight", 0), rows.repeat(copies), output=True)  # e.g. q | k | v
            if layer.bias is not None:
                st.record((f"{name}.{linear}", "bias", 0), rows.repeat(copies))
    for path, dim, t in per_head:
        module, _, tensor = path.rpartition(".")
        st.record((f"{name}.{module}" if module else name, tensor, dim),
                  heads.repeat_interleave(t.shape[dim] // num_heads))  # fmt: skip
    proj = getattr(m, spec.proj)
    out = st.origin(f"{name}.{spec.proj}", proj.out_features)
    st.record((f"{name}.{spec.proj}", "weight", 1), inner)
    st.record((f"{name}.{spec.proj}", "weight", 0), out, output=True)
    if proj.bias is not None:
        st.record((f"{name}.{spec.proj}", "bias", 0), out)
    return along(out, c.out.dim() - 1, c.out.dim())


def heads_fix(m: nn.Module) -> None:
    spec = HEADS[type(m)]
    m.num_heads = spec.count(m)
    for attr in spec.width_attrs:
        setattr(m, attr, getattr(m, spec.proj).in_features)


def heads_flops(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> list[FlopTerm]:
    """The Linears run as modules; add Q K^T and attn V, `pairs` rows each of the query / value width."""
    spec = HEADS[type(module)]
    if spec.pairs is None:
        return []
    rows = spec.pairs(module, args)
    first, copies = spec.reads[0]
    terms = [FlopTerm("", spec.proj, "weight", (1,), rows)]  # attn V
    if spec.qk:
        terms.append(FlopTerm("", first, "weight", (0,), rows, part=(0, copies)))  # Q K^T over the query rows
    return terms


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


def _fix_ghost(m: ghostnet.GhostModule | ghostnet.GhostModuleV2) -> None:
    """`out[:, :out_chs]` of the primary | cheap concat: prunable only while it takes all of it."""
    m.out_chs = min(m.out_chs, m.primary_conv[0].out_channels + m.cheap_operation[0].out_channels)


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


def _fix_pvt_attention(m: pvt_v2.Attention | twins.GlobalSubSampleAttn) -> None:
    m.dim = m.q.weight.shape[0]
    m.num_heads = m.dim // _head_dim(m)


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
    Handler((pvt_v2.Attention, twins.GlobalSubSampleAttn), rule=pvt_attention, fix=_fix_pvt_attention, constants=True),
    Handler((beit.Attention, eva.EvaAttention), rule=tied_attention, fix=_fix_tied_attention,
            flops=_attention_flops, constants=True),  # fmt: skip
    Handler((davit.WindowAttention, davit.ChannelAttention), rule=tied_attention,
            fix=_fix_tied_attention, constants=True),  # fmt: skip
    Handler(tuple(HEADS), rule=heads_rule, fix=heads_fix, flops=heads_flops, constants=True),
    Handler(_STD_CONVS, rule=std_conv),
    Handler((ghostnet.GhostModule, ghostnet.GhostModuleV2), fix=_fix_ghost),
    # a depthwise blur whose group count is the attribute `channels`
    Handler((BlurPool2d,), fix=_fix_blur_pool, constants=True),
]
