"""What prunecore knows about timm: fused-qkv attention heads, norm-act layers, weight-standardised convs."""

import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

from prunecore.cost import cost_model, count  # noqa: E402
from prunecore.graph import trace  # noqa: E402
from prunecore.prune import make_plan  # noqa: E402
from prunecore.surgery import apply_plan  # noqa: E402
from toy_models import randomize_norms_  # noqa: E402


def build(name: str, **kwargs) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_norms_(timm.create_model(name, pretrained=False, num_classes=10, **kwargs)).eval()
    return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def assert_pruned_equals_masked(model, x, graph, plan):
    pruned, masked = apply_plan(model, plan, graph=graph), apply_plan(model, plan, mode="mask", graph=graph)
    with torch.no_grad():
        out, ref = pruned(x), masked(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * max(ref.abs().max().item(), 1.0))
    return pruned


def test_vit_heads_go_whole_and_the_module_runs_pruned():
    model, x = build("test_vit", img_size=32)
    graph = trace(model, x)
    attn = "blocks.0.attn"
    heads = graph[attn]
    assert heads.prunable and heads.size == model.blocks[0].attn.num_heads
    assert {(m.path, m.dim) for m in heads.members} >= {(f"{attn}.qkv.weight", 0), (f"{attn}.proj.weight", 1)}
    plan = make_plan(model, graph, {attn: 0.5})
    pruned = assert_pruned_equals_masked(model, x, graph, plan)
    block = pruned.blocks[0].attn
    assert block.num_heads == len(plan.groups[attn].keep) and block.attn_dim == block.num_heads * block.head_dim
    # the attention matmuls are counted, and the cost model prices the plan as count() measures it
    measured = count(pruned, x)
    assert measured.modules[attn].flops > 0
    assert cost_model(model, x, graph).price({n: len(g.keep) for n, g in plan.groups.items()}) == (
        measured.params, measured.flops)  # fmt: skip


def test_every_vit_group_at_half():
    model, x = build("test_vit", img_size=32)
    graph = trace(model, x)
    assert [g.reason for g in graph if not g.prunable] == ["reaches the model output"]
    assert_pruned_equals_masked(model, x, graph, make_plan(model, graph, 0.5))


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet", "test_convnext", "test_byobnet"])
def test_norm_act_models_prune_fully(name):
    """timm's BatchNormAct2d / LayerNorm2d / GroupNorm variants no longer stop their groups."""
    model, x = build(name)
    graph = trace(model, x)
    assert [g.reason for g in graph if not g.prunable] == ["reaches the model output"]
    pruned = assert_pruned_equals_masked(model, x, graph, make_plan(model, graph, 0.5))
    assert sum(p.numel() for p in pruned.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())


def test_weight_standardised_convs_keep_their_inputs():
    model, x = build("test_nfnet")
    graph = trace(model, x)
    stem = graph["stem.conv1"]
    assert not stem.prunable and "weight standardisation runs over its input channels" in stem.reason
    assert_pruned_equals_masked(model, x, graph, make_plan(model, graph, 0.5))


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_reparameterisable_blocks_prune_in_train_and_deploy_form(name):
    """RepVGG / MobileOne: the multi-branch training form and the fused single-conv deploy form."""
    from timm.utils.model import reparameterize_model

    train, x = build(name)
    for model in (train, reparameterize_model(train)):  # a fused copy; `train` keeps its branches
        graph = trace(model, x)
        assert [g.reason for g in graph if not g.prunable] == ["reaches the model output"]
        assert_pruned_equals_masked(model, x, graph, make_plan(model, graph, 0.5))
    assert any("rbr" in name or "conv_kxk" in name for name, _ in train.named_modules())


