"""What prunecore knows about torchvision's transformer classes beyond the generic op rules.

- Shape attributes their forward reads as constants (`VisionTransformer.hidden_dim`, a window
  attention's `num_heads`): the trace lets reshapes by them follow pruned channels
  (`SHAPE_OWNERS`), and surgery re-derives them from the sliced tensors (`SHAPE_FIXES`).
- Swin's window attention is followed whole, as one module (`MODULE_RULES`), since heads own
  slices of its bias table (or, on V2, of its bias MLP and logit scale).
- Attention modules whose inner width changes become `prunecore.attention` subclasses, which read
  the head width from their weights instead of deriving it from the model width.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models import maxvit
from torchvision.models import swin_transformer as swin
from torchvision.models.vision_transformer import VisionTransformer

from prunecore import attention
from prunecore._labels import along
from prunecore._rules import Call, Label, unsupported

SHAPE_OWNERS: list[type] = [VisionTransformer, swin.ShiftedWindowAttention, maxvit.RelativePositionalMultiHeadAttention]


# -- module rules ----------------------------------------------------------------------------------
def window_attention(c: Call) -> Label:
    """Swin window attention: a unit is one head (its q, k, v rows, proj columns, bias-table column).

    The model width enters through `qkv` columns and leaves through `proj` rows; heads are a group
    of their own, named after the attention module. The head width is never pruned. Swin-V2's
    heads also own their `logit_scale` entry and the bias MLP's output row.
    """
    m, name, st = c.module, c.name, c.st
    x, lab = c.args[0], c.labels[0]
    qkv, proj = f"{name}.qkv", f"{name}.proj"
    inner = m.qkv.weight.shape[0] // 3
    heads = st.origin(name, m.num_heads, names_group=True)
    per_head = heads.repeat_interleave(inner // m.num_heads)  # (inner,)
    st.record((qkv, "weight", 1), st.channel_vector(lab, x.dim() - 1, x.shape[-1], c.where))
    st.record((qkv, "weight", 0), per_head.repeat(3), output=True)
    ids_out = st.origin(proj, m.proj.weight.shape[0])
    st.record((proj, "weight", 1), per_head)
    st.record((proj, "weight", 0), ids_out, output=True)
    if m.qkv.bias is not None:
        st.record((qkv, "bias", 0), per_head.repeat(3))
    if m.proj.bias is not None:
        st.record((proj, "bias", 0), ids_out)
    if isinstance(m, swin.ShiftedWindowAttentionV2):
        st.record((name, "logit_scale", 0), heads)
        last = m.cpb_mlp[-1]
        if not isinstance(last, nn.Linear) or last.bias is not None or last.out_features != m.num_heads:
            return unsupported(c)
        st.record((f"{name}.cpb_mlp.{len(m.cpb_mlp) - 1}", "weight", 0), heads)
    else:
        st.record((name, "relative_position_bias_table", 1), heads)
    return along(ids_out, x.dim() - 1, x.dim())


MODULE_RULES: list[tuple[type, Callable[[Call], Label]]] = [(swin.ShiftedWindowAttention, window_attention)]
LEAF_MODULES: tuple[type, ...] = (swin.ShiftedWindowAttention,)  # the pruned subclasses too


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

