"""Iterative pruning: plans compose into one in the original numbering, steps meet their budgets, a stopped
run resumes to the same model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunecore as pc
from prunecore.iterate import prune_iteratively, step_budgets
from prunecore.plan import PlanError, compose
from prunecore.recover import FinetuneError, finetune
from test_recover import digits

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLE = torch.randn(1, 1, 8, 8)


class TwoConvs(nn.Module):
    """Two prunable conv groups, BatchNorm after each, a position-keeping pool and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))  # (B, 12, 8, 8)
        h = F.relu(self.bn2(self.conv2(h)))  # (B, 16, 8, 8)
        return self.head(F.adaptive_avg_pool2d(h, 2).flatten(1))  # (B, 4)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    return finetune(TwoConvs(), digits(), epochs=4, lr=0.1, device="cpu").model


def test_composed_plans_equal_applying_them_one_after_the_other(trained):
    graph = pc.trace(trained, EXAMPLE)
    first = pc.make_plan(trained, graph, {"conv1": 0.25, "conv2": 0.5})
    middle = pc.apply_plan(trained, first, graph=graph)
    second = pc.make_plan(middle, pc.trace(middle, EXAMPLE), {"conv1": 0.5, "conv2": 0.25})
    both = compose(first, second)
    direct, stepwise = pc.apply_plan(trained, both, graph=graph), pc.apply_plan(middle, second)
    assert direct.state_dict().keys() == stepwise.state_dict().keys()
    for name, value in direct.state_dict().items():
        assert torch.equal(value, stepwise.state_dict()[name]), name
    assert {n: g.size for n, g in both.groups.items()} == {n: g.size for n, g in first.groups.items()}
    assert set(both.groups["conv1"].keep) <= set(first.groups["conv1"].keep)
    both.check(graph)
    assert both.fingerprint == graph.fingerprint and pc.Plan.from_json(both.to_json()) == both
    with pytest.raises(PlanError, match="was it made on the model the first one pruned"):
        compose(first, first)  # made on the original, not on what the first plan kept


def test_step_budgets_cut_equal_ratios():
    assert step_budgets(pc.Budget(flops=0.125), 3) == pytest.approx([0.5, 0.25, 0.125])
    with pytest.raises(pc.UserError, match="fraction of the dense model"):
        step_budgets(pc.Budget(flops=5000), 2)


def test_iterative_pruning_meets_each_step_budget_and_its_plan_rebuilds_the_final_model(trained, tmp_path):
    train, held = digits(), digits(64, seed=1, shuffle=False)
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    result = prune_iteratively(trained, EXAMPLE, pc.Budget(flops=0.4), data=held, train=train, steps=2, epochs=1,
                               levels=[0.25, 0.5, 0.75], lr=0.05, device="cpu", workdir=tmp_path)  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert [s.step for s in result.steps] == [1, 2]
    for record in result.steps:
        assert record.flops_kept <= record.target + 1e-9
        assert set(record.metrics) == {"accuracy", "loss"} and len(record.epochs) == 1
    rebuilt = pc.apply_plan(trained, result.plan)  # the composed plan: the original model -> the final one
    rebuilt.load_state_dict(result.model.state_dict(), strict=True)
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(EXAMPLE), result.model(EXAMPLE))
    assert pc.count(rebuilt, EXAMPLE).flops == result.plan.totals.flops_after

    (tmp_path / "step2.pt").unlink()  # stopped after step 2's fine-tuning epoch, before its step file
    resumed = prune_iteratively(trained, EXAMPLE, pc.Budget(flops=0.4), data=held, train=train, steps=2, epochs=1,
                                levels=[0.25, 0.5, 0.75], lr=0.05, device="cpu", workdir=tmp_path,
                                resume=True)  # fmt: skip
    assert resumed.plan.groups == result.plan.groups and resumed.steps == result.steps
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, result.model.state_dict()[name]), name
    with pytest.raises(FinetuneError, match="holds a previous run's steps: pass resume=True"):
        prune_iteratively(trained, EXAMPLE, pc.Budget(flops=0.4), data=held, train=train, steps=2, device="cpu",
                          workdir=tmp_path)  # fmt: skip


def test_statable_steps_end_in_a_model_transformers_reloads(tmp_path):
    """A transformers decoder pruned in 2 steps with statable=True: one count per layer at every step, so the
    final model saves with save_pretrained and from_pretrained rebuilds it exactly. The first step cuts
    every layer to its last KV group; traced again, those layers' heads count query heads, which the
    second step leaves whole (it cannot number them in the original units) instead of failing."""
    pytest.importorskip("transformers")
    import hf_zoo

    model, x = hf_zoo.build("llama")
    tokens = torch.randint(3, 100, (32, 13), generator=torch.Generator().manual_seed(0))
    data = [(tokens[i : i + 8, :-1], tokens[i : i + 8, 1:]) for i in range(0, 32, 8)]  # (8, 12) ids, next ids
    lines: list[str] = []
    result = prune_iteratively(model, x[:1], pc.Budget(flops=0.6), data=data, train=data, steps=2, epochs=1,
                               levels=(0.25, 0.5), metrics=["loss"], statable=True, device="cpu",
                               progress=lines.append)  # fmt: skip
    assert result.steps[-1].flops_kept <= 0.6
    assert {len(result.plan.groups[f"model.layers.{i}.self_attn.q_proj"].keep) for i in range(2)} == {1}
    assert any("keep their channels from here on" in line for line in lines)
    mlps = {len(result.plan.groups[f"model.layers.{i}.mlp.gate_proj"].keep) for i in range(2)}
    assert len(mlps) == 1 and mlps.pop() < 128
    assert len(result.plan.groups["model.embed_tokens"].keep) == 64  # the width stays
    folder = pc.save_pretrained(result.model, tmp_path / "pruned")
    again = type(result.model).from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, result.model(x).logits)
