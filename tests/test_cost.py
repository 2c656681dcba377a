"""`count`: hand-computed MACs and params (attention included), predicted plan cost == cost of the applied
plan == `CostModel.price`, no mutation."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import maxvit, swin_transformer
from torchvision.models.vision_transformer import VisionTransformer

from prunecore.cost import Cost, ModuleCost, cost_model, count
from prunecore.graph import ChannelGraph, ChannelGroup, InputSpec, Member, trace
from prunecore.importance import score
from prunecore.plan import GroupPlan, Plan
from prunecore.prune import make_plan
from prunecore.surgery import apply_plan
from toy_models import PRUNABLE_TOYS, Toy


def tiny() -> nn.Sequential:
    """Conv -> BN -> ReLU -> pool -> Linear: one prunable group feeding a Linear through a flatten."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def mlp() -> nn.Sequential:
    """Linears on a (B, T, F) sequence."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


class Twice(nn.Module):
    """One Linear applied twice in a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


class Tied(nn.Module):
    """Two Linears sharing one weight (tied embeddings style)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5, bias=False)
        self.b = nn.Linear(5, 5, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class TwoInputs(nn.Module):
    """A conv on each of two inputs, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(3, 4, 1)
        self.right = nn.Conv2d(2, 4, 1, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(y)


# -- hand-computed counts ---------------------------------------------------------------------------
def test_tiny_model_totals_and_per_module():
    cost = count(tiny(), torch.randn(2, 3, 8, 8))
    assert cost.flops == 8 * 3 * 9 * 64 + 4 * 8 == 13856
    assert cost.params == (8 * 3 * 9 + 8) + 16 + (4 * 8 + 4) == 276
    assert cost.modules == {
        "0": ModuleCost(params=224, flops=13824),
        "1": ModuleCost(params=16, flops=0),  # BatchNorm: params only
        "5": ModuleCost(params=36, flops=32),
    }


@pytest.mark.parametrize(
    ("layer", "shape", "flops", "params"),
    [
        # out length (20 - 5) // 2 + 1 = 8
        (nn.Conv1d(4, 6, 5, stride=2), (3, 4, 20), 6 * 4 * 5 * 8, 6 * 4 * 5 + 6),
        # transposed: every one of the 5*5 input positions applies the whole (4, 2, 3, 3) kernel
        (nn.ConvTranspose2d(4, 2, 3, stride=2), (2, 4, 5, 5), 4 * 2 * 9 * 25, 4 * 2 * 9 + 2),
        # depthwise: weight (8, 1, 3, 3) over 6*6 outputs
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), (1, 8, 6, 6), 8 * 1 * 9 * 36, 8 * 9 + 8),
        # two groups: weight (4, 4, 1, 1), half the MACs of the dense 1x1 conv
        (nn.Conv2d(8, 4, 1, groups=2, bias=False), (1, 8, 6, 6), 4 * 4 * 36, 16),
        (nn.Conv3d(2, 3, 2), (1, 2, 3, 3, 3), 3 * 2 * 8 * 8, 3 * 2 * 8 + 3),
        # Linear on a sequence: 3 rows per example
        (nn.Linear(5, 7), (2, 3, 5), 7 * 5 * 3, 7 * 5 + 7),
    ],
)
def test_single_layer_by_hand(layer: nn.Module, shape: tuple[int, ...], flops: int, params: int):
    cost = count(layer, torch.randn(shape))
    assert (cost.flops, cost.params) == (flops, params)
    assert cost.modules == {"": ModuleCost(params, flops)}


def test_flops_are_per_example():
    model = tiny()
    assert count(model, torch.randn(1, 3, 8, 8)) == count(model, torch.randn(5, 3, 8, 8))


def test_module_called_twice_accumulates():
    cost = count(Twice(), torch.randn(4, 6))
    assert cost.modules["fc"] == ModuleCost(params=42, flops=2 * 36)
    assert cost.flops == 72


def test_shared_parameter_counted_once():
    cost = count(Tied(), torch.randn(1, 5))
    assert cost.params == 25
    assert cost.modules == {"a": ModuleCost(25, 25), "b": ModuleCost(25, 25)}
    assert cost.flops == 50


def test_tuple_inputs():
    cost = count(TwoInputs(), (torch.randn(2, 3, 4, 4), torch.randn(2, 2, 4, 4)))
    assert cost.flops == (4 * 3 + 4 * 2) * 16
    assert cost.params == 4 * 3 + 4 + 4 * 2


