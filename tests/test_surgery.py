"""apply_plan(): the pruned model computes what the masked one computes, and is an ordinary model."""

import copy

import pytest
import torch
from torch import nn

import toy_models as toys
from prunecore.graph import trace
from prunecore.plan import Plan, PlanError
from prunecore.prune import make_plan, prune
from prunecore.sensitivity import sweep
from prunecore.surgery import apply_plan, kept_positions, sliced_tensors, swap_tensors_


def setup(cls, sparsity=0.5):
    model = toys.randomize_norms_(cls()).eval()
    x = model.example()
    graph = trace(model, x)
    return model, x, graph, make_plan(model, graph, sparsity)


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
@pytest.mark.parametrize("cls", toys.PRUNABLE_TOYS, ids=lambda c: c.__name__)
def test_pruned_equals_masked(cls, sparsity):
    model, x, graph, plan = setup(cls, sparsity)
    pruned = apply_plan(model, plan, graph=graph)
    masked = apply_plan(model, plan, mode="mask", graph=graph)
    with torch.no_grad():
        out_pruned, out_masked, out_dense = pruned(x), masked(x), model(x)
    assert out_pruned.shape == out_dense.shape
    torch.testing.assert_close(out_pruned, out_masked, rtol=1e-5, atol=1e-6)
    n_pruned = sum(p.numel() for p in pruned.parameters())
    n_dense = sum(p.numel() for p in model.parameters())
    assert n_pruned < n_dense if graph.prunable else n_pruned == n_dense
    assert sum(p.numel() for p in masked.parameters()) == n_dense


@pytest.mark.parametrize("cls", toys.PRUNABLE_TOYS, ids=lambda c: c.__name__)
def test_input_model_is_never_mutated(cls):
    model = toys.randomize_norms_(cls()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = model.example()
    graph = trace(model, x)
    plan = make_plan(model, graph, 0.5, criterion="l2")
    apply_plan(model, plan, graph=graph)
    apply_plan(model, plan, mode="mask")
    prune(model, x, 0.3)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_module_attributes_follow_the_tensors():
    model, x, graph, plan = setup(toys.Depthwise)
    pruned = apply_plan(model, plan, graph=graph)
    kept = len(plan.groups["expand.0"].keep)
    assert pruned.expand[0].out_channels == kept and pruned.expand[1].num_features == kept
    assert pruned.dw[0].in_channels == pruned.dw[0].out_channels == pruned.dw[0].groups == kept
    assert pruned.mult.groups == kept and pruned.mult.out_channels == 2 * kept
    assert pruned.project.in_channels == 2 * kept


def test_grouped_conv_keeps_group_width():
    model, x, graph, plan = setup(toys.Grouped)
    pruned = apply_plan(model, plan, graph=graph)
    conv = pruned.grouped[0]
    assert conv.groups == 2 and conv.in_channels == 4 and conv.out_channels == 6
    assert conv.weight.shape == (6, 2, 3, 3)


def test_a_depthwise_conv_cut_to_one_channel_is_depthwise_again_when_its_weight_comes_back():
    """The sweep swaps level after level into one working copy: a 1-channel depthwise conv has groups=1 like
    an ordinary conv, and swapping the full weight back must restore groups, not keep 1."""
    model, x, graph, _ = setup(toys.Depthwise)
    name = next(g.name for g in graph.prunable if "dw.0" in [m.module for m in g.members])
    work = copy.deepcopy(model)
    before = {n: (m.in_channels, m.out_channels, m.groups) for n, m in work.named_modules() if isinstance(m, nn.Conv2d)}
    one = make_plan(model, graph, {name: 0.95})  # keeps one unit of the 8
    old = swap_tensors_(work, sliced_tensors(work, kept_positions(graph, one)))
    assert (work.dw[0].groups, work.dw[0].in_channels, work.mult.groups) == (1, 1, 1)
    swap_tensors_(work, old)
    assert {n: (m.in_channels, m.out_channels, m.groups) for n, m in work.named_modules()
            if isinstance(m, nn.Conv2d)} == before  # fmt: skip
    torch.testing.assert_close(work(x), model(x), rtol=0, atol=0)
    curves = sweep(model, [x], x, levels=[0.9, 0.1], metric="kl", progress=False, graph=graph, groups=[name])
    alone = sweep(model, [x], x, levels=[0.1], metric="kl", progress=False, graph=graph, groups=[name])
    assert curves[curves.sparsity == 0.1].kl.item() == pytest.approx(alone[alone.sparsity == 0.1].kl.item())


def test_pruned_model_trains():
    model, x, graph, plan = setup(toys.TwoResiduals)
    pruned = apply_plan(model, plan, graph=graph).train()
    loss = pruned(x).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in pruned.parameters())


