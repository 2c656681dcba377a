"""HuggingFace transformers models: heads, KV groups and MLP neurons, pruned equal to masked, reloadable.

Every model in `hf_zoo.MODELS` at 30 % and 50 % of every prunable group (a few seconds in all, so
the default suite runs them): it traces, prunes and runs with an unchanged output shape, equals
its masked reference, decoders `generate()`, and `save_pretrained` → `from_pretrained` gives the
same outputs wherever the config can state the pruned sizes (elsewhere `save_pretrained` refuses).
Random init from small configs: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import hf_zoo  # noqa: E402

import prunecore as pc  # noqa: E402
from prunecore.hf import HFError, example_shape, load_hf  # noqa: E402

# name -> (prunable groups, whether the pruned config states every size)
DECODERS = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "opt"}
# (at 50 % every stated architecture keeps 2 of 4 heads of 16 at width 32, which BERT-style configs can state)
FAST = {"bert": (6, True), "gpt2": (5, True), "llama": (5, True), "t5-encoder": (3, True), "swin": (6, False)}
# every architecture: prunable groups as traced: heads and MLP neurons per layer, the width where
# nothing fixes it (an output in DistilBERT, CLIP and the T5 encoder),
# BERT's pooler; T5's layers share one position bias per head, so their heads are one group
GROUPS = {**{k: v[0] for k, v in FAST.items()}, "roberta": 5, "distilbert": 4, "mistral": 5, "qwen2": 5, "vit": 5,
          "convnext": 4, "clip-vision": 4, "qwen3": 5, "gemma": 5, "opt": 5}  # fmt: skip


def _assert_pruned_equals_masked(name: str, sparsity: float) -> hf_zoo.Result:
    result = hf_zoo.check(name, sparsity)
    assert result.prunable == GROUPS[name]
    assert result.max_error < 1e-4, f"{name}: pruned differs from masked by {result.max_error}"
    assert result.change > 1e-3  # it pruned something that matters
    assert result.same_shape
    if name in DECODERS:
        assert result.generated == 4  # generate() runs on the pruned decoder, with its KV cache
    assert result.params_kept < 1.0 - sparsity / 3
    if result.unstated or result.refused:
        assert result.round_trip_error is None  # refused, never a folder transformers cannot load
    else:
        assert result.round_trip_error == 0.0
    return result


@pytest.mark.parametrize("name", sorted(FAST))
def test_which_configs_state_a_uniform_half(name: str) -> None:
    result = _assert_pruned_equals_masked(name, 0.5)
    assert (result.round_trip_error is not None) == FAST[name][1], (result.unstated, result.refused)


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
@pytest.mark.parametrize("name", sorted(hf_zoo.MODELS))
def test_every_architecture(name: str, sparsity: float) -> None:
    _assert_pruned_equals_masked(name, sparsity)


def test_grouped_query_attention_prunes_whole_kv_groups() -> None:
    """Llama with 4 query heads over 2 KV heads: a unit is one KV head with its 2 query heads."""
    model, x = hf_zoo.build("llama")
    graph = pc.trace(model, x)
    group = graph["model.layers.0.self_attn.q_proj"]
    assert group.size == 2
    modules = {(m.module, m.tensor, m.dim) for m in group.members}
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert (f"model.layers.0.self_attn.{proj}", "weight", 0) in modules
    assert ("model.layers.0.self_attn.o_proj", "weight", 1) in modules
    pruned = pc.apply_plan(model, pc.make_plan(model, graph, {group.name: 0.5}), graph=graph)
    attn = pruned.model.layers[0].self_attn
    assert attn.q_proj.out_features == 2 * 16 and attn.k_proj.out_features == 16  # head_dim 16 never cut
    assert pruned.config.num_attention_heads is not None
    assert model.config.num_attention_heads == 4  # the original's config is untouched
    # layer 1 kept both KV groups, so the config cannot state one count for every layer
    assert any("differ between layers" in reason for reason in pruned.config.prunecore_unstated)


def test_gemma_width_prunes_through_its_scaled_embedding_but_is_not_saved_for_transformers(tmp_path: Path) -> None:
    """Gemma's embedding (an Embedding subclass) scales by sqrt(dense width), a 0-d buffer; its config would
    rebuild that scale from the pruned width, so save_pretrained refuses a narrower Gemma and says why."""
    model, x = hf_zoo.build("gemma")
    graph = pc.trace(model, x)
    assert graph["model.embed_tokens"].prunable
    pruned = pc.apply_plan(model, pc.make_plan(model, graph, {"model.embed_tokens": 0.25}), graph=graph)
    assert pruned.model.embed_tokens.embedding_dim == 48
    with pytest.raises(HFError, match="square root of the dense width"):
        pc.save_pretrained(pruned, tmp_path / "out")


def test_gated_mlp_prunes_gate_and_up_together() -> None:
    model, x = hf_zoo.build("llama")
    graph = pc.trace(model, x)
    members = {(m.module, m.tensor, m.dim) for m in graph["model.layers.1.mlp.gate_proj"].members}
    assert {("model.layers.1.mlp.gate_proj", "weight", 0), ("model.layers.1.mlp.up_proj", "weight", 0),
            ("model.layers.1.mlp.down_proj", "weight", 1)} <= members  # fmt: skip


def test_uniform_plan_round_trips_through_from_pretrained(tmp_path: Path) -> None:
    model, x = hf_zoo.build("llama")
    pruned = pc.prune(model, x, 0.5)
    assert not getattr(pruned.config, "prunecore_unstated", None)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 1)
    assert pruned.config.intermediate_size == 64 and pruned.config.head_dim == 16
    assert pruned.config.hidden_size == 32  # the width, through every RMSNorm
    folder = pc.save_pretrained(pruned, tmp_path / "pruned")
    again = type(pruned).from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, pruned(x).logits)


# per architecture: the sizes of its tied sets under `statable`, or () when its config states no
# pruned size prunecore knows (Swin's per-stage heads and MLP ratio, ConvNeXt). Where the config
# derives the head size from the width, the width joins the heads' tie, with the hidden -> hidden
# layers the config also sizes by hidden_size (BERT's pooler); where the width is
# the model's output (DistilBERT, CLIP vision: not prunable), their heads stay.
STATABLE = {"bert": (4, 2), "roberta": (3, 2), "gpt2": (3, 2), "opt": (3, 2), "distilbert": (2,), "clip-vision": (2,),
            "llama": (2, 2), "mistral": (2, 2), "qwen2": (2, 2), "qwen3": (2, 2), "gemma": (2, 2), "vit": (2, 2),
            "t5-encoder": (1, 2), "swin": (), "convnext": ()}  # T5's heads are one group already  # fmt: skip


@pytest.mark.parametrize("name", sorted(hf_zoo.MODELS))
def test_statable_allocation_always_reloads_with_from_pretrained(name: str, tmp_path: Path) -> None:
    """dp and global plans under `statable`, and 30 % and 50 % of every statable group, keep one count per tied
    set, and transformers reloads them with equal outputs."""
    from test_allocate import synthetic_curves

    model, x = hf_zoo.build(name)
    graph = pc.trace(model, x)
    limits = pc.statable(model, graph)
    tied = {g for t in limits.ties for g in t}
    assert tuple(len(t) for t in limits.ties) == STATABLE[name]
    assert tied | set(limits.keep) == {g.name for g in graph.prunable} and not tied & set(limits.keep)
    problem, exclude = limits.constrain(pc.allocation_problem(synthetic_curves(graph), graph, model))
    assert exclude == list(limits.keep)
    if not limits.ties:
        with pytest.raises(pc.AllocationError, match="cannot be met"):
            pc.solve(problem, pc.Budget(flops=0.9), "dp", exclude=exclude)
        return
    floor = problem.floor("flops", exclude=exclude) / problem.cost.dense[1]
    plans = {method: pc.solve(problem, pc.Budget(flops=(1 + floor) / 2), method, exclude=exclude)
             for method in ("dp", "global")}  # fmt: skip
    for sparsity in (0.3, 0.5):  # every statable group at once, as the round-trip asks
        fractions = {g: 1 - pc.kept_units(graph[t[0]].size, sparsity) / graph[t[0]].size
                     for t in limits.ties for g in t}  # fmt: skip
        plans[f"all {sparsity}"] = pc.make_plan(model, graph, fractions)
    for label, plan in plans.items():
        for tie in limits.ties:  # one kept fraction per tie
            assert len({len(plan.groups[g].keep) / graph[g].size for g in tie if g in plan.groups}) == 1, (label, tie)
        assert any(len(plan.groups[g].keep) < graph[g].size for g in tied if g in plan.groups)
        pruned = pc.apply_plan(model, plan, graph=graph)
        folder = pc.save_pretrained(pruned, tmp_path / label)
        again = type(pruned).from_pretrained(folder).eval()
        with torch.no_grad():
            assert (hf_zoo.output(again(x)) - hf_zoo.output(pruned(x))).abs().max().item() == 0.0, label


def test_statable_names_why_groups_stay() -> None:
    model, x = hf_zoo.build("bert")
    graph = pc.trace(model, x)
    limits = pc.statable(model, graph)
    width = "bert.embeddings.word_embeddings"
    assert {width, "bert.pooler.dense", "bert.encoder.layer.0.attention.self.query"} <= set(limits.ties[0])
    distilbert, x = hf_zoo.build("distilbert")
    keep = pc.statable(distilbert, pc.trace(distilbert, x)).keep
    assert "the width cannot shrink with them" in keep["transformer.layer.0.attention.q_lin"]
    llama, x = hf_zoo.build("llama")
    keep = pc.statable(llama, pc.trace(llama, x)).keep
    assert "a multiple of the head count" in keep["model.embed_tokens"]
    with pytest.raises(HFError, match="has no config"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        pc.statable(model, pc.trace(model, torch.randn(1, 4)))


def test_save_pretrained_refuses_what_transformers_could_not_load(tmp_path: Path) -> None:
    model, x = hf_zoo.build("bert")
    pruned = pc.prune(model, x, 0.3)  # 3 heads of 16 at width 45
    earlier = tmp_path / "out"
    earlier.mkdir()
    (earlier / "keep.txt").write_text("an earlier save")
    with pytest.raises(HFError, match="derives the head size"):
        pc.save_pretrained(pruned, earlier)
    assert (earlier / "keep.txt").read_text() == "an earlier save"  # nothing already saved is lost


def test_save_pretrained_checks_shapes_of_unknown_architectures(tmp_path: Path) -> None:
    model, x = hf_zoo.build("convnext")
    pruned = pc.prune(model, x, 0.5)
    with pytest.raises(HFError, match="does not describe the pruned sizes"):
        pc.save_pretrained(pruned, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dense_config_is_restored_after_a_sweep_like_swap() -> None:
    """`fix` is a function of the tensors: swapping the dense tensors back restores the config."""
    from prunecore.surgery import kept_positions, sliced_tensors, swap_tensors_

    model, x = hf_zoo.build("llama")
    graph = pc.trace(model, x)
    before = model.config.to_dict()
    old = swap_tensors_(model, sliced_tensors(model, kept_positions(graph, pc.make_plan(model, graph, 0.5))))
    assert model.config.intermediate_size == 64
    swap_tensors_(model, old)
    assert model.config.to_dict() == before


def test_hf_spec_builds_from_a_config_file_and_a_saved_folder(tmp_path: Path) -> None:
    model, x = hf_zoo.build("llama")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**model.config.to_dict(), "architectures": ["LlamaForCausalLM"]}))
    a, b = pc.load_model(f"hf:{config}"), pc.load_model(f"hf:{config}")
    assert type(a).__name__ == "LlamaForCausalLM"  # from the config's architectures
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # seeded: the same model
    model.save_pretrained(tmp_path / "folder")
    loaded = pc.load_model(f"hf:{tmp_path / 'folder'}")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    base = pc.load_model(f"hf:{config}(task='base')")
    assert type(base).__name__ == "LlamaModel"
    assert example_shape(loaded) == ((1, 128), "int64")


def test_hf_spec_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(HFError, match="does not exist"):
        load_hf(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFError, match="no config.json"):
        load_hf(str(tmp_path / "empty"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HFError, match="not readable JSON"):
        load_hf(str(bad))
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(HFError, match="model_type"):
        load_hf(str(bad))
    folder = tmp_path / "pickled"
    folder.mkdir()
    model, _ = hf_zoo.build("llama")
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(HFError, match="pickle"):
        load_hf(str(folder))
    with pytest.raises(HFError, match="task="):
        load_hf(str(tmp_path / "pickled" / "config.json"), task="translate")