def test_ratio():
    small, big = Cost(10, 30, {}), Cost(40, 60, {})
    assert small.ratio(big) == (0.25, 0.5)
    params, flops = small.ratio(Cost(40, 0, {}))
    assert params == 0.25 and math.isnan(flops)


# -- attention: projections and the two matmuls ------------------------------------------------------
class SelfAttention(nn.Module):
    """MHA on a (B, L, E) input, called the ways models call it: keywords, seq-first, unbatched."""

    def __init__(self, batch_first: bool = True, call: str = "positional") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.call = call
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.attn.batch_first:
            x = x.transpose(0, 1)  # (L, B, E)
        if self.call == "unbatched":
            x = x.squeeze(0 if self.attn.batch_first else 1)  # (L, E), batch of one
        if self.call == "keywords":
            return self.attn(query=x, key=x, value=x, need_weights=False)[0]
        return self.attn(x, x, x, need_weights=False)[0]


class CrossAttention(nn.Module):
    """L = 10 queries attend to S = 7 keys (separate q, k, v weights when kdim differs)."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True, kdim=kdim, vdim=kdim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.attn(x, memory, memory)[0]  # need_weights=True: averaging the weights is not a matmul


def _mha_macs(length: int, source: int, embed: int, inner: int, kdim: int, v_inner: int | None = None) -> int:
    """MACs per example of MHA by hand: q, k, v and out projections, Q K^T, attn V."""
    v_inner = inner if v_inner is None else v_inner
    projections = length * embed * inner + source * kdim * (inner + v_inner) + length * v_inner * embed
    return projections + length * source * (inner + v_inner)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("call", ["positional", "keywords", "unbatched"])
def test_self_attention_by_hand(batch_first: bool, call: str):
    batch = 1 if call == "unbatched" else 2
    cost = count(SelfAttention(batch_first, call), torch.randn(batch, 10, 32))
    assert cost.flops == 10 * 32 * 96 + 10 * 32 * 32 + 2 * 10 * 10 * 32 == _mha_macs(10, 10, 32, 32, 32)
    assert cost.modules == {
        "attn": ModuleCost(params=96 * 32 + 96, flops=10 * 32 * 96 + 2 * 10 * 10 * 32),  # in_proj + matmuls
        "attn.out_proj": ModuleCost(params=32 * 32 + 32, flops=10 * 32 * 32),
    }


@pytest.mark.parametrize("kdim", [None, 24])
def test_cross_attention_projects_queries_and_keys_at_their_own_lengths(kdim: int | None):
    cost = count(CrossAttention(kdim), (torch.randn(2, 10, 32), torch.randn(2, 7, kdim or 32)))
    assert cost.flops == _mha_macs(10, 7, 32, 32, kdim or 32)


def test_transformer_encoder_layer_is_counted_although_eval_has_a_fused_fast_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    cost = count(layer, torch.randn(2, 10, 32))
    assert cost.flops == _mha_macs(10, 10, 32, 32, 32) + 2 * 10 * 32 * 64
    assert torch.backends.mha.get_fastpath_enabled() == fast_path


def _flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops() // 2  # it counts a MAC as two FLOPs


def test_vit_b_32_by_hand():
    """Patchify conv, 12 encoder layers on 7*7 + 1 tokens (MHA + MLP), classifier."""
    tokens, width, mlp = 50, 768, 3072
    layer = _mha_macs(tokens, tokens, width, width, width) + 2 * tokens * width * mlp
    cost = count(torchvision.models.vit_b_32(), torch.randn(1, 3, 224, 224))
    assert cost.flops == width * 3 * 32 * 32 * 49 + 12 * layer + width * 1000


def test_swin_t_counts_functional_projections_and_window_matmuls():
    """64x64 input: the first stage is 16x16 with C = 96, padded to 21x21 for 7x7 windows (N = 49)."""
    torch.manual_seed(0)
    cost = count(torchvision.models.swin_t(), torch.randn(1, 3, 64, 64))
    positions, window, width = 21 * 21, 49, 96
    assert cost.modules["features.1.0.attn.qkv"].flops == positions * width * 3 * width
    assert cost.modules["features.1.0.attn.proj"].flops == positions * width * width
    assert cost.modules["features.1.0.attn"].flops == 2 * positions * window * width


def tiny_swin(v2: bool) -> nn.Module:
    """Two stages of two blocks, 4x4 windows: a 40x40 input gives 10x10 maps, padded to 12x12."""
    sw = swin_transformer
    block, merge = (sw.SwinTransformerBlockV2, sw.PatchMergingV2) if v2 else (sw.SwinTransformerBlock, sw.PatchMerging)
    return sw.SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10, block=block, downsample_layer=merge)


def tiny_maxvit() -> nn.Module:
    """Two stages; a 32x32 input gives an 8x8 first stage of D = 16, as G = 4 windows of P = 16."""
    return maxvit.MaxVit(
        (32, 32), 8, 4, block_channels=[16, 32], block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0
    )


def test_tiny_maxvit_counts_the_einsum_matmuls():
    cost = count(tiny_maxvit(), torch.randn(1, 3, 32, 32))
    attn = "blocks.0.layers.0.layers.window_attention.attn_layer.1"
    assert cost.modules[attn].flops == 2 * 4 * 16 * 16 * 16
    assert cost.modules[f"{attn}.to_qkv"].flops == 8 * 8 * 16 * 3 * 16


def test_tiny_swin_v2_counts_like_v1():
    """V2's cosine attention has the same matmuls (its cpb_mlp Linears run as modules)."""
    model = tiny_swin(v2=True)
    assert isinstance(model.features[1][0].attn, swin_transformer.ShiftedWindowAttentionV2)
    cost = count(model, torch.randn(1, 3, 40, 40))
    assert cost.modules["features.1.0.attn.qkv"].flops == 12 * 12 * 16 * 3 * 16
    assert cost.modules["features.1.0.attn"].flops == 2 * 12 * 12 * 16 * 16


