"""Every torchvision classifier: trace, prune every prunable group, match the masked reference.

The default suite runs one small model of each family (CNNs, ConvNeXt, Swin, Swin-V2, ViT);
`make test-slow` runs all 80 classification models torchvision ships (`list_models`), MaxViT and
the big ViTs included. Random init; the smallest input each architecture accepts.
"""

import warnings

import pytest
import torch
import torchvision

from prunecore.graph import trace
from prunecore.prune import make_plan
from prunecore.surgery import apply_plan
from toy_models import randomize_norms_

FAMILIES = [
    "resnet18", "resnext50_32x4d", "wide_resnet50_2", "vgg11", "vgg11_bn", "alexnet", "squeezenet1_0",
    "densenet121", "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5",
    "shufflenet_v2_x0_5", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf",
    "convnext_tiny", "swin_t", "swin_v2_t", "vit_b_32",
]  # fmt: skip
ALL_MODELS = torchvision.models.list_models(module=torchvision.models)
OTHERS = [name for name in ALL_MODELS if name not in FAMILIES]


def input_size(name: str) -> int:
    if name.startswith(("vit_", "maxvit_")):
        return 224  # fixed by the position embedding / the window partition
    return 80 if name.startswith("inception") else 64


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomize_norms_(torchvision.models.get_model(name, weights=None)).eval()
    size = input_size(name)
    return model, torch.randn(1 if size > 100 else 2, 3, size, size)


def check_model(name: str) -> None:
    model, x = build(name)
    graph = trace(model, x)
    assert graph.prunable, f"{name}: no prunable group"
    with torch.no_grad():
        dense = model(x)
    for sparsity in (0.3, 0.5):
        plan = make_plan(model, graph, sparsity)
        assert all(len(g.keep) < g.size for g in plan.groups.values() if g.size >= 4)
        pruned = apply_plan(model, plan, graph=graph)
        masked = apply_plan(model, plan, mode="mask", graph=graph)
        with torch.no_grad():
            out, ref = pruned(x), masked(x)
        assert out.shape == dense.shape
        scale = ref.abs().max().item()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_zoo_lists_80_models():
    assert len(ALL_MODELS) == 80 and set(FAMILIES) <= set(ALL_MODELS)


@pytest.mark.parametrize("name", FAMILIES)
def test_family(name):
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHERS)
def test_every_model(name):
    check_model(name)


def test_transformer_groups_name_what_goes_together():
    """Swin: heads take their bias-table column; ViT: the embedding dim spans every block."""
    model, x = build("swin_t")
    graph = trace(model, x)
    heads = graph["features.1.0.attn"]
    assert heads.size == 3 and heads.prunable
    paths = {(m.path, m.dim) for m in heads.members}
    assert ("features.1.0.attn.relative_position_bias_table", 1) in paths
    assert ("features.1.0.attn.qkv.weight", 0) in paths and ("features.1.0.attn.proj.weight", 1) in paths
    plan = make_plan(model, graph, {"features.1.0.attn": 0.34, "features.0.0": 0.25})
    pruned = apply_plan(model, plan, graph=graph)
    attn = pruned.features[1][0].attn
    assert type(attn).__name__ == "PrunedShiftedWindowAttention" and attn.num_heads == 2
    assert attn.relative_position_bias_table.shape[1] == 2 and pruned.features[0][2].normalized_shape == (72,)
