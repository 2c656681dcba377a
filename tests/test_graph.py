"""trace(): which channels are tied together, and which must stay."""

import inspect

import pytest
import torch
from torch import nn

import toy_models as toys
from prunecore.graph import TraceError, trace


def graph_of(cls):
    model = cls().eval()
    return trace(model, model.example())


def members(group):
    return {(m.module, m.tensor, m.dim): m.unit_of.tolist() for m in group.members}


def test_residual_adds_share_one_group():
    g = graph_of(toys.TwoResiduals)
    stem = g["stem.0"]
    assert stem.producers == ("stem.0", "block1.1", "block2.1")
    assert stem.size == 8 and stem.prunable
    m = members(stem)
    # every consumer of the residual stream loses the same channels
    for slot in [("block1.0.0", "weight", 1), ("block2.0.0", "weight", 1), ("head", "weight", 1), ("stem.1", "running_var", 0)]:
        assert m[slot] == list(range(8))
    assert [x.name for x in g.prunable] == ["stem.0", "block1.0.0", "block2.0.0"]


def test_concat_maps_offsets_to_groups():
    g = graph_of(toys.Concat)
    assert members(g["a.0"])[("fuse.0", "weight", 1)] == [0, 1, 2, 3] + [-1] * 6
    assert members(g["b.0"])[("fuse.0", "weight", 1)] == [-1] * 4 + list(range(6))


