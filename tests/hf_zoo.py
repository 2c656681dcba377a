"""Small HuggingFace transformers models built from configs (random init, nothing downloaded).

Each entry builds one architecture the HF issue names, at a size that traces in well under a
second: 2 layers, width 64, 4 heads (2 key/value heads where the architecture has grouped-query
attention), 128 MLP neurons. `check` prunes every prunable group and compares with the masked model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
import transformers as tf
from torch import nn

import prunecore as pc
from prunecore.evaluate import output_logits

_H = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "num_hidden_layers": 2}
_GQA = {**_H, "num_key_value_heads": 2}
_TOKENS = {"vocab_size": 100, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


@dataclass(frozen=True)
class Entry:
    build: Callable[[], nn.Module]
    tokens: bool  # token ids in (2, 12), else images (2, 3, 32, 32)


MODELS: dict[str, Entry] = {
    "bert": Entry(lambda: tf.BertForSequenceClassification(tf.BertConfig(**_TOKENS, **_H)), True),
    "roberta": Entry(lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(**_TOKENS, **_H)), True),
    "distilbert": Entry(lambda: tf.DistilBertModel(tf.DistilBertConfig(
        **_TOKENS, dim=64, n_heads=4, hidden_dim=128, n_layers=2)), True),
    "gpt2": Entry(lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=100, bos_token_id=1, eos_token_id=2, n_embd=64, n_head=4, n_layer=2, n_positions=64)), True),
    "llama": Entry(lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_TOKENS, **_GQA)), True),
    "mistral": Entry(lambda: tf.MistralForCausalLM(tf.MistralConfig(**_TOKENS, **_GQA)), True),
    "qwen2": Entry(lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_TOKENS, **_GQA)), True),
    "qwen3": Entry(lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_TOKENS, **_GQA, head_dim=16)), True),
    "opt": Entry(lambda: tf.OPTForCausalLM(tf.OPTConfig(
        **_TOKENS, hidden_size=64, num_attention_heads=4, ffn_dim=128, num_hidden_layers=2, word_embed_proj_dim=64,
        max_position_embeddings=64)), True),
    "gemma": Entry(lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_TOKENS, **_GQA, head_dim=16)), True),
    "t5-encoder": Entry(lambda: tf.T5EncoderModel(tf.T5Config(
        **_TOKENS, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2)), True),
    "vit": Entry(lambda: tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8, **_H)), False),
    "swin": Entry(lambda: tf.SwinForImageClassification(tf.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)), False),
    "convnext": Entry(lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
        image_size=32, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1])), False),
    "clip-vision": Entry(lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=32, patch_size=8, **_H)), False),
}  # fmt: skip


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model (seeded random init, eval mode) and an example input."""
    torch.manual_seed(0)
    entry = MODELS[name]
    x = torch.randint(3, 100, (2, 12)) if entry.tokens else torch.randn(2, 3, 32, 32)
    return entry.build().eval(), x


def output(out: Any) -> torch.Tensor:
    """The tensor to compare: logits, else the last hidden state."""
    logits = output_logits(out)
    return logits if isinstance(logits, torch.Tensor) else out.last_hidden_state


@dataclass(frozen=True)
class Result:
    groups: int
    prunable: int
    max_error: float  # pruned vs masked, absolute
    change: float  # pruned vs dense, absolute (the pruning did something)
    params_kept: float
    unstated: tuple[str, ...]
    round_trip_error: float | None  # from_pretrained of save_pretrained vs the pruned model; None: refused
    refused: str | None  # why save_pretrained refused the pruned model
    same_shape: bool  # the pruned model's output has the dense model's shape
    generated: int | None  # new tokens `generate()` produced on the pruned decoder (None: not a decoder)


def check(name: str, sparsity: float) -> Result:
    """Prune every prunable group by `sparsity`; compare removal with masking, and reload the pruned model."""
    model, x = build(name)
    graph = pc.trace(model, x)
    plan = pc.make_plan(model, graph, sparsity)
    pruned = pc.apply_plan(model, plan, graph=graph)
    masked = pc.apply_plan(model, plan, mode="mask", graph=graph)
    with torch.no_grad():
        a, b, dense = output(pruned(x)), output(masked(x)), output(model(x))
    unstated = tuple(getattr(pruned.config, "prunecore_unstated", ()))
    generated = None
    if hasattr(pruned, "generate") and pruned.can_generate():
        with torch.no_grad():
            out = pruned.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
        generated = out.shape[1] - x.shape[1]
    round_trip, refused = None, None
    with tempfile.TemporaryDirectory() as folder:
        try:
            pc.save_pretrained(pruned, folder)
        except pc.HFError as exc:
            refused = str(exc)
        else:
            again = type(pruned).from_pretrained(folder).eval()
            with torch.no_grad():
                round_trip = (output(again(x)) - a).abs().max().item()
    return Result(
        groups=len(graph.groups),
        prunable=sum(g.prunable for g in graph.groups),
        max_error=(a - b).abs().max().item(),
        change=(a - dense).abs().max().item(),
        params_kept=pc.count(pruned, x).params / pc.count(model, x).params,
        unstated=unstated,
        round_trip_error=round_trip,
        refused=refused,
        same_shape=a.shape == dense.shape,
        generated=generated,
    )
