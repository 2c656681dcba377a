"""Every CNN family among torchvision's classifiers: trace, prune every prunable group, match the mask.

The default suite runs one small model of each family; `make test-slow` runs every CNN classifier
torchvision ships (transformers and channels-last blocks are covered by their own issue).
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
]  # fmt: skip
NOT_CNN = ("vit_", "swin_", "maxvit_", "convnext_")
ALL_CNNS = [
    name
    for name in torchvision.models.list_models(module=torchvision.models)
    if not name.startswith(NOT_CNN) and name not in FAMILIES
]


def input_size(name: str) -> int:
    return 80 if name.startswith("inception") else 64


def check_model(name: str) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomize_norms_(torchvision.models.get_model(name, weights=None)).eval()
        x = torch.randn(2, 3, input_size(name), input_size(name))
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


@pytest.mark.parametrize("name", FAMILIES)
def test_family(name):
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_CNNS)
def test_every_cnn(name):
    check_model(name)
