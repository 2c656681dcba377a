"""Attention modules whose inner width may differ from the model width: what pruned heads become.

Stock attention code derives the head width from the model width (`embed_dim // num_heads`,
`C // num_heads`), so once whole heads, or model-width channels, are removed it would compute
the wrong head width. `apply_plan` turns such modules into these subclasses: same parameters
and state-dict keys, same computation, with the head width read from the weights. The head dim
inside a head is never pruned, so the attention scale 1/sqrt(head_dim) is unchanged.

torchvision's subclasses (Swin, MaxViT) and `window_attention` live in `prunecore._attention_tv`
and are attributes of this module on first use, so that importing prunecore does not import
torchvision.models (about 1.2 s, torch._dynamo included) in every worker process and CLI call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_TORCHVISION = (
    "PrunedRelativePositionalMultiHeadAttention", "PrunedShiftedWindowAttention", "PrunedShiftedWindowAttentionV2",
    "window_attention",
)  # fmt: skip
__all__ = ["PrunedMultiheadAttention", "swap_class_", *_TORCHVISION]


def swap_class_(module: nn.Module, stock: type, pruned: type, is_stock: bool) -> None:
    """Make `module` the stock class while its widths are consistent, the pruned subclass otherwise.

    Only modules of exactly one of the two classes are touched (a user subclass keeps its own).
    """
    if type(module) in (stock, pruned):
        module.__class__ = stock if is_stock else pruned


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` with `num_heads * head_dim` free to differ from `embed_dim`.

    `embed_dim` (and `kdim`/`vdim`) are the input widths, `num_heads * head_dim` the width of
    q, k and v, and `out_proj` maps it back to its own output width. Bias-k/v and zero attention
    are not supported (prunecore never prunes such modules).
    """

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E) -> (L, 1, E)
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # (N, L, E) -> (L, N, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        L, N, _ = query.shape
        S = key.shape[0]
        H, hd = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)  # each (H * hd, E)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).reshape(L, N, H, hd).permute(1, 2, 0, 3)  # (N, H, L, hd)
        k = F.linear(key, w_k, b_k).reshape(S, N, H, hd).permute(1, 2, 0, 3)  # (N, H, S, hd)
        v = F.linear(value, w_v, b_v).reshape(S, N, H, hd).permute(1, 2, 0, 3)  # (N, H, S, hd)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).triu(1)
        mask = _additive_mask(attn_mask, key_padding_mask, N, H, L, S, q.dtype)  # (N|1, H|1, L, S) or None
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (N, H, L, S)
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(-1), p)  # stock MHA returns them after dropout
            out = weights @ v  # (N, H, L, hd)
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.permute(2, 0, 1, 3).reshape(L, N, H * hd)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)  # (L, N, E_out)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    N: int,
    H: int,
    L: int,
    S: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Both masks as one float mask to add to the scores (True / -inf means "do not attend")."""

    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.reshape(N, H, L, S) if mask.dim() == 3 else mask.reshape(1, 1, L, S)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).reshape(N, 1, 1, S)
        mask = pad if mask is None else mask + pad
    return mask


def __getattr__(name: str) -> object:
    """torchvision's pruned subclasses, imported when first asked for (PEP 562)."""
    if name in _TORCHVISION:
        from prunecore import _attention_tv

        return getattr(_attention_tv, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
