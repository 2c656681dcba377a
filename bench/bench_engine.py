"""Engine benchmark on resnet50: is prunecore fast, and do saved FLOPs become saved time?

1. Engine overhead: wall time of `trace` (1x3x224x224) and of `apply_plan` for a uniform 50 % plan,
   median of 3; the aim is under 1 s each.
2. Latency vs FLOPs: dense vs uniformly pruned (30/50/70 %, criterion l1, `round_to` 1 and 8).
   Channel pruning leaves an ordinary, smaller dense model, so `efficiency = latency speed-up /
   FLOPs reduction` says how much of the saved MACs really turn into saved time (1.0: all of them;
   the aim is >= 0.8). `round_to=8` keeps channel counts multiples of 8, which vectorised kernels like.

On a shared 2-core CPU only ratios from one run mean anything. Each latency is a median over reps;
the sequence dense, pruned models, dense again is timed in 3 rounds and each model keeps its median
round (one slow spell then spoils no row); speed-ups are against the mean of the two dense rows.
Run: `.venv/bin/python bench/bench_engine.py [--quick] [--json PATH]` (`--quick`: smoke test only).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import timeit
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import prunecore
from prunecore.cost import latency

SPARSITIES = (0.3, 0.5, 0.7)
ROUND_TOS = (1, 8)
SLOW_DENSE_S = 8.0  # above this for one dense forward at 160 px, use 128 px


@dataclass(frozen=True)
class Row:
    """One timed model; the dense model appears twice (timed first and last) with sparsity 0."""

    model: str
    sparsity: float
    round_to: int
    params_kept: float  # fraction of dense
    macs_kept: float  # fraction of dense
    latency_ms: float
    flops_reduction: float  # dense MACs / pruned MACs
    speedup: float  # dense latency (mean of both dense runs) / this latency
    efficiency: float  # speedup / flops_reduction
    rounds_ms: tuple[float, ...]  # latency of each round; latency_ms is their median


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown"


def engine_overhead(model: nn.Module, example: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds of `trace` and of `apply_plan` with a uniform 50 % plan."""
    trace_s = statistics.median(timeit.repeat(lambda: prunecore.trace(model, example), number=1, repeat=reps))
    graph = prunecore.trace(model, example)
    plan = prunecore.make_plan(model, graph, 0.5)
    apply = timeit.repeat(lambda: prunecore.apply_plan(model, plan, graph=graph), number=1, repeat=reps)
    return {"trace_s": trace_s, "apply_s": statistics.median(apply)}


def latency_rows(model: nn.Module, x: torch.Tensor, reps: int, warmup: int, rounds: int) -> list[Row]:
    """Time dense, the six pruned models, dense again, `rounds` times; keep each model's median round."""
    graph = prunecore.trace(model, x[:1])
    models: list[tuple[str, float, int, nn.Module]] = [("dense (first)", 0.0, 1, model)]
    for s in SPARSITIES:
        for r in ROUND_TOS:
            plan = prunecore.make_plan(model, graph, s, criterion="l1", round_to=r)
            models.append((f"pruned {s:.0%}", s, r, prunecore.apply_plan(model, plan, graph=graph)))
    models.append(("dense (last)", 0.0, 1, model))
    dense = prunecore.count(model, x[:1])  # MACs are per example, so one example is enough
    kept = [prunecore.count(m, x[:1]).ratio(dense) for *_, m in models]
    timed = [[1e3 * latency(m, x, reps=reps, warmup=warmup) for *_, m in models] for _ in range(rounds)]
    med = [statistics.median(t) for t in zip(*timed)]
    dense_ms = (med[0] + med[-1]) / 2
    return [  # efficiency = speed-up / (1 / macs kept)
        Row(name, s, r, params, macs, ms, 1 / macs, dense_ms / ms, dense_ms / ms * macs, tuple(t))
        for (name, s, r, _), (params, macs), ms, t in zip(models, kept, med, zip(*timed))
    ]


def markdown(info: dict[str, Any], rows: list[Row]) -> str:
    """The whole report as Markdown, ready to paste into a README."""
    b, _, h, _ = info["input"]
    eff = [r.efficiency for r in rows if r.sparsity > 0]
    steps = (("trace", info["trace_s"]), ("apply_plan (uniform 50 %)", info["apply_s"]))
    return "\n".join([
        f"torch {info['torch']}, torchvision {info['torchvision']}, {info['threads']} threads, CPU: {info['cpu']}"
        + (" (quick smoke run: the numbers mean nothing)\n" if info["quick"] else "\n"),
        f"Engine overhead, resnet50, trace input {'x'.join(map(str, info['trace_input']))}, "
        f"median of {info['engine_reps']}:\n",
        "| step | seconds | aim < 1 s |\n|---|---:|---|",
        *(f"| {step} | {sec:.3f} | {'met' if sec < 1 else 'NOT met'} |" for step, sec in steps),
        f"\nLatency vs FLOPs, resnet50, input {b}x3x{h}x{h} ({h} px{info['size_note']}), latency = median over "
        f"{info['rounds']} rounds of (median of {info['reps']} reps after {info['warmup']} warm-up):\n",
        "| model | round_to | params kept % | MACs kept % | FLOPs reduction | latency ms | speed-up | efficiency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r.model} | {r.round_to} | {100 * r.params_kept:.1f} | {100 * r.macs_kept:.1f} | "
          f"{r.flops_reduction:.2f}x | {r.latency_ms:.0f} | {r.speedup:.2f}x | {r.efficiency:.2f} |" for r in rows),
        f"\nEfficiency aim >= 0.8: met by {sum(e >= 0.8 for e in eff)}/{len(eff)} pruned models "
        f"(min {min(eff):.2f}, max {max(eff):.2f}).",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description="prunecore engine benchmark on resnet50")
    parser.add_argument("--quick", action="store_true", help="tiny input and 1 rep: only checks the script runs")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    engine_reps, rounds, reps, warmup = (1, 1, 1, 0) if args.quick else (3, 3, 5, 1)
    example = torch.randn(1, 3, 64, 64) if args.quick else torch.randn(1, 3, 224, 224)
    info: dict[str, Any] = dict(
        torch=torch.__version__, torchvision=torchvision.__version__, threads=torch.get_num_threads(),
        cpu=cpu_model(), quick=args.quick, trace_input=list(example.shape), engine_reps=engine_reps,
        **engine_overhead(model, example, engine_reps),
    )
    batch, size, note = (2, 64, ", quick") if args.quick else (32, 160, ", the issue allows 224 or smaller")
    x = torch.randn(batch, 3, size, size)  # (B, C, H, W)
    if not args.quick and latency(model, x, reps=1, warmup=0) > SLOW_DENSE_S:
        size, note = 128, f", dropped from 160 because one dense forward took > {SLOW_DENSE_S:.0f} s"
        x = torch.randn(batch, 3, size, size)
    info |= dict(input=[batch, 3, size, size], size_note=note, rounds=rounds, reps=reps, warmup=warmup)
    rows = latency_rows(model, x, reps, warmup, rounds)
    print(markdown(info, rows))
    if args.json:
        args.json.write_text(json.dumps({**info, "rows": [asdict(r) for r in rows]}, indent=2))
        print(f"\nJSON written to {args.json}")


if __name__ == "__main__":
    main()
