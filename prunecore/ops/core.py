"""Handlers for torch.nn: how each layer type moves channel labels, is re-shaped, and is counted."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunecore import _rules
from prunecore.attention import PrunedMultiheadAttention, swap_class_
from prunecore.ops.handler import FlopTerm, Handler, arg

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_OUT_IN = (0, 1)  # both dims of a Linear-style (out, in) weight


# -- attributes derived from the sliced tensors ------------------------------------------------------
def fix_conv(m: nn.modules.conv._ConvNd) -> None:
    """Channels and groups from the weight; whole conv groups are pruned, so each keeps its width.

    The width of a group is remembered from the first fix (0: not grouped): a depthwise conv cut to
    one channel has groups=1, like an ordinary conv, and swapping its full weight back (the sweep
    measures level after level on one working copy) must make it depthwise again.
    """
    w = m.weight  # conv: (out, in/groups, *k); transposed: (in, out/groups, *k)
    sliced = m.in_channels if m.transposed else m.out_channels  # the dim whose groups are removed whole
    width = m.__dict__.setdefault(_GROUP_WIDTH, sliced // m.groups if m.groups > 1 else 0)
    m.groups = w.shape[0] // width if width else 1
    if m.transposed:
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
    else:
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups


_GROUP_WIDTH = "_prunecore_group_width"  # channels per conv group before any pruning (0: groups=1)


def fix_linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def fix_norm(m: nn.Module) -> None:
    stats = m.weight if m.weight is not None else m.running_mean
    m.num_features = stats.shape[0]


def fix_embedding(m: nn.Embedding) -> None:
    m.embedding_dim = m.weight.shape[1]


def fix_prelu(m: nn.PReLU) -> None:
    m.num_parameters = m.weight.shape[0]


def fix_layer_norm(m: nn.LayerNorm) -> None:
    m.normalized_shape = tuple((m.weight if m.weight is not None else m.bias).shape)


def fix_rms_norm(m: nn.RMSNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def fix_group_norm(m: nn.GroupNorm) -> None:
    per_group = m.num_channels // m.num_groups  # whole groups go, so their width stays
    m.num_channels = m.weight.shape[0]
    m.num_groups = 1 if m.num_groups == 1 else m.num_channels // per_group  # one group spans what is left


def fix_mha(m: nn.MultiheadAttention) -> None:
    if m._qkv_same_embed_dim:
        m.embed_dim = m.kdim = m.vdim = m.in_proj_weight.shape[1]
    else:
        m.embed_dim, m.kdim, m.vdim = (w.shape[1] for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
    m.num_heads = m.out_proj.weight.shape[1] // m.head_dim
    m.out_proj.out_features, m.out_proj.in_features = m.out_proj.weight.shape
    stock = m.num_heads * m.head_dim == m.embed_dim == m.out_proj.out_features
    swap_class_(m, nn.MultiheadAttention, PrunedMultiheadAttention, stock)


# -- MACs ----------------------------------------------------------------------------------------------
def weight_flops(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> list[FlopTerm]:
    """The whole weight at every position one call applies it at."""
    rows = _call_rows(module, arg(args, kwargs, 0, "input"), out)
    return [FlopTerm("", "", "weight", tuple(range(module.weight.dim())), rows)]


def _call_rows(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    """Positions one call applies the whole weight at, over the batch (or unbatched input)."""
    if isinstance(module, nn.Linear):
        return out.numel() // out.shape[-1]  # out: (*, out_features)
    spatial = len(module.kernel_size)
    if isinstance(module, _CONV_T):
        # every input position scatters the whole kernel; x: ([B,] C_in, *spatial)
        return x.numel() // x.shape[-spatial - 1]
    return out.numel() // out.shape[-spatial - 1]  # out: ([B,] C_out, *spatial)


def mha_flops(module: nn.MultiheadAttention, args: tuple, kwargs: dict, out: Any) -> list[FlopTerm]:
    """q, k, v and output projections, then Q K^T and attn V over every (query, key) pair.

    Cross-attention is exact: q is projected at the L query rows, k and v at the S key rows.
    Widths come from the weights (q's third of `in_proj_weight`, `out_proj`'s input), never from
    `embed_dim`, so a subclass with fewer heads is counted by its real size.
    """
    query, key = arg(args, kwargs, 0, "query"), arg(args, kwargs, 1, "key")
    q_rows = query.numel() // query.shape[-1]  # L*N; query (L, N, E), (N, L, E) or unbatched (L, E)
    kv_rows = key.numel() // key.shape[-1]  # S*N
    length = key.shape[1] if module.batch_first and key.dim() == 3 else key.shape[0]  # S
    length += int(module.bias_k is not None) + int(module.add_zero_attn)  # appended after projection
    pairs = q_rows * length  # L*S*N
    if module.in_proj_weight is not None:  # packed (3*inner, E): q | k | v
        projections = [
            FlopTerm("", "", "in_proj_weight", _OUT_IN, rows, part=(i, 3))
            for i, rows in enumerate((q_rows, kv_rows, kv_rows))
        ]
        scores = FlopTerm("", "", "in_proj_weight", (0,), pairs, part=(0, 3))
    else:  # kdim or vdim differs from embed_dim: separate q, k, v weights
        projections = [
            FlopTerm("", "", f"{p}_proj_weight", _OUT_IN, rows)
            for p, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))
        ]
        scores = FlopTerm("", "", "q_proj_weight", (0,), pairs)
    return [
        *projections,
        FlopTerm("out_proj", "out_proj", "weight", _OUT_IN, q_rows),
        scores,  # Q K^T: L*S*inner_q
        FlopTerm("", "out_proj", "weight", (1,), pairs),  # attn V: L*S*inner_v
    ]


# -- stand-alone layers for latency tables -------------------------------------------------------------
def conv_layer(m: nn.modules.conv._ConvNd, x: tuple[int, ...], kept: tuple[int, ...]) -> tuple[nn.Module, tuple]:
    """A plain conv of weight shape `kept` with `m`'s kernel, stride, padding and dilation.

    Whole conv groups are pruned (`fix_conv`), so a grouped conv keeps `kept[0] // width` groups of
    its original width (a width in between is rounded down to whole groups); the input `x`
    (`([B,] C_in, *spatial)`) gets the kept input channels.
    """
    spatial = len(m.kernel_size)
    width = m.out_channels // m.groups if m.groups > 1 else 0
    groups = max(1, kept[0] // width) if width else 1
    out = groups * width if width else kept[0]
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial](
        kept[1] * groups, out, m.kernel_size, m.stride, m.padding, m.dilation, groups, m.bias is not None,
        m.padding_mode, device=m.weight.device, dtype=m.weight.dtype,
    )  # fmt: skip
    shape = list(x)
    shape[-spatial - 1] = kept[1] * groups
    return conv, tuple(shape)


def linear_layer(m: nn.Linear, x: tuple[int, ...], kept: tuple[int, ...]) -> tuple[nn.Module, tuple]:
    """A Linear of weight shape `kept` (out, in); the input `x` (`(*, in)`) gets the kept input width."""
    linear = nn.Linear(kept[1], kept[0], m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    return linear, (*x[:-1], kept[1])


_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip
_SPATIAL = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.LPPool1d, nn.LPPool2d,
)  # fmt: skip

HANDLERS: list[Handler] = [
    Handler(_CONV, rule=_rules.conv, fix=fix_conv, flops=weight_flops, layer=conv_layer),
    Handler(_CONV_T, rule=_rules.conv, fix=fix_conv, flops=weight_flops),
    Handler((nn.Linear,), rule=_rules.linear, fix=fix_linear, flops=weight_flops, layer=linear_layer),
    Handler((nn.Embedding,), rule=_rules.embedding, fix=fix_embedding),
    Handler((nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm), rule=_rules.batchnorm,
            fix=fix_norm),  # fmt: skip
    Handler((nn.PReLU,), rule=_rules.prelu, fix=fix_prelu),
    # norms are followed whole even in subclasses with their own forward (timm's LayerNorm2d,
    # GroupNormAct): the masked norm of mode="mask" stands in for the module
    Handler((nn.LayerNorm,), rule=_rules.layer_norm, fix=fix_layer_norm, whole=True),
    Handler((nn.GroupNorm,), rule=_rules.group_norm, fix=fix_group_norm, whole=True),
    Handler((nn.RMSNorm,), rule=_rules.rms_norm, fix=fix_rms_norm, whole=True),
    Handler((nn.LocalResponseNorm,), rule=_rules.norm_over_channels),
    # whole: the rule refuses (keeps the heads of) any subclass but prunecore's own pruned one
    Handler((nn.MultiheadAttention, PrunedMultiheadAttention), rule=_rules.multihead_attention, fix=fix_mha,
            flops=mha_flops, whole=True),  # fmt: skip
    Handler((nn.TransformerEncoderLayer, nn.TransformerDecoderLayer), rule=_rules.fused_transformer_layer),
    Handler(_ACTIVATIONS, rule=_rules.elementwise),
    Handler(_SPATIAL, rule=_rules.channelwise),
    Handler((nn.Softmax, nn.LogSoftmax, nn.Softmin), rule=_rules.softmax_like),
    Handler((nn.Flatten,), rule=_rules.flatten),
    Handler((nn.Unflatten,), rule=_rules.unflatten),
]
