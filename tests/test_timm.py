"""timm models: trace, prune every prunable group, match the masked reference.

The default suite runs three of timm's tiny `test_*` models (a ResNet, an EfficientNet, a ViT);
`make test-slow` runs one small model of every timm family in `timm_zoo.MODELS`. Random init
(`pretrained=False`), the smallest input each architecture accepts.
"""

import pytest

timm = pytest.importorskip("timm")

import torch  # noqa: E402
from test_sensitivity import assert_matches, naive  # noqa: E402
from timm_zoo import MODELS, NUM_CLASSES, build, check, prunable_share  # noqa: E402

from prunecore.graph import trace  # noqa: E402
from prunecore.sensitivity import sweep  # noqa: E402

# name -> (least share of parameters in prunable groups, most params left at 50 %), as measured:
# 1.00 / 0.25, 1.00 / 0.27 and 1.00 / 0.30 (heads, MLP neurons and the embedding width)
FAST = {
    "test_resnet": (0.99, 0.30),
    "test_efficientnet": (0.99, 0.30),
    "test_vit": (0.99, 0.35),
}


def test_zoo_lists_the_families():
    assert len(MODELS) >= 55 and len(set(MODELS)) == len(MODELS)
    assert set(MODELS) <= set(timm.list_models())


@pytest.mark.parametrize("name", sorted(FAST))
def test_small_timm_model(name):
    result = check(name)
    assert result.status == "ok", f"{name}: {result.status}: {result.detail}"
    least_share, most_kept = FAST[name]
    assert result.prunable_share >= least_share
    assert result.params_kept_at_50 <= most_kept
    assert result.prunable_groups >= 1 and result.groups >= result.prunable_groups


@pytest.mark.parametrize("name", sorted(FAST))
def test_a_sweep_with_batchnorm_re_estimation_equals_the_naive_loop(name):
    """The sweep's fx graph on timm: BatchNormAct2d must run in train mode while statistics are re-estimated,
    and a ViT's `forward(x, attn_mask=None)` gives fx an input of its own."""
    model, example = build(name)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn((3, *example.shape[1:]), generator=gen), torch.randint(0, NUM_CLASSES, (3,), generator=gen))
            for _ in range(2)]  # fmt: skip
    graph = trace(model, example)
    groups = [g.name for g in graph.prunable][::3][:3]
    fast = sweep(model, data, example, levels=[0.5], metric=["loss"], groups=groups, progress=False,
                 bn_recalibration=2, graph=graph)  # fmt: skip
    assert_matches(fast, naive(model, data, example, [0.5], ["loss"], bn_batches=2, groups=groups), ["loss"])


def test_prunable_share_counts_each_tensor_once():
    model, x = build("test_resnet")
    graph = trace(model, x)
    share = prunable_share(model, graph)
    assert 0.0 < share <= 1.0
    # the classifier's weight is shrunk along its input dim by the last group, its bias is not
    total = sum(p.numel() for p in model.parameters())
    assert share < 1.0 and share > 1.0 - (model.get_classifier().bias.numel() + 1) / total


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_timm_model(name, record_property):
    result = check(name)
    record_property("prunable_share", round(result.prunable_share, 4))
    record_property("params_kept_at_50", round(result.params_kept_at_50, 4))
    assert result.status != "trace-error", f"{name}: tracing failed: {result.detail}"
    assert result.status in ("ok", "no-groups"), f"{name}: {result.status}: {result.detail}"