def test_metaformer_heads_are_tied_to_the_width_they_reshape_back_to():
    """CAFormer's attention reshapes its output to the input width: heads and width go together."""
    from timm.models import metaformer

    torch.manual_seed(0)
    model = metaformer.MetaFormer(
        depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=10,
        token_mixers=[metaformer.SepConv, metaformer.SepConv, metaformer.Attention, metaformer.Attention],
        norm_layers=[metaformer.LayerNorm2dNoBias] * 2 + [metaformer.LayerNormNoBias] * 2,
    )  # a small CAFormer  # fmt: skip
    model = randomize_norms_(model).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    graph = trace(model, x)
    assert [g.reason for g in graph if not g.prunable] == ["reaches the model output"]
    attn = "stages.3.blocks.0.token_mixer"
    width = next(g for g in graph if any(m.path == f"{attn}.qkv.weight" and m.dim == 1 for m in g.members))
    assert width.size == model.stages[3].blocks[0].token_mixer.num_heads == 4  # one unit per head
    pruned = assert_pruned_equals_masked(model, x, graph, make_plan(model, graph, 0.5))
    mixer = pruned.stages[3].blocks[0].token_mixer
    assert mixer.num_heads == 2 and mixer.attention_dim == 64 == mixer.proj.out_features


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "beit_base_patch16_224"])
def test_beit_and_eva_heads_take_their_biases_and_bias_table_columns(name):
    kwargs = {"img_size": 32, "depth": 2} if name.startswith("beit") else {"img_size": 28, "depth": 2}
    model, _ = build(name, **kwargs)
    size = kwargs["img_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    graph = trace(model, x)
    assert [g.reason for g in graph if not g.prunable] == ["reaches the model output"]
    attn = "blocks.0.attn"
    heads = next(g for g in graph if any(m.path == f"{attn}.qkv.weight" and m.dim == 0 for m in g.members))
    paths = {(m.path, m.dim) for m in heads.members}
    assert {(f"{attn}.q_bias", 0), (f"{attn}.v_bias", 0), (f"{attn}.proj.weight", 1)} <= paths
    if name.startswith("beit"):
        assert (f"{attn}.relative_position_bias_table", 1) in paths
    plan = make_plan(model, graph, 0.5)
    pruned = assert_pruned_equals_masked(model, x, graph, plan)
    assert pruned.blocks[0].attn.num_heads == len(plan.groups[heads.name].keep) < model.blocks[0].attn.num_heads


def test_pvt_v2_reduction_attention_prunes_with_its_width():
    """PVT-v2: heads, the spatial-reduction conv and its LayerNorm follow the stage width."""
    model, _ = build("pvt_v2_b0")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    graph = trace(model, x)
    attn = "stages.1.blocks.0.attn"
    width = next(g for g in graph if any(m.path == f"{attn}.q.weight" and m.dim == 1 for m in g.members))
    assert width.prunable and width.size == model.stages[1].blocks[0].attn.num_heads
    assert {(f"{attn}.sr.weight", 0), (f"{attn}.norm.weight", 0)} <= {(m.path, m.dim) for m in width.members}
    plan = make_plan(model, graph, 0.5)
    pruned = assert_pruned_equals_masked(model, x, graph, plan)
    kept = len(plan.groups[width.name].keep)
    assert pruned.stages[1].blocks[0].attn.num_heads == kept and pruned.stages[1].blocks[0].attn.dim == kept * 32


def test_davit_window_and_channel_attention_heads():
    """DaViT: both attentions reshape their heads back to the input width; heads go whole with it."""
    from timm.models import davit

    torch.manual_seed(0)
    model = davit.DaVit(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), num_classes=10)
    model = randomize_norms_(model).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    graph = trace(model, x)
    fixed = {g.name: g.reason for g in graph if not g.prunable}
    # stage 0 has one head, so its width is one unit
    assert fixed == {"stages.0.blocks.0.0.attn": "has a single unit; removing it would remove the whole layer",
                     "head.fc": "reaches the model output"}  # fmt: skip
    pruned = assert_pruned_equals_masked(model, x, graph, make_plan(model, graph, 0.5))
    assert pruned.stages[3].blocks[0][0].attn.num_heads == 2