def test_state_dict_reloads_into_rebuilt_architecture(tmp_path):
    model, x, graph, plan = setup(toys.SqueezeExcite)
    pruned = apply_plan(model, plan, graph=graph)
    torch.save(pruned.state_dict(), tmp_path / "pruned.pt")
    (tmp_path / "plan.json").write_text(plan.to_json())

    fresh = toys.SqueezeExcite().eval()  # different random weights, same architecture
    rebuilt = apply_plan(fresh, Plan.from_json((tmp_path / "plan.json").read_text()))
    rebuilt.load_state_dict(torch.load(tmp_path / "pruned.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x), rtol=0, atol=0)


def test_plan_json_round_trip():
    _, _, _, plan = setup(toys.Concat)
    assert Plan.from_json(plan.to_json()) == plan


def test_plan_for_another_model_is_rejected():
    _, _, _, plan = setup(toys.Concat)
    other = toys.Chunk().eval()
    with pytest.raises(PlanError, match="plan is for a Concat, the model is a Chunk"):
        apply_plan(other, plan, graph=trace(other, other.example()))


def test_pruning_a_fixed_group_is_rejected():
    model, x, graph, _ = setup(toys.UnknownOp)
    with pytest.raises(PlanError, match="cumsum"):
        make_plan(model, graph, {"features.0": 0.5})


def test_unknown_mode_is_rejected():
    model, x, graph, plan = setup(toys.Concat)
    with pytest.raises(ValueError, match="mode"):
        apply_plan(model, plan, mode="zero", graph=graph)


def test_round_to_shapes():
    model = toys.randomize_norms_(toys.TwoResiduals()).eval()
    x = model.example()
    graph = trace(model, x)
    plan = make_plan(model, graph, 0.3, round_to=4)
    assert {name: len(g.keep) for name, g in plan.groups.items()} == {"stem.0": 4, "block1.0.0": 4, "block2.0.0": 4}
    pruned = apply_plan(model, plan, graph=graph)
    assert pruned.stem[0].out_channels == 4


def test_training_only_branch_is_pruned_consistently():
    """GoogLeNet's auxiliary heads run only in training mode; they must follow the pruning too."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.googlenet(init_weights=False, aux_logits=True).eval()
    x = torch.randn(2, 3, 96, 96)
    pruned = prune(model, x, 0.3)
    pruned.train()
    out = pruned(x)
    assert out.logits.shape == out.aux_logits1.shape == (2, 1000)


def test_prune_shrinks_sequential_model():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3))
    pruned = prune(model.eval(), torch.randn(1, 3, 8, 8), 0.25)
    assert pruned[0].out_channels == 12 and pruned[1].num_features == 12 and pruned[3].in_channels == 12


def test_attention_bookkeeping_after_removing_heads_and_width():
    model, x, graph, _ = setup(toys.TinyTransformer)
    plan = make_plan(model, graph, {"attn": 0.5, "patch": 0.25})
    pruned = apply_plan(model, plan, graph=graph)
    attn = pruned.attn
    assert type(attn).__name__ == "PrunedMultiheadAttention"
    assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (2, 4, 12)
    assert attn.in_proj_weight.shape == (3 * 2 * 4, 12) and attn.out_proj.weight.shape == (12, 8)
    assert pruned.ln1.normalized_shape == (12,) and pruned.cls.shape == (1, 1, 12) and pruned.pos.shape == (1, 5, 12)
    untouched = apply_plan(model, make_plan(model, graph, {"mlp.0": 0.5}), graph=graph)
    assert type(untouched.attn) is nn.MultiheadAttention  # the stock class while widths agree


def test_group_norm_keeps_its_group_width():
    model, x, graph, plan = setup(toys.GroupNormNet)
    pruned = apply_plan(model, plan, graph=graph)
    assert (pruned.gn1.num_groups, pruned.gn1.num_channels) == (2, 4)
    assert pruned.gn1.num_channels // pruned.gn1.num_groups == 2


def test_masked_layer_norm_uses_kept_statistics_and_keeps_the_parameters():
    model, x, graph, plan = setup(toys.TinyTransformer, 0.5)
    masked = apply_plan(model, plan, mode="mask", graph=graph)
    assert masked.state_dict().keys() == model.state_dict().keys()
    assert masked.ln1.weight.shape == model.ln1.weight.shape
    # zeroing alone (what mask mode does to every other layer) computes something else
    zeroed = apply_plan(model, plan, mode="mask", graph=graph)
    for name in ("ln1", "ln2", "ln"):
        norm = getattr(zeroed, name)
        norm.__class__ = nn.LayerNorm
    with torch.no_grad():
        assert not torch.allclose(zeroed(x), masked(x), atol=1e-4)
        torch.testing.assert_close(masked(x), apply_plan(model, plan, graph=graph)(x), rtol=1e-5, atol=1e-6)


def test_pruned_transformer_traces_again():
    model, x, graph, plan = setup(toys.TinyTransformer, 0.5)
    pruned = apply_plan(model, plan, graph=graph)
    again = trace(pruned, x)
    assert again["attn"].size == 2 and again["patch"].size == 8 and again["patch"].prunable
