"""The sample architectures, built from torchvision classes for 1x28x28 digits and 10 classes.

Each exercises different coupling:
- `resnet20`: CIFAR-style ResNet-20 of torchvision `BasicBlock`s (16-32-64 channels): BatchNorm and
  residual adds tying every block of a stage, projection shortcuts between stages;
- `mobilenet_v2`: torchvision `mobilenet_v2(width_mult=0.5)` with a 1-channel, stride-1 stem and
  one fewer down-sampling stage: depthwise convs and inverted residuals;
- `vit`: a small torchvision `VisionTransformer` (patch 7, 4 layers, 4 heads, width 64, MLP 128):
  LayerNorm, attention heads, MLP neurons.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import VisionTransformer, mobilenet_v2 as tv_mobilenet_v2
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import Conv2dNormActivation

__all__ = ["ResNet20", "mobilenet_v2", "resnet20", "vit"]


class ResNet20(nn.Module):
    """ResNet-20 (He et al. 2016, CIFAR variant): 3 stages x 3 BasicBlocks, ~0.27 M parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        self.stem = Conv2dNormActivation(in_channels, widths[0], kernel_size=3)
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(3):
                down = None
                if j == 0 and (stride != 1 or cin != width):
                    down = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))
                blocks.append(BasicBlock(cin, width, stride if j == 0 else 1, down))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):  # x: (B, 1, 28, 28)
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))  # (B, 64, 7, 7)
        return self.fc(self.pool(x).flatten(1))


def resnet20() -> nn.Module:
    return ResNet20()


def mobilenet_v2() -> nn.Module:
    """MobileNetV2 x0.5; 28 -> 14 -> 7 -> 4 px, so the last stages still see a spatial map."""
    setting = [
        # expansion t, channels c, blocks n, stride s (torchvision's table, one stride-2 fewer)
        [1, 16, 1, 1],
        [6, 24, 2, 2],
        [6, 32, 3, 2],
        [6, 64, 4, 1],
        [6, 96, 3, 1],
        [6, 160, 3, 2],
        [6, 320, 1, 1],
    ]
    model = tv_mobilenet_v2(weights=None, width_mult=0.5, num_classes=10, inverted_residual_setting=setting)
    first = model.features[0]
    stem_out = first[0].out_channels
    model.features[0] = Conv2dNormActivation(1, stem_out, stride=1, activation_layer=nn.ReLU6)
    return model


def vit() -> nn.Module:
    """ViT on 7x7 patches: 16 tokens + class token, 4 layers, 4 heads of 16 dims."""
    model = VisionTransformer(
        image_size=28, patch_size=7, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    model.conv_proj = nn.Conv2d(1, 64, kernel_size=7, stride=7)
    return model


def tinylm() -> nn.Module:
    """A small Llama decoder on UTF-8 bytes: 6 layers, width 128, 4 query heads over 2 KV heads of 32, 512 MLP neurons.

    Grouped-query attention, a gated MLP, RMSNorm and rotary embeddings: the parts of a modern LLM
    that pruning must respect, at 1.5 M parameters. Needs transformers (`prunecore[hf]`).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)
