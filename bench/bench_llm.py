"""Language-model benchmark: prunecore on a ~100 M-parameter Llama, and sensitivity against uniform on `tinylm`.

1. **Engine overhead** on a HuggingFace `LlamaForCausalLM` of about 100 M parameters (random init:
   width 768, 12 layers, 12 query heads over 4 KV heads of 64, gated MLP of 2048, vocabulary
   16,000): wall time of `trace` on 1x128 token ids, and of `apply_plan` for a uniform 30 % plan,
   median of 3.
2. **Latency against FLOPs** of the same model, CPU, one 128-token prefill (batch 1): dense against
   50 % of every MLP's neurons plus 25 % of every layer's KV groups (1 of 4, with its 3 query heads),
   and each alone. Rounds of the models alternate (`prunecore.cost.compare_latency`), so a busy
   moment slows all of them. Efficiency is speed-up / FLOPs reduction, as in the README's tables.
3. **Sensitivity against uniform** on the `tinylm` sample: a sweep of every group on its held-out
   text (perplexity and loss), then `dp`, `dp` under `pc.statable` (one head count and one MLP
   width for every layer, the width kept: what the Llama config can state) and `uniform` plans at
   70 % and 50 % of the FLOPs, applied and measured on the same held-out blocks, and whether
   `save_pretrained` writes each (so that transformers' `from_pretrained` reloads it).

On a shared 2-core CPU only ratios from one run mean anything.
Run: `.venv/bin/python bench/bench_llm.py [--quick] [--json PATH]` (`--quick`: a 4-layer model and
fewer blocks: checks that it runs, the numbers mean little).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

import prunecore as pc
from bench_transformers import median_seconds  # this folder's: the script's own directory is on sys.path
from prunecore.cost import compare_latency


def llama(layers: int) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=12,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def kind(name: str) -> str:
    return "mlp" if name.endswith("mlp.gate_proj") else "kv" if name.endswith("self_attn.q_proj") else "other"


def engine(model: nn.Module, x: torch.Tensor, reps: int) -> dict[str, Any]:
    graph = pc.trace(model, x)
    plan = pc.make_plan(model, graph, 0.3)
    trace_s = median_seconds(lambda: pc.trace(model, x), reps)
    apply_s = median_seconds(lambda: pc.apply_plan(model, plan, graph=graph), reps)
    return {"params": sum(p.numel() for p in model.parameters()), "groups": len(graph.prunable),
            "trace_s": trace_s, "apply_s": apply_s}  # fmt: skip


def latency_rows(model: nn.Module, x: torch.Tensor, rounds: int) -> list[dict[str, Any]]:
    graph = pc.trace(model, x)
    variants = {"MLP 50 %": {"mlp": 0.5}, "KV groups 25 %": {"kv": 0.25}, "MLP 50 % + KV groups 25 %":
                {"mlp": 0.5, "kv": 0.25}}  # fmt: skip
    dense_cost = pc.count(model, x)
    rows = []
    for label, shares in variants.items():
        sparsity = {g.name: shares[kind(g.name)] for g in graph.prunable if kind(g.name) in shares}
        pruned = pc.apply_plan(model, pc.make_plan(model, graph, sparsity), graph=graph)
        before, after = compare_latency(model, pruned, x, rounds=rounds, warmup=1)
        cost = pc.count(pruned, x)
        reduction = dense_cost.flops / cost.flops
        speedup = before.median_s / after.median_s
        rows.append({"plan": label, "params_kept": cost.params / dense_cost.params,
                     "macs_kept": cost.flops / dense_cost.flops, "flops_reduction": reduction,
                     "dense_ms": 1e3 * before.median_s, "pruned_ms": 1e3 * after.median_s, "speedup": speedup,
                     "efficiency": speedup / reduction, "spread": max(before.spread, after.spread)})  # fmt: skip
    return rows


def sensitivity(blocks: int | None, levels: tuple[float, ...]) -> dict[str, Any]:
    sample = pc.load_sample("tinylm")
    model, x = sample.model, sample.example
    held = [batch for i, batch in enumerate(sample.heldout) if blocks is None or i * 32 < blocks]
    graph = pc.trace(model, x)
    began = time.perf_counter()
    curves = pc.sweep(model, held, x, levels=levels, metric=["perplexity", "loss"], graph=graph, progress=False)
    sweep_s = time.perf_counter() - began
    dense = pc.evaluate(model, held, ["perplexity", "loss", "accuracy"])
    out: dict[str, Any] = {"dense": dense, "sweep_s": sweep_s, "groups": len(graph.prunable), "plans": []}
    problem = pc.allocation_problem(curves, graph, model, metric="loss")
    limits = pc.statable(model, graph)  # one head count and one MLP width for every layer; the width stays
    statable = pc.with_ties(problem, limits.ties)
    for budget in (0.7, 0.5):
        for method, solved in (("dp", problem), ("dp, statable", statable), ("uniform", problem)):
            exclude = list(limits.keep) if solved is statable else []
            plan = pc.solve(solved, pc.Budget(flops=budget), method.split(",")[0], exclude=exclude)
            pruned = pc.apply_plan(model, plan, graph=graph)
            measured = pc.evaluate(pruned, held, ["perplexity", "loss", "accuracy"])
            kept = pc.count(pruned, x).flops / pc.count(model, x).flops
            out["plans"].append({"budget": budget, "method": method, "flops_kept": kept, **measured,
                                 "predicted_loss": plan.predicted.get("loss"), "reloads": reloads(pruned),
                                 "sparsities": {g: round(p.sparsity, 3) for g, p in plan.groups.items()}})  # fmt: skip
    return out


def reloads(pruned: nn.Module) -> bool:
    """Whether `pc.save_pretrained` writes the pruned model, i.e. transformers' `from_pretrained` can rebuild it."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            pc.save_pretrained(pruned, Path(folder) / "model")
        except pc.HFError:
            return False
    return True


