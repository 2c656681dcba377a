"""Tiny models, each covering one coupling topology. Inputs: `model.example()`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Toy(nn.Module):
    input_shape: tuple[int, ...] = (2, 3, 8, 8)

    def example(self) -> torch.Tensor:
        return torch.randn(self.input_shape, generator=torch.Generator().manual_seed(1))


class TwoResiduals(Toy):
    """One channel space feeds two residual adds: stem, block1 and block2 outputs are one group."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.block1 = nn.Sequential(conv_bn(8, 6), nn.Conv2d(6, 8, 3, padding=1))
        self.block2 = nn.Sequential(conv_bn(8, 5), nn.Conv2d(5, 8, 3, padding=1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block1(x))
        x = F.relu(x + self.block2(x))
        return self.head(x.mean((2, 3)))


class Concat(Toy):
    """torch.cat of two branches: the consumer's input channels map to two groups by offset."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 4)
        self.b = conv_bn(3, 6)
        self.fuse = conv_bn(10, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.fuse(torch.cat([self.a(x), self.b(x)], dim=1)).mean((2, 3)))


class Chunk(Toy):
    """chunk(2): a channel removed from one half must go from the other half too."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.left = nn.Conv2d(4, 6, 1)
        self.right = nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        return self.head((self.left(a) + self.right(b)).mean((2, 3)))


class FixedSplit(Toy):
    """split with literal sizes cannot change size after pruning: the split channels are fixed."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.left = nn.Conv2d(3, 4, 1)
        self.right = nn.Conv2d(5, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        a, b = torch.split(self.stem(x), [3, 5], dim=1)
        return self.head((self.left(a) + self.right(b)).mean((2, 3)))


class SharedInput(Toy):
    """Two branches read the same tensor; their outputs are added."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 6)
        self.p = conv_bn(6, 7, k=1)
        self.q = conv_bn(6, 7, k=3)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        x = self.stem(x)
        return self.head((self.p(x) + self.q(x)).mean((2, 3)))


class FlattenLinear(Toy):
    """flatten into a Linear: one channel becomes H*W input features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 6), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(6 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


class ViewLinear(Toy):
    """x.view(x.size(0), -1): the flattened size is recomputed, so pruning is exact."""

    def __init__(self):
        super().__init__()
        self.features = conv_bn(3, 6)
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        x = self.features(x)
        return self.fc(x.view(x.size(0), -1))


class HardcodedView(Toy):
    """x.view(-1, 384) hard-codes the channel count: those channels must stay."""

    def __init__(self):
        super().__init__()
        self.features = conv_bn(3, 6)
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(self.features(x).view(2, 384))


class Depthwise(Toy):
    """MobileNet block: depthwise conv ties its input and output channels; BN between."""

    def __init__(self):
        super().__init__()
        self.expand = conv_bn(3, 8, k=1)
        self.dw = conv_bn(8, 8, k=3, groups=8)
        self.mult = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # channel multiplier 2
        self.project = nn.Conv2d(16, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.project(self.mult(self.dw(self.expand(x)))).mean((2, 3)))


class Grouped(Toy):
    """ResNeXt-style grouped conv: whole conv groups are removed together."""

    def __init__(self):
        super().__init__()
        self.reduce = conv_bn(3, 8, k=1)
        self.grouped = conv_bn(8, 12, k=3, groups=4)
        self.expand = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.expand(self.grouped(self.reduce(x))).mean((2, 3)))


class SqueezeExcite(Toy):
    """SE block: the excitation's output channels multiply, so they join the feature group."""

    def __init__(self):
        super().__init__()
        self.features = conv_bn(3, 8)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.excite = nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.features(x)
        s = torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))
        return self.head((x * s).mean((2, 3)))


class SpatialAttention(Toy):
    """A 1-channel map broadcast over all channels does not tie them."""

    def __init__(self):
        super().__init__()
        self.features = conv_bn(3, 8)
        self.attn = nn.Conv2d(8, 1, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.features(x)
        return self.head((x * torch.sigmoid(self.attn(x))).mean((2, 3)))


class Transposed(Toy):
    """ConvTranspose2d as consumer and producer (weight is (in, out, k, k))."""

    def __init__(self):
        super().__init__()
        self.down = conv_bn(3, 6)
        self.up = nn.ConvTranspose2d(6, 5, 2, stride=2)
        self.bn = nn.BatchNorm2d(5)
        self.out = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.up(self.down(x)))))