def test_chunk_ties_the_halves():
    g = graph_of(toys.Chunk)
    stem = g["stem.0"]
    assert stem.size == 4  # 8 channels, paired across the halves
    assert members(stem)[("stem.0", "weight", 0)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert members(stem)[("left", "weight", 1)] == [0, 1, 2, 3]
    assert g["left"].producers == ("left", "right")


def test_literal_split_keeps_channels_with_reason():
    g = graph_of(toys.FixedSplit)
    assert not g["stem.0"].prunable
    assert "split" in g["stem.0"].reason


def test_shared_input_branches_add_into_one_group():
    g = graph_of(toys.SharedInput)
    stem = members(g["stem.0"])
    assert stem[("p.0", "weight", 1)] == stem[("q.0", "weight", 1)] == list(range(6))
    assert g["p.0"].producers == ("p.0", "q.0")


@pytest.mark.parametrize("cls", [toys.FlattenLinear, toys.ViewLinear])
def test_flatten_into_linear_expands_each_channel(cls):
    g = graph_of(cls)
    group = g.groups[0]
    fc = next(m for m in group.members if m.tensor == "weight" and m.dim == 1 and "fc" in m.module)
    spatial = fc.unit_of.numel() // 6
    assert fc.unit_of.tolist() == [c for c in range(6) for _ in range(spatial)]


def test_hardcoded_view_is_not_pruned():
    g = graph_of(toys.HardcodedView)
    assert not g["features.0"].prunable and "reshaped" in g["features.0"].reason


def test_depthwise_convs_join_their_input_group():
    g = graph_of(toys.Depthwise)
    group = g["expand.0"]
    assert set(group.producers) == {"expand.0", "dw.0", "mult"}
    m = members(group)
    assert m[("dw.0", "weight", 0)] == list(range(8))
    assert m[("mult", "weight", 0)] == [c for c in range(8) for _ in range(2)]
    assert m[("project", "weight", 1)] == [c for c in range(8) for _ in range(2)]
    assert ("dw.0", "weight", 1) not in m  # depthwise weight has one input channel per group


def test_grouped_conv_removes_whole_groups():
    g = graph_of(toys.Grouped)
    group = g["reduce.0"]
    assert group.size == 4 and group.channels == 8
    m = members(group)
    assert m[("reduce.0", "weight", 0)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert m[("grouped.0", "weight", 0)] == [c for c in range(4) for _ in range(3)]
    assert m[("expand", "weight", 1)] == [c for c in range(4) for _ in range(3)]


def test_squeeze_excitation_joins_feature_group():
    g = graph_of(toys.SqueezeExcite)
    assert g["features.0"].producers == ("features.0", "excite")
    assert members(g["features.0"])[("squeeze", "weight", 1)] == list(range(8))
    assert g["squeeze"].prunable


def test_broadcast_map_does_not_tie_channels():
    g = graph_of(toys.SpatialAttention)
    assert g["features.0"].prunable
    assert members(g["features.0"])[("attn", "weight", 1)] == list(range(8))


def test_conv_transpose_weight_dims():
    g = graph_of(toys.Transposed)
    assert members(g["down.0"])[("up", "weight", 0)] == list(range(6))
    up = members(g["up"])
    assert up[("up", "weight", 1)] == list(range(5)) and up[("bn", "running_mean", 0)] == list(range(5))


def test_grouped_conv_transpose():
    g = graph_of(toys.GroupedTransposed)
    group = g["down.0"]
    assert group.size == 4 and "up" in group.producers
    m = members(group)
    assert m[("up", "weight", 0)] == [c for c in range(4) for _ in range(2)]
    assert m[("out", "weight", 1)] == [c for c in range(4) for _ in range(3)]


def test_conv1d():
    g = graph_of(toys.Conv1dNet)
    assert members(g["c1"])[("bn", "weight", 0)] == list(range(8))
    assert members(g["c2"])[("fc", "weight", 1)] == list(range(6))


def test_channel_shuffle_moves_whole_columns():
    g = graph_of(toys.ChannelShuffle)
    group = g["a.0"]
    assert group.size == 4 and group.producers == ("a.0", "b.0")
    # after the shuffle, column j holds a's channel j and b's channel j side by side
    assert members(group)[("after", "weight", 1)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_loose_parameter_is_a_member():
    g = graph_of(toys.LooseParameter)
    assert members(g["features.0"])[("", "scale", 1)] == list(range(8))


def test_reused_module_ties_its_input_and_output():
    g = graph_of(toys.Reused)
    assert g["stem.0"].producers == ("stem.0", "shared")
    assert members(g["stem.0"])[("shared", "weight", 1)] == list(range(8))


def test_unknown_op_blocks_with_reason():
    g = graph_of(toys.UnknownOp)
    assert not g["features.0"].prunable
    assert "cumsum" in g["features.0"].reason
    assert g["mid.0"].prunable


def test_values_leaving_the_tensor_world_block_their_channels():
    g = graph_of(toys.ToList)
    assert not g["features.0"].prunable and "non-tensor" in g["features.0"].reason


def test_model_output_is_not_prunable():
    g = graph_of(toys.Concat)
    assert not g["head"].prunable and g["head"].reason == "reaches the model output"


def test_control_flow_on_values_keeps_the_channels_it_reads():
    """The model runs for real, so a branch on a value traces; the channels it reads are kept."""
    model = toys.DataDependent().eval()
    g = trace(model, model.example())
    line = inspect.getsourcelines(toys.DataDependent.forward)[1] + 2  # `if x.sum() > 0:`
    assert not g["features.0"].prunable
    assert g["features.0"].reason == f"is reduced over by sum in DataDependent (toy_models.py:{line})"


def test_leaf_modules_are_opaque():
    model = toys.TwoResiduals().eval()
    g = trace(model, model.example(), leaf_modules=(nn.Sequential,))
    # the Sequentials are never entered, so only the head's channels are known, and it is fixed
    assert [grp.name for grp in g] == ["head"] and not g["head"].prunable


def test_wrong_input_shape_raises_clear_error():
    model = toys.Concat().eval()
    with pytest.raises(TraceError, match="example inputs"):
        trace(model, torch.randn(1, 5, 8, 8))


def test_trace_leaves_model_untouched():
    model = toys.randomize_norms_(toys.TwoResiduals()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace(model, model.example())
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_group_names_are_stable_across_traces():
    a, b = graph_of(toys.SqueezeExcite), graph_of(toys.SqueezeExcite)
    assert [g.name for g in a] == [g.name for g in b]
    assert [g.size for g in a] == [g.size for g in b]


def _members(group) -> set[tuple[str, int]]:
    return {(m.path, m.dim) for m in group.members}


def test_transformer_embedding_dim_couples_token_position_norms_and_projections():
    g = graph_of(toys.TinyTransformer)
    embed = g["patch"]
    assert embed.prunable and embed.size == 16
    assert {("cls", 2), ("pos", 2), ("ln1.weight", 0), ("ln2.bias", 0), ("ln.weight", 0), ("attn.in_proj_weight", 1),
            ("attn.out_proj.weight", 0), ("mlp.0.weight", 1), ("mlp.2.weight", 0),
            ("head.weight", 1)} <= _members(embed)
    assert dict(g.norm_dims) == {"ln1": -1, "ln2": -1, "ln": -1}


def test_attention_heads_go_whole():
    g = graph_of(toys.TinyTransformer)
    heads = g["attn"]
    assert heads.prunable and heads.size == 4 and heads.producers[0] == "attn"
    rows = next(m for m in heads.members if m.path == "attn.in_proj_weight" and m.dim == 0)
    assert rows.unit_of.tolist() == [h for _ in range(3) for h in range(4) for _ in range(4)]  # (q|k|v, head, head_dim)
    assert _members(heads) == {("attn.in_proj_weight", 0), ("attn.in_proj_bias", 0), ("attn.out_proj.weight", 1)}


def test_used_attention_weights_keep_the_heads():
    class UsesWeights(toys.TinyTransformer):
        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            out, weights = self.attn(x, x, x)  # head-averaged weights depend on every head
            return self.head(out.mean(1)) + weights.mean()

    g = graph_of(UsesWeights)
    assert not g["attn"].prunable and "averaged" in g["attn"].reason


def test_group_norm_units_are_whole_norm_groups():
    g = graph_of(toys.GroupNormNet)
    assert (g["conv1"].size, g["conv1"].channels) == (4, 8) and (g["conv2"].size, g["conv2"].channels) == (3, 6)
    gn = next(m for m in g["conv1"].members if m.path == "gn1.weight")
    assert gn.unit_of.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_channels_last_block_with_layer_scale_and_channels_first_norm():
    g = graph_of(toys.ChannelsLast)
    stage = g["stem.0"]
    assert stage.prunable
    assert {("stem.1.weight", 0), ("dw.weight", 0), ("norm.weight", 0), ("up.weight", 1), ("down.weight", 0),
            ("layer_scale", 0), ("head.0.weight", 0), ("fc.weight", 1)} <= _members(stage)
    assert dict(g.norm_dims) == {"stem.1": -3, "norm": -1, "head.0": -3}


def test_position_table_loses_head_columns_never_rows():
    g = graph_of(toys.EinsumAttention)
    heads = g["qkv"]
    assert heads.prunable and heads.size == 3 and heads.channels == 36
    assert ("table", 1) in _members(heads) and ("table", 0) not in _members(heads)


def test_matmul_ties_the_contracted_channels():
    g = graph_of(toys.MatmulAttention)
    assert g["q"].producers == ("q", "k") and g["q"].prunable and g["v"].prunable


def test_table_indexed_along_its_channels_is_kept():
    class RowLookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.register_buffer("index", torch.tensor([0, 2, 4]))
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            return self.out(self.fc(x)[:, self.index])  # picks channels by position

    g = trace(RowLookup(), torch.randn(2, 4))
    assert not g["fc"].prunable and "looked up" in g["fc"].reason


def test_functional_layer_norm_over_channels_is_not_pruned():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(torch.nn.functional.layer_norm(self.fc(x), (6,)))

    g = trace(Functional(), torch.randn(2, 4))
    assert not g["fc"].prunable and "nn.LayerNorm" in g["fc"].reason
