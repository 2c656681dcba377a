"""Attention modules whose inner width may differ from the model width: what pruned heads become.

Stock attention code derives the head width from the model width (`embed_dim // num_heads`,
`C // num_heads`), so once whole heads, or model-width channels, are removed it would compute
the wrong head width. `apply_plan` turns such modules into these subclasses: same parameters
and state-dict keys, same computation, with the head width read from the weights. The head dim
inside a head is never pruned, so the attention scale 1/sqrt(head_dim) is unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import maxvit
from torchvision.models import swin_transformer as swin

__all__ = [
    "PrunedMultiheadAttention",
    "PrunedRelativePositionalMultiHeadAttention",
    "PrunedShiftedWindowAttention",
    "PrunedShiftedWindowAttentionV2",
    "swap_class_",
    "window_attention",
]


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


def window_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """Swin's (shifted) window self-attention, with the head width read from `qkv_weight`.

    Same arguments and result as torchvision's `shifted_window_attention`, which takes the head
    width from the input width instead. `logit_scale` switches to Swin-V2's cosine attention.
    """
    B, H, W, _ = x.shape  # (B, H, W, C)
    wh, ww = window_size
    x = F.pad(x, (0, 0, 0, -W % ww, 0, -H % wh))
    Hp, Wp = x.shape[1], x.shape[2]
    sh = 0 if wh >= Hp else shift_size[0]
    sw = 0 if ww >= Wp else shift_size[1]
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    nh, nw, n = Hp // wh, Wp // ww, wh * ww
    windows = x.reshape(B, nh, wh, nw, ww, -1).transpose(2, 3).reshape(B * nh * nw, n, -1)  # (B*nW, N, C)
    inner = qkv_weight.shape[0] // 3
    head_dim = inner // num_heads
    if logit_scale is not None and qkv_bias is not None:  # V2 has no key bias
        qkv_bias = torch.cat([qkv_bias[:inner], torch.zeros_like(qkv_bias[inner : 2 * inner]), qkv_bias[2 * inner :]])
    qkv = F.linear(windows, qkv_weight, qkv_bias).reshape(-1, n, 3, num_heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*nW, heads, N, head_dim)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim**-0.5) @ k.transpose(-2, -1)  # (B*nW, heads, N, N)
    attn = attn + relative_position_bias
    if sh or sw:
        # tokens rolled in from the opposite border must not attend to their new neighbours
        def bands(size: int, window: int, shift: int) -> torch.Tensor:
            band = torch.zeros(size, device=x.device)
            band[size - window : size - shift] = 1
            band[size - shift :] = 2
            return band

        region = bands(Hp, wh, sh)[:, None] * 3 + bands(Wp, ww, sw)[None, :]  # (Hp, Wp)
        region = region.reshape(nh, wh, nw, ww).transpose(1, 2).reshape(nh * nw, n)  # (nW, N)
        mask = (region[:, :, None] != region[:, None, :]).to(attn.dtype) * -100.0  # (nW, N, N)
        attn = (attn.reshape(B, nh * nw, num_heads, n, n) + mask[None, :, None]).reshape(-1, num_heads, n, n)
    attn = F.dropout(attn.softmax(-1), p=attention_dropout, training=training)
    out = (attn @ v).transpose(1, 2).reshape(-1, n, inner)  # (B*nW, N, inner)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), p=dropout, training=training)
    out = out.reshape(B, nh, nw, wh, ww, -1).transpose(2, 3).reshape(B, Hp, Wp, -1)
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out[:, :H, :W, :].contiguous()


torch.fx.wrap("window_attention")


class PrunedShiftedWindowAttention(swin.ShiftedWindowAttention):
    """torchvision's Swin window attention with fewer heads or a narrower model width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(
            x, self.qkv.weight, self.proj.weight, self.get_relative_position_bias(), self.window_size,
            self.num_heads, shift_size=self.shift_size, attention_dropout=self.attention_dropout,
            dropout=self.dropout, qkv_bias=self.qkv.bias, proj_bias=self.proj.bias, training=self.training,
        )  # fmt: skip


class PrunedShiftedWindowAttentionV2(swin.ShiftedWindowAttentionV2):
    """torchvision's Swin-V2 window attention with fewer heads or a narrower model width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(
            x, self.qkv.weight, self.proj.weight, self.get_relative_position_bias(), self.window_size,
            self.num_heads, shift_size=self.shift_size, attention_dropout=self.attention_dropout,
            dropout=self.dropout, qkv_bias=self.qkv.bias, proj_bias=self.proj.bias,
            logit_scale=self.logit_scale, training=self.training,
        )  # fmt: skip


class PrunedRelativePositionalMultiHeadAttention(maxvit.RelativePositionalMultiHeadAttention):
    """torchvision's MaxViT attention with fewer heads or a narrower model width.

    The score scale stays `feat_dim ** -0.5` of the dense model (a constant attribute).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, G, P, _ = x.shape  # (B, G, P, D)
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, G, P, self.n_heads, self.head_dim).transpose(2, 3) for t in (q, k, v))
        scores = q @ (k * self.scale_factor).transpose(-2, -1)  # (B, G, heads, P, P)
        attn = F.softmax(scores + self.get_relative_positional_bias(), dim=-1)
        out = (attn @ v).transpose(2, 3).reshape(B, G, P, -1)  # (B, G, P, inner)
        return self.merge(out)