class GroupedTransposed(Toy):
    """A grouped ConvTranspose2d: weight dim 0 spans the input groups, which go whole."""

    def __init__(self):
        super().__init__()
        self.down = conv_bn(3, 8, k=1)
        self.up = nn.ConvTranspose2d(8, 12, 2, stride=2, groups=4)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.up(self.down(x))))


class Conv1dNet(Toy):
    """Conv1d + BatchNorm1d on sequences, pooled into a Linear."""

    input_shape = (2, 3, 16)

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.c2(F.relu(self.bn(self.c1(x)))).amax(-1))


class ChannelShuffle(Toy):
    """ShuffleNet's view -> transpose -> view: channels move in whole columns."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 4)
        self.b = conv_bn(3, 4)
        self.after = nn.Conv2d(8, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(self.after(x).mean((2, 3)))


class LooseParameter(Toy):
    """A bare nn.Parameter scaling channels (layer scale) is sliced with its group."""

    def __init__(self):
        super().__init__()
        self.features = conv_bn(3, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8).reshape(1, 8, 1, 1))
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.out(self.features(x) * self.scale).mean((2, 3))


class Reused(Toy):
    """One conv applied twice (shared weights): its input and output channels become one group."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.shared(F.relu(self.shared(self.stem(x))))
        return self.head(x.mean((2, 3)))


class UnknownOp(Toy):
    """cumsum over channels is not understood: the channels reaching it must be kept."""

    def __init__(self):
        super().__init__()
        self.features = conv_bn(3, 8)
        self.mid = conv_bn(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.features(x).cumsum(dim=1)
        return self.head(self.mid(x).mean((2, 3)))


class ToList(Toy):
    """Channel values leave the tensor world (tolist): those channels must stay."""

    def __init__(self):
        super().__init__()
        self.features = conv_bn(3, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.features(x).mean((2, 3))
        return self.head(x), x.tolist()


class DataDependent(Toy):
    """Python control flow on tensor values: traced eagerly; the channels it reads are kept."""

    def __init__(self):
        super().__init__()
        self.features = conv_bn(3, 8)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:
            x = x * 2
        return x


class TinyTransformer(Toy):
    """A hand-written ViT: class token, position embedding, LayerNorms, nn.MultiheadAttention, MLP.

    Groups: the embedding dim (patch conv, class token, position embedding, every LayerNorm,
    in_proj columns, out_proj rows, the MLP's outer Linears, the head), the heads, the MLP neurons.
    """

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 5, 16) * 0.5)
        self.ln1 = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.ln2 = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16))
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 4, 16)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln(x)[:, 0])


class GroupNormNet(Toy):
    """GroupNorm: a unit is one whole norm group (2 channels here), so num_groups shrinks."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.gn2 = nn.GroupNorm(3, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over dim 1 of (B, C, H, W), written as a subclass with its own forward."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ChannelsLast(Toy):
    """A ConvNeXt block: depthwise conv, permute, LayerNorm, Linear, GELU, Linear, layer scale, residual."""

    input_shape = (2, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), ChannelsFirstLayerNorm(8))
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 12)
        self.down = nn.Linear(12, 8)
        self.layer_scale = nn.Parameter(torch.linspace(0.5, 1.5, 8).reshape(8, 1, 1))
        self.head = nn.Sequential(ChannelsFirstLayerNorm(8), nn.Flatten(2))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.down(F.gelu(self.up(y))).permute(0, 3, 1, 2)
        x = x + self.layer_scale * y
        return self.fc(self.head(x).mean(2))


class EinsumAttention(Toy):
    """Attention by einsum with a relative-position table indexed by a buffer: heads prune whole.

    `view(B, N, -1, 4)` leaves the head count to run time, so heads are units of 4 channels; the
    table's columns are heads, its rows positions, which must never be removed.
    """

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.qkv = nn.Linear(8, 3 * 12)
        self.table = nn.Parameter(torch.randn(7, 3))
        self.register_buffer("index", (torch.arange(4)[:, None] - torch.arange(4)[None, :] + 3).flatten())
        self.out = nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 4, 8)
        B, N, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = q.reshape(B, N, -1, 4), k.reshape(B, N, -1, 4), v.reshape(B, N, -1, 4)  # (B, N, heads, 4)
        bias = self.table[self.index].view(N, N, -1).permute(2, 0, 1)  # (heads, N, N)
        attn = (torch.einsum("bnhd,bmhd->bhnm", q, k) * 0.5 + bias).softmax(-1)
        y = torch.einsum("bhnm,bmhd->bnhd", attn, v).reshape(B, N, -1)
        x = x + self.out(y)
        return self.head(x.mean(1))


class MatmulAttention(Toy):
    """Attention with @ and a mask: q k^T contracts over channels, which go in whole heads."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.v = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 4, 8)
        scores = self.q(x) @ self.k(x).transpose(1, 2)  # (B, 4, 4)
        return self.head((scores.softmax(-1) @ self.v(x)).mean(1))