def markdown(info: dict[str, Any], eng: dict[str, Any], rows: list[dict[str, Any]], lm: dict[str, Any]) -> str:
    lines = [
        f"{info['date']}, {info['cpu']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"{info['threads']} threads.\n",
        f"Engine overhead, Llama of {eng['params'] / 1e6:.0f} M parameters ({info['layers']} layers), input 1x128 "
        f"token ids, uniform 30 % plan, median of {info['reps']}:\n",
        "| model | params | prunable groups | trace s | apply_plan s |",
        "|---|---:|---:|---:|---:|",
        f"| Llama ({info['layers']} layers) | {eng['params'] / 1e6:.1f} M | {eng['groups']} | {eng['trace_s']:.2f} | "
        f"{eng['apply_s']:.2f} |",
        "",
        f"CPU latency of one 1x128 prefill, {info['rounds']} alternating rounds per pair:\n",
        "| plan | params kept | MACs kept | FLOPs reduction | dense ms | pruned ms | speed-up | efficiency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['params_kept']:.1%} | {r['macs_kept']:.1%} | {r['flops_reduction']:.2f}x | "
                     f"{r['dense_ms']:.0f} | {r['pruned_ms']:.0f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} |")
    d = lm["dense"]
    lines += [
        "",
        f"`tinylm` on {info['blocks']} held-out blocks of 128 bytes: dense perplexity {d['perplexity']:.3f} "
        f"(next-byte accuracy {d['accuracy']:.1%}); sweep of {lm['groups']} groups at {len(info['levels'])} levels "
        f"in {lm['sweep_s']:.0f} s.\n",
        "| FLOPs budget | method | FLOPs kept | perplexity | loss (nats/byte) | next-byte accuracy | "
        "`save_pretrained` |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for p in lm["plans"]:
        lines.append(f"| {p['budget']:.0%} | {p['method']} | {p['flops_kept']:.1%} | {p['perplexity']:.3f} | "
                     f"{p['loss']:.4f} | {p['accuracy']:.1%} | {'yes' if p['reloads'] else 'refused'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 4-layer model, 1 rep, few blocks: a smoke test")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    layers, reps, rounds, blocks = (4, 1, 3, 64) if args.quick else (12, 3, 7, None)
    levels = (0.25, 0.5, 0.75) if args.quick else (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
    model = llama(layers)
    x = torch.randint(0, 16000, (1, 128), generator=torch.Generator().manual_seed(0))
    eng = engine(model, x, reps)
    rows = latency_rows(model, x, rounds)
    lm = sensitivity(blocks, levels)
    info = {
        "date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "layers": layers, "reps": reps, "rounds": rounds, "blocks": blocks or "all", "levels": levels,
    }  # fmt: skip
    print(markdown(info, eng, rows, lm))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "engine": eng, "latency": rows, "tinylm": lm}, indent=2))


if __name__ == "__main__":
    main()