@pytest.mark.parametrize(
    ("make", "size"),
    [(lambda: tiny_swin(v2=False), 40), (lambda: tiny_swin(v2=True), 40), (tiny_maxvit, 32)],
    ids=["swin", "swin_v2", "maxvit"],
)
def test_attention_models_agree_with_torch_flop_counter(make, size: int):
    """Every matmul and conv counted once: padded window positions included, as they are computed."""
    torch.manual_seed(0)
    model, x = make(), torch.randn(1, 3, size, size)
    assert count(model, x).flops == _flop_counter_macs(model, x)


class ModuleCallingWindowAttention(swin_transformer.ShiftedWindowAttention):
    """A subclass (as a pruned copy might be) that runs `qkv` and `proj` as modules, not functionally."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C), H and W multiples of the window
        v = self.qkv(x).chunk(3, dim=-1)[2]  # (B, H, W, C)
        return self.proj(v)


def test_a_projection_run_as_a_module_is_counted_once():
    stock = swin_transformer.ShiftedWindowAttention(16, [4, 4], [0, 0], num_heads=2)
    subclass = ModuleCallingWindowAttention(16, [4, 4], [0, 0], num_heads=2)
    x = torch.randn(2, 8, 8, 16)
    assert count(subclass, x) == count(stock, x)
    assert count(stock, x).flops == 64 * 16 * (48 + 16) + 2 * 64 * 16 * 16


# -- attention heads: predicted cost when a group owns slices of the packed q | k | v weight -----------------
def _head_graph(model: nn.Module, x: tuple[torch.Tensor, ...], thirds: tuple[int, ...]) -> ChannelGraph:
    """One group of 4 units of width 8 in the named thirds (0: q, 1: k, 2: v) of `attn`'s in_proj."""
    positions = torch.arange(96)
    head = (positions % 32) // 8
    in_proj = torch.where(torch.isin(positions // 32, torch.tensor(thirds)), head, -1)
    members = [Member("attn", "in_proj_weight", 0, in_proj), Member("attn", "in_proj_bias", 0, in_proj)]
    if 2 in thirds:  # v's width is out_proj's input
        members.append(Member("attn.out_proj", "weight", 1, torch.arange(32) // 8))
    group = ChannelGroup("heads", 4, ("attn",), tuple(members), prunable=True)
    return ChannelGraph((group,), tuple(InputSpec.of(t) for t in x), model_type=type(model).__name__)


@pytest.mark.parametrize(
    ("thirds", "kept_q", "kept_v"),
    [((0, 1, 2), 16, 16), ((2,), 32, 16), ((0, 1), 16, 32)],
    ids=["whole heads", "v only", "q and k only"],
)
def test_cost_model_and_count_scale_each_third_of_in_proj(thirds: tuple[int, ...], kept_q: int, kept_v: int):
    """Cross-attention so that q (10 rows) and k, v (7 rows) weigh differently; 2 of 4 units kept."""
    model = CrossAttention()
    x = (torch.randn(2, 10, 32), torch.randn(2, 7, 32))
    graph = _head_graph(model, x, thirds)
    plan = Plan({"heads": GroupPlan(4, (0, 1))}, graph.inputs, graph.model_type)
    predicted = count(model, x, plan=plan, graph=graph)
    assert predicted.flops == _mha_macs(10, 7, 32, kept_q, 32, v_inner=kept_v)
    assert cost_model(model, x, graph).price({"heads": 2}) == (predicted.params, predicted.flops)


# -- a plan's predicted cost is the cost of the model it makes ---------------------------------------
@pytest.fixture(scope="module")
def resnet18() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)


@pytest.fixture(scope="module")
def mobilenet_v2() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(), torch.randn(1, 3, 64, 64)


def _assert_plan_cost_exact(model: nn.Module, x: torch.Tensor, sparsity: float) -> None:
    """count with a plan == count of the applied plan == the cost model's price of its kept counts."""
    graph = trace(model, x)
    plan = make_plan(model, graph, sparsity)
    predicted = count(model, x, plan=plan, graph=graph)
    measured = count(apply_plan(model, plan, graph=graph), x)
    assert (predicted.params, predicted.flops) == (measured.params, measured.flops)
    assert predicted.modules == measured.modules
    cm = cost_model(model, x, graph, score(model, graph, "l1"))
    assert cm.price({n: len(g.keep) for n, g in plan.groups.items()}) == (measured.params, measured.flops)
    if any(g.removed for g in plan.groups.values()):
        assert predicted.params < count(model, x).params


@pytest.mark.parametrize(
    ("make", "shape"),
    [(tiny, (2, 3, 8, 8)), (mlp, (2, 5, 4))],
)
def test_plan_cost_tiny_models(make, shape: tuple[int, ...]):
    _assert_plan_cost_exact(make(), torch.randn(shape), 0.5)


@pytest.mark.parametrize("toy", PRUNABLE_TOYS, ids=lambda t: t.__name__)
def test_plan_cost_toys(toy: type[Toy]):
    """Every coupling topology: transposed, grouped, depthwise, loose and reused parameters, ..."""
    torch.manual_seed(0)
    model = toy()
    _assert_plan_cost_exact(model, model.example(), 0.5)


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_plan_cost_resnet18(resnet18, sparsity: float):
    _assert_plan_cost_exact(*resnet18, sparsity)


def test_plan_cost_mobilenet_v2_depthwise(mobilenet_v2):
    _assert_plan_cost_exact(*mobilenet_v2, 0.5)


def test_plan_cost_vision_transformer():
    """Attention and MLP groups of a tiny ViT (whichever of them `trace` can prune)."""
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    _assert_plan_cost_exact(model, torch.randn(2, 3, 32, 32), 0.5)


def test_plan_without_graph_traces_itself():
    model, x = tiny(), torch.randn(2, 3, 8, 8)
    graph = trace(model, x)
    plan = make_plan(model, graph, 0.5)
    assert count(model, x, plan=plan) == count(model, x, plan=plan, graph=graph)


def test_empty_plan_costs_the_dense_model(resnet18):
    model, x = resnet18
    graph = trace(model, x)
    assert count(model, x, plan=make_plan(model, graph, 0.0), graph=graph) == count(model, x)


# -- the model is left as it was ----------------------------------------------------------------------
def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, {name: m.training for name, m in model.named_modules()}


def _assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, bool]]) -> None:
    state, flags = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(p.grad is None for p in model.parameters())
    # private, but there is no public way to list hooks
    assert not any(m._forward_hooks for m in model.modules())


def test_model_unchanged_in_train_mode():
    model = tiny().train()
    model[1].eval()  # mixed flags must come back exactly
    before = _snapshot(model)
    graph = trace(model, torch.randn(2, 3, 8, 8))
    count(model, torch.randn(2, 3, 8, 8), plan=make_plan(model, graph, 0.5), graph=graph)
    _assert_unchanged(model, before)  # BN running stats did not move: the pass ran in eval mode


def test_model_unchanged_when_forward_fails():
    model = tiny().train()
    before = _snapshot(model)
    with pytest.raises(RuntimeError):
        count(model, torch.randn(2, 5, 8, 8))  # wrong channel count
    _assert_unchanged(model, before)
