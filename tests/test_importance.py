"""Criteria: registry, exact aggregation over a group's members, ranking."""

import pytest
import torch
from torch import nn

import toy_models as toys
from prunecore.graph import trace
from prunecore.importance import list_criteria, score
from prunecore.prune import make_plan


def batches(model, n=3):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(model.input_shape, generator=gen), torch.randint(0, 3, (2,), generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("criterion", list_criteria())
def test_every_criterion_scores_every_prunable_unit(criterion):
    model = toys.randomize_norms_(toys.SqueezeExcite()).eval()
    graph = trace(model, model.example())
    scores = score(model, graph, criterion, data=batches(model))
    assert set(scores) == {g.name for g in graph.prunable}
    for g in graph.prunable:
        assert scores[g.name].shape == (g.size,)
        assert torch.isfinite(scores[g.name]).all() and (scores[g.name] >= 0).all()


def test_l1_sums_every_member():
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -2.0]).reshape(2, 1, 1, 1))
        model[1].weight.copy_(torch.tensor([0.5, 0.25]))
        model[1].bias.copy_(torch.tensor([-1.0, 0.0]))
        model[2].weight.copy_(torch.tensor([3.0, -4.0]).reshape(1, 2, 1, 1))
    graph = trace(model, torch.randn(1, 1, 4, 4))
    s = score(model, graph, "l1")["0"]
    torch.testing.assert_close(s, torch.tensor([1 + 0.5 + 1 + 3, 2 + 0.25 + 0 + 4], dtype=torch.float64))
    s2 = score(model, graph, "l2")["0"]
    torch.testing.assert_close(s2, torch.tensor([1 + 0.25 + 1 + 9, 4 + 0.0625 + 16], dtype=torch.float64).sqrt())
    bn = score(model, graph, "bn_scale")["0"]
    torch.testing.assert_close(bn, torch.tensor([0.5, 0.25], dtype=torch.float64))


def test_plan_keeps_highest_scores():
    model = toys.randomize_norms_(toys.Concat()).eval()
    graph = trace(model, model.example())
    plan = make_plan(model, graph, 0.5, criterion="l1")
    s = score(model, graph, "l1")["b.0"]
    kept = set(plan.groups["b.0"].keep)
    assert min(s[i] for i in kept) >= max(s[i] for i in range(6) if i not in kept)


def test_taylor_needs_data():
    model = toys.Concat().eval()
    graph = trace(model, model.example())
    with pytest.raises(ValueError, match="needs data"):
        score(model, graph, "taylor")


def test_taylor_is_abs_sum_of_weight_times_gradient():
    """|sum over the unit's parameters of w * dL/dw|, with L the mean loss over the batches."""
    model = toys.randomize_norms_(toys.Concat()).eval()
    graph = trace(model, model.example())
    data = batches(model, 2)
    s = score(model, graph, "taylor", data=data)

    params = dict(model.named_parameters())
    loss = sum(nn.functional.cross_entropy(model(x), y) for x, y in data) / len(data)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    expected = torch.zeros(4, dtype=torch.float64)
    for m in graph["a.0"].members:
        if m.path in params:
            w_g = (params[m.path] * grads[m.path]).detach()
            per_pos = w_g.sum(dim=[d for d in range(w_g.dim()) if d != m.dim]) if w_g.dim() > 1 else w_g
            for pos, unit in enumerate(m.unit_of.tolist()):
                if unit >= 0:
                    expected[unit] += per_pos[pos].item()
    torch.testing.assert_close(s["a.0"], expected.abs(), rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())


def test_random_is_seeded():
    model = toys.Concat().eval()
    graph = trace(model, model.example())
    a, b, c = (score(model, graph, "random", seed=s) for s in (1, 1, 2))
    assert torch.equal(a["a.0"], b["a.0"]) and not torch.equal(a["a.0"], c["a.0"])


def test_unknown_criterion():
    model = toys.Concat().eval()
    graph = trace(model, model.example())
    with pytest.raises(ValueError, match="unknown criterion 'l3'; choose one of bn_scale, l1, l2, random, taylor"):
        score(model, graph, "l3")
