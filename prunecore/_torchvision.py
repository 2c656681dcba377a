"""What prunecore knows about torchvision's transformer classes beyond the generic op rules.

- Shape attributes their forward reads as constants (`VisionTransformer.hidden_dim`, a window
  attention's `num_heads`): the trace lets reshapes by them follow pruned channels
  (`SHAPE_OWNERS`), and surgery re-derives them from the sliced tensors (`SHAPE_FIXES`).
- Functions torchvision marks as fx leaves (`torch.fx.wrap`): window attention, patch-merging
  padding and the relative-position-bias lookup get rules of their own (`FUNCTION_RULES`).
- Attention modules whose inner width changes become `prunecore.attention` subclasses, which read
  the head width from their weights instead of deriving it from the model width.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx, nn
from torchvision.models import maxvit
from torchvision.models import swin_transformer as swin
from torchvision.models.vision_transformer import VisionTransformer

from prunecore import attention
from prunecore._labels import along, expand_full, varying_dims
from prunecore._rules import Call, Label, unsupported

SHAPE_OWNERS: list[type] = [VisionTransformer, swin.ShiftedWindowAttention, maxvit.RelativePositionalMultiHeadAttention]


# -- rules for torchvision's fx leaves ------------------------------------------------------------
def window_attention(c: Call) -> Label:
    """Swin window attention: a unit is one head (its q, k, v rows, proj columns, bias-table column).

    The model width enters through `qkv` columns and leaves through `proj` rows; heads are a group
    of their own, named after the attention module. The head width is never pruned.
    """
    x, lab = c.args[0], c.labels[0]
    nodes = {name: c.node_arg(i, name) for i, name in enumerate(("input", "qkv_weight", "proj_weight"))}
    for name in ("qkv_bias", "proj_bias", "logit_scale"):
        nodes[name] = c.node.kwargs.get(name)
    if any(not (isinstance(n, fx.Node) and n.op == "get_attr") for n in (nodes["qkv_weight"], nodes["proj_weight"])):
        return unsupported(c)
    qkv = nodes["qkv_weight"].target.rpartition(".")[0]
    proj = nodes["proj_weight"].target.rpartition(".")[0]
    heads_n = c.arg(5, "num_heads")
    inner = c.args[1].shape[0] // 3
    st = c.st
    heads = st.origin(qkv.rpartition(".")[0], heads_n, names_group=True)
    per_head = heads.repeat_interleave(inner // heads_n)  # (inner,)
    st.record((qkv, "weight", 1), st.channel_vector(lab, x.dim() - 1, x.shape[-1], c.where))
    st.record((qkv, "weight", 0), per_head.repeat(3), output=True)
    ids_out = st.origin(proj, c.args[2].shape[0])
    st.record((proj, "weight", 1), per_head)
    st.record((proj, "weight", 0), ids_out, output=True)
    for name, module, ids in (("qkv_bias", qkv, per_head.repeat(3)), ("proj_bias", proj, ids_out)):
        if isinstance(nodes[name], fx.Node):
            st.record((module, "bias", 0), ids)
    scale = nodes["logit_scale"]
    if isinstance(scale, fx.Node):
        if scale.op != "get_attr":
            return unsupported(c)
        module, _, tensor = scale.target.rpartition(".")
        st.record((module, tensor, 0), heads)
    bias, bias_lab = c.args[3], c.labels[3]
    if bias_lab is not None:  # (1, heads, N, N): each head's bias goes with its head
        st.unify(bias_lab, along(heads, 1, bias.dim()), f"is the position bias of {c.where}")
    return along(ids_out, x.dim() - 1, x.dim())


def relative_position_bias(c: Call) -> Label:
    """The bias-table lookup: heads run along the table's columns, positions along its rows."""
    table, lab = c.args[0], c.labels[0]
    full = expand_full(lab, table.shape)  # (positions, heads)
    c.st.keep_whole(full, 0, f"is looked up by position along its channels by {c.where}")
    return swin._get_relative_position_bias(full, c.args[1], c.args[2])


def patch_merging_pad(c: Call) -> Label:
    """2x2 neighbours concatenated along channels: (B, H, W, C) -> (B, H/2, W/2, 4C)."""
    x, lab = c.args[0], c.labels[0]
    if varying_dims(lab) - {x.dim() - 1}:
        return unsupported(c)
    return torch.cat([lab] * 4, dim=-1)


FUNCTION_RULES: dict[Callable, Callable[[Call], Label]] = {
    swin.shifted_window_attention: window_attention,
    attention.window_attention: window_attention,
    swin._get_relative_position_bias: relative_position_bias,
    swin._patch_merging_pad: patch_merging_pad,
}
PARAMS_BY_NAME = {swin.shifted_window_attention, attention.window_attention}


# -- shape attributes after slicing ---------------------------------------------------------------
def _fix_vit(m: VisionTransformer) -> None:
    m.hidden_dim = m.conv_proj.out_channels


def _fix_window_attention(m: swin.ShiftedWindowAttention) -> None:
    v2 = isinstance(m, swin.ShiftedWindowAttentionV2)
    m.num_heads = m.logit_scale.shape[0] if v2 else m.relative_position_bias_table.shape[1]
    width, inner = m.qkv.weight.shape[1], m.qkv.weight.shape[0] // 3
    is_stock = inner == width == m.proj.weight.shape[0] and inner % m.num_heads == 0
    if v2:
        stock, pruned = swin.ShiftedWindowAttentionV2, attention.PrunedShiftedWindowAttentionV2
    else:
        stock, pruned = swin.ShiftedWindowAttention, attention.PrunedShiftedWindowAttention
    attention.swap_class_(m, stock, pruned, is_stock)


def _fix_maxvit_attention(m: maxvit.RelativePositionalMultiHeadAttention) -> None:
    m.n_heads = m.relative_position_bias_table.shape[1]
    is_stock = m.n_heads * m.head_dim == m.to_qkv.weight.shape[1] == m.merge.weight.shape[0]
    pruned = attention.PrunedRelativePositionalMultiHeadAttention
    attention.swap_class_(m, maxvit.RelativePositionalMultiHeadAttention, pruned, is_stock)


SHAPE_FIXES: list[tuple[type, Callable[[nn.Module], None]]] = [
    (VisionTransformer, _fix_vit),
    (swin.ShiftedWindowAttention, _fix_window_attention),
    (maxvit.RelativePositionalMultiHeadAttention, _fix_maxvit_attention),
]