def _build_small(family: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """One small member of each family whose attention a `Heads` record describes."""
    from timm.models import nest, volo

    torch.manual_seed(0)
    size = 64 if family == "swinv2_cr_tiny_224" else 32
    if family == "volo":
        model = volo.VOLO(img_size=32, layers=(1, 1, 1, 1), embed_dims=(64, 128, 128, 128), num_heads=(2, 4, 4, 4))
    elif family == "nest":
        model = nest.Nest(img_size=32, depths=(1, 1, 1), embed_dims=(32, 64, 128), num_heads=(2, 4, 8))
    else:
        kwargs = {
            "cait_xxs24_224": dict(patch_size=8, depth=1, depth_token_only=1),
            "xcit_nano_12_p16_224": dict(depth=1, cls_attn_layers=1),
            "convit_tiny": dict(patch_size=8, depth=2, local_up_to_layer=1),
            "swinv2_cr_tiny_224": dict(depths=(1, 1, 1, 1), window_size=2, embed_dim=48),
            "twins_svt_small": dict(depths=(1, 1, 1, 1)),
        }[family]
        model = timm.create_model(family, pretrained=False, img_size=size, **kwargs)
    model.reset_classifier(10)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return randomize_norms_(model).eval(), x


@pytest.mark.parametrize(
    "family",
    ["cait_xxs24_224", "xcit_nano_12_p16_224", "convit_tiny", "volo", "swinv2_cr_tiny_224", "twins_svt_small", "nest"],
)
def test_attention_with_heads_in_more_places(family):
    """CaiT, XCiT, ConViT, VOLO, Swin-V2-CR, Twins, NesT: every group prunes, heads go whole, FLOPs price."""
    from prunecore.ops.timm import HEADS, _head_dim

    model, x = _build_small(family)
    graph = trace(model, x)
    assert [g.reason for g in graph if not g.prunable] == ["reaches the model output"]
    attns = {n: m for n, m in model.named_modules() if type(m) in HEADS}
    assert attns
    head_dims = {n: m.head_dim if not HEADS[type(m)].tied else m.proj.in_features // m.num_heads
                 for n, m in attns.items()}  # fmt: skip
    plan = make_plan(model, graph, 0.5)
    pruned = assert_pruned_equals_masked(model, x, graph, plan)
    for name, before in attns.items():
        after = pruned.get_submodule(name)
        assert after.num_heads < before.num_heads or before.num_heads == 1
        assert after.num_heads * head_dims[name] == after.proj.in_features
    assert {_head_dim(pruned.get_submodule(n)) for n in attns if hasattr(attns[n], "scale")} <= set(head_dims.values())
    measured = count(pruned, x)
    assert cost_model(model, x, graph).price({n: len(g.keep) for n, g in plan.groups.items()}) == (
        measured.params, measured.flops)  # fmt: skip


def test_nest_heads_are_tied_head_minor():
    """NesT lays its output out d * H + h: width channel j belongs to head j % H, not j // d."""
    model, x = _build_small("nest")
    graph = trace(model, x)
    attn = "levels.0.transformer_encoder.0.attn"
    heads = graph[attn]
    width = next(m for m in heads.members if m.path == f"{attn}.proj.weight" and m.dim == 1)
    num_heads = model.get_submodule(attn).num_heads
    assert width.unit_of.tolist() == list(range(num_heads)) * (width.unit_of.numel() // num_heads)


def test_a_slice_that_takes_every_channel_follows_them():
    """GhostNet's `out[:, :out_chs]` is whole when out_chs is even; pruned, `out_chs` shrinks with it."""
    model, x = build("ghostnet_050")
    graph = trace(model, x)
    ghost = "blocks.1.0.ghost1"
    module = model.get_submodule(ghost)
    assert module.out_chs == 2 * module.primary_conv[0].out_channels
    plan = make_plan(model, graph, 0.5)
    pruned = assert_pruned_equals_masked(model, x, graph, plan).get_submodule(ghost)
    assert pruned.out_chs == pruned.primary_conv[0].out_channels + pruned.cheap_operation[0].out_channels
    assert pruned.out_chs < module.out_chs


def test_a_slice_that_drops_channels_fixes_them():
    """`x[:, :k]` with k short of the channels would keep the wrong ones once channels go: fixed, with a reason."""

    class Cut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 1)
            self.head = torch.nn.Conv2d(7, 4, 1)

        def forward(self, x):
            return self.head(self.conv(x)[:, :7])

    graph = trace(Cut(), torch.randn(1, 3, 4, 4))
    assert graph["conv"].reason.startswith("is sliced by getitem")


def test_library_records_load_once_the_users_code_imports_the_library():
    """prunecore imports neither torchvision nor timm itself (seconds per worker); timm's records apply once it is."""
    code = """
import sys, torch
import prunecore.workers
from prunecore.graph import trace
mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
assert trace(mlp, torch.randn(1, 4))["0"].prunable
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm"))
assert not loaded, loaded[:5]
import timm
model = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32).eval()
heads = trace(model, torch.randn(1, 3, 32, 32))["blocks.0.attn"]
assert heads.prunable and heads.size == model.blocks[0].attn.num_heads, heads
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
