"""Transformer benchmark: is prunecore fast on ViT and Swin, and do removed heads and neurons save time?

1. Engine overhead on torchvision `vit_b_16` and `swin_t` (random init, 1x3x224x224): wall time of
   `trace` and of `apply_plan` for a uniform 30 % plan, median of 3. The aim is under 2 s for
   trace + apply on each model.
2. `vit_b_16` CPU latency (batch 8 at 224x224) dense vs 30 / 50 % of every block's MLP neurons and
   25 / 50 % of every block's attention heads removed, next to the FLOPs reduction from
   `prunecore.count` (MACs of projections, MLPs and the two attention matmuls). Pruned heads run in
   `PrunedMultiheadAttention`; the dense model with that module is timed too, so its own speed is
   not mistaken for the effect of removing heads.

On a shared 2-core CPU only ratios from one run mean anything. The sequence dense, pruned models,
dense again is timed in rounds; each model keeps its median round, and speed-ups are against the
mean of the two dense rows. Run: `.venv/bin/python bench/bench_transformers.py [--quick] [--json PATH]`
(`--quick`: a tiny ViT, one rep: checks that it runs, the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn

import prunecore
from prunecore.attention import PrunedMultiheadAttention
from prunecore.cost import latency

VARIANTS: dict[str, tuple[str, float]] = {  # name -> (which groups, sparsity)
    "MLP neurons 30 %": ("mlp", 0.3),
    "MLP neurons 50 %": ("mlp", 0.5),
    "heads 25 %": ("heads", 0.25),
    "heads 50 %": ("heads", 0.5),
}


def median_seconds(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def engine_overhead(name: str, reps: int, size: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)
    graph = prunecore.trace(model, x)
    plan = prunecore.make_plan(model, graph, 0.3)
    trace_s = median_seconds(lambda: prunecore.trace(model, x), reps)
    apply_s = median_seconds(lambda: prunecore.apply_plan(model, plan, graph=graph), reps)
    return {"trace_s": trace_s, "apply_s": apply_s, "total_s": trace_s + apply_s, "groups": len(graph.prunable)}


def kind(group: prunecore.ChannelGroup, model: nn.Module) -> str:
    module = model.get_submodule(group.producers[0])
    if isinstance(module, nn.MultiheadAttention):
        return "heads"
    return "mlp" if group.name.endswith("mlp.0") else "other"


def latency_rows(model: nn.Module, x: torch.Tensor, reps: int, rounds: int) -> list[dict[str, Any]]:
    graph = prunecore.trace(model, x[:1])
    models: list[tuple[str, nn.Module]] = [("dense (first)", model)]
    for label, (which, sparsity) in VARIANTS.items():
        groups = {g.name: sparsity for g in graph.prunable if kind(g, model) == which}
        plan = prunecore.make_plan(model, graph, groups)
        models.append((label, prunecore.apply_plan(model, plan, graph=graph)))
    # the same dense weights in prunecore's attention module: separates the module's own speed
    # from the effect of removing heads (stock MultiheadAttention takes a fused fast path in eval)
    stockless = copy.deepcopy(model)
    for m in stockless.modules():
        if type(m) is nn.MultiheadAttention:
            m.__class__ = PrunedMultiheadAttention
    models.append(("dense, PrunedMultiheadAttention", stockless))
    models.append(("dense (last)", model))
    timed = [[1e3 * latency(m, x, reps=reps, warmup=1) for _, m in models] for _ in range(rounds)]
    dense_cost = prunecore.count(model, x[:1])
    dense_ms = statistics.mean([statistics.median(r[0] for r in timed), statistics.median(r[-1] for r in timed)])
    rows = []
    for i, (label, m) in enumerate(models):
        cost = prunecore.count(m, x[:1])
        ms = statistics.median(r[i] for r in timed)
        reduction = dense_cost.flops / cost.flops
        speedup = dense_ms / ms
        rows.append({
            "model": label, "params_kept": cost.params / dense_cost.params, "macs_kept": cost.flops / dense_cost.flops,
            "flops_reduction": reduction, "latency_ms": ms, "speedup": speedup, "efficiency": speedup / reduction,
            "rounds_ms": [r[i] for r in timed],
        })  # fmt: skip
    return rows


def markdown(info: dict[str, Any], overhead: dict[str, dict[str, float]], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{info['date']}, {info['cpu']}, torch {info['torch']}, torchvision {info['torchvision']}, "
        f"{info['threads']} threads.\n",
        f"Engine overhead, input 1x3x{info['trace_size']}x{info['trace_size']}, uniform 30 % plan, "
        f"median of {info['engine_reps']}:\n",
        "| model | prunable groups | trace s | apply_plan s | total s | aim < 2 s |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, o in overhead.items():
        ok = "yes" if o["total_s"] < 2 else "no"
        lines.append(f"| {name} | {o['groups']} | {o['trace_s']:.2f} | {o['apply_s']:.2f} | {o['total_s']:.2f} | {ok} |")
    lines += [
        "",
        f"{info['latency_model']} latency, batch {info['batch']} at {info['size']}x{info['size']}, {info['rounds']} rounds of "
        f"(median of {info['reps']} reps after 1 warm-up):\n",
        "| model | params kept | MACs kept | FLOPs reduction | latency ms | speed-up | efficiency |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params_kept']:.1%} | {r['macs_kept']:.1%} | {r['flops_reduction']:.2f}x | "
            f"{r['latency_ms']:.0f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} |"
        )
    same = next(r for r in rows if r["model"].startswith("dense, Pruned"))
    lines += [
        "",
        "Heads against the dense model in the same attention module (`PrunedMultiheadAttention`):\n",
        "| model | FLOPs reduction | speed-up | efficiency |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        if r["model"].startswith("heads"):
            speedup = same["latency_ms"] / r["latency_ms"]
            lines.append(f"| {r['model']} | {r['flops_reduction']:.2f}x | {speedup:.2f}x | {speedup / r['flops_reduction']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one rep: a smoke test")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    engine_reps, rounds, reps, batch, size = (1, 1, 1, 2, 224) if args.quick else (3, 5, 3, 8, 224)
    names = ("vit_b_32",) if args.quick else ("vit_b_16", "swin_t")
    overhead = {name: engine_overhead(name, engine_reps, size) for name in names}
    torch.manual_seed(0)
    model = torchvision.models.get_model(names[0], weights=None).eval()
    rows = latency_rows(model, torch.randn(batch, 3, size, size), reps, rounds)
    info = {
        "date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
        "trace_size": size, "latency_model": names[0], "engine_reps": engine_reps, "batch": batch, "size": size, "rounds": rounds, "reps": reps,
    }  # fmt: skip
    print(markdown(info, overhead, rows))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "overhead": overhead, "latency": rows}, indent=2))


if __name__ == "__main__":
    main()
