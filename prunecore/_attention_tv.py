"""torchvision's attention modules with fewer heads or a narrower model width (see `prunecore.attention`).

Kept apart from `prunecore.attention` because defining them imports torchvision.models; that
module hands them out on first use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.models import maxvit
from torchvision.models import swin_transformer as swin

__all__ = [
    "PrunedRelativePositionalMultiHeadAttention",
    "PrunedShiftedWindowAttention",
    "PrunedShiftedWindowAttentionV2",
    "window_attention",
]


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
