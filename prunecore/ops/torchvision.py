"""Handlers for torchvision's transformer classes, beyond the generic op rules.

- Shape attributes their forward reads as constants (`VisionTransformer.hidden_dim`, a window
  attention's `num_heads`): the trace lets reshapes by them follow pruned channels, and surgery
  re-derives them from the sliced tensors (`constants=True` and `fix`).
- Swin's window attention is followed whole, as one module, since heads own slices of its bias
  table (or, on V2, of its bias MLP and logit scale).
- Attention modules whose inner width changes become `prunecore.attention` subclasses, which read
  the head width from their weights instead of deriving it from the model width.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models import maxvit
from torchvision.models import swin_transformer as swin
from torchvision.models.vision_transformer import VisionTransformer

from prunecore import attention
from prunecore._labels import along
from prunecore._rules import Call, Label, unsupported
from prunecore.ops.handler import FlopTerm, Handler, arg

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


# -- MACs ----------------------------------------------------------------------------------------------
def _swin_flops(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> list[FlopTerm]:
    """Swin (V1 and V2) window attention: `qkv` and `proj` run functionally on the padded map.

    `shifted_window_attention` pads H and W up to multiples of the window, projects every padded
    position and attends within each window of N = wh*ww positions.
    """
    x = arg(args, kwargs, 0, "x")  # (B, H, W, C)
    wh, ww = module.window_size
    positions = x.shape[0] * math.ceil(x.shape[1] / wh) * wh * math.ceil(x.shape[2] / ww) * ww  # B*padH*padW
    pairs = positions * wh * ww  # each position attends to its whole window
    return [
        FlopTerm("qkv", "qkv", "weight", (0, 1), positions),
        FlopTerm("proj", "proj", "weight", (0, 1), positions),
        FlopTerm("", "qkv", "weight", (0,), pairs, part=(0, 3)),  # Q K^T
        FlopTerm("", "proj", "weight", (1,), pairs),  # attn V
    ]


def _maxvit_flops(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> list[FlopTerm]:
    """MaxViT attention: `to_qkv` and `merge` run as modules; add the two einsum matmuls."""
    x = arg(args, kwargs, 0, "x")  # (B, G, P, D): G windows or grid cells of P positions
    pairs = x.shape[0] * x.shape[1] * x.shape[2] ** 2  # B*G*P*P
    return [
        FlopTerm("", "to_qkv", "weight", (0,), pairs, part=(0, 3)),  # Q K^T
        FlopTerm("", "merge", "weight", (1,), pairs),  # attn V
    ]


HANDLERS: list[Handler] = [
    Handler((VisionTransformer,), fix=_fix_vit, constants=True),
    # the pruned subclasses (prunecore.attention) have their own forward: followed whole too
    Handler((swin.ShiftedWindowAttention,), rule=window_attention, fix=_fix_window_attention, flops=_swin_flops,
            whole=True, constants=True),  # fmt: skip
    Handler((maxvit.RelativePositionalMultiHeadAttention,), fix=_fix_maxvit_attention, flops=_maxvit_flops,
            constants=True),  # fmt: skip
]