PRUNABLE_TOYS = [
    TwoResiduals, Concat, Chunk, FixedSplit, SharedInput, FlattenLinear, ViewLinear, HardcodedView,
    Depthwise, Grouped, SqueezeExcite, SpatialAttention, Transposed, GroupedTransposed, Conv1dNet, ChannelShuffle,
    LooseParameter, Reused, UnknownOp, TinyTransformer, GroupNormNet, ChannelsLast, EinsumAttention,
    MatmulAttention,
]  # fmt: skip


def randomize_norms_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial norm statistics and affine parameters, so masked channels would show if they leaked.

    Parameters initialised to one constant (zero heads, 1e-6 layer scales, LayerNorm ones) get
    random values too: otherwise a wrongly pruned channel could hide behind a zero.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if bool(p.flatten()[0] == 1) else 0.0))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


class ShapeBranch(Toy):
    """Python control flow on a *shape* (torch.fx cannot trace it): the model runs for real instead."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 8)
        self.b = conv_bn(8, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.a(x)
        if x.shape[-1] > 4:  # decided on the example's size
            x = F.avg_pool2d(x, 2)
        return self.head(self.b(x).flatten(2).mean(-1))


class FunctionalNorm(Toy):
    """A BatchNorm subclass that calls `F.batch_norm` and an activation (timm's `BatchNormAct2d`)."""

    class BatchNormAct(nn.BatchNorm2d):
        def forward(self, x):
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
            return F.silu(y)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = self.BatchNormAct(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.conv2(self.bn(self.conv(x))).mean((2, 3)))


class InPlaceOps(Toy):
    """Ops run in place: on values nothing else holds (the sweep may do so too) and on a view of a live value."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                                  nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))  # fmt: skip
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)  # (2, 8, 8, 8)
        g = torch.relu(x.flatten(1)).mean(1, keepdim=True)  # a view of x, which the residual below still needs
        y = self.conv(x)
        y += x
        y = self.act(y)
        z = F.relu(y, inplace=True).mean((2, 3)) * 2.0  # (2, 8)
        return self.head(z + g)


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm with its own forward that applies its activation too, as timm's BatchNormAct2d does."""

    def forward(self, x):
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, factor,
                         self.eps)  # fmt: skip
        return F.relu(x)


class NormAct(Toy):
    """BatchNorm subclasses whose forward reads `self.training`: re-estimation must run them in train mode."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1, bias=False), BatchNormAct(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.head(x.mean((2, 3)))


class DefaultArgument(Toy):
    """forward(x, scale=1.0): evaluation passes the inputs alone, so `scale` keeps its default."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, scale: float = 1.0):
        return self.head(self.stem(x).mean((2, 3)) * scale)


class ForeignSize(Toy):
    """A reshape to a size read from *another* tensor: `inner` and `width` must keep their channels.

    `y.reshape(b, n, c)` with `c` from `x` only works while both widths agree; pruning either alone
    would crash the pruned model, so prunecore keeps both and says why.
    """

    input_shape = (2, 5, 8)

    def __init__(self):
        super().__init__()
        self.width = nn.Linear(8, 8)
        self.inner = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.width(x)
        b, n, c = x.shape
        y = self.inner(x).reshape(b, n, c)  # c measures width's channels, not inner's
        return self.head(self.mlp(torch.cat([x, y], -1)).mean(1))
