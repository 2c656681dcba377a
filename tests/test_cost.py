"""`count`: hand-computed MACs and params, predicted plan cost == cost of the applied plan, no mutation."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from prunecore.cost import Cost, ModuleCost, count
from prunecore.graph import trace
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
    graph = trace(model, x)
    plan = make_plan(model, graph, sparsity)
    predicted = count(model, x, plan=plan, graph=graph)
    measured = count(apply_plan(model, plan, graph=graph), x)
    assert (predicted.params, predicted.flops) == (measured.params, measured.flops)
    assert predicted.modules == measured.modules
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
