"""Engine benchmark on resnet50: is prunecore fast, and do saved FLOPs become saved time?

1. Engine overhead: wall time of `trace` (1x3x224x224) and of `apply_plan` for a uniform 50 % plan,
   median of 3; the aim is under 1 s each.
2. Latency vs FLOPs: dense vs uniformly pruned (30/50/70 %, criterion l1, `round_to` 1 and 8).
   Channel pruning leaves an ordinary, smaller dense model, so `efficiency = latency speed-up /
   FLOPs reduction` says how much of the saved MACs really turn into saved time (1.0: all of them;
   the aim is >= 0.8). `round_to=8` keeps channel counts multiples of 8, which vectorised kernels like.

On a shared 2-core CPU only ratios from one run mean anything: latencies are medians over several
reps, dense is timed first and again last (both reported), speed-ups use the mean of the two.
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


def latency_rows(model: nn.Module, x: torch.Tensor, reps: int, warmup: int) -> list[Row]:
    """Dense, the six pruned models, dense again; ratios against the mean of the two dense runs."""
    graph = prunecore.trace(model, x[:1])
    models: list[tuple[str, float, int, nn.Module]] = [("dense (first)", 0.0, 1, model)]
    for s in SPARSITIES:
        for r in ROUND_TOS:
            plan = prunecore.make_plan(model, graph, s, criterion="l1", round_to=r)
            models.append((f"pruned {s:.0%}", s, r, prunecore.apply_plan(model, plan, graph=graph)))
    models.append(("dense (last)", 0.0, 1, model))
    dense = prunecore.count(model, x[:1])  # MACs are per example, so one example is enough
    timed = [
        (name, s, r, *prunecore.count(m, x[:1]).ratio(dense), 1e3 * latency(m, x, reps=reps, warmup=warmup))
        for name, s, r, m in models
    ]
    dense_ms = (timed[0][-1] + timed[-1][-1]) / 2
    return [Row(n, s, r, p, f, ms, 1 / f, dense_ms / ms, dense_ms / ms * f) for n, s, r, p, f, ms in timed]


def markdown(info: dict[str, Any], rows: list[Row]) -> str:
    """The whole report as Markdown, ready to paste into a README."""
    b, _, h, _ = info["input"]
    out: list[str] = [
        f"torch {info['torch']}, torchvision {info['torchvision']}, {info['threads']} threads, CPU: {info['cpu']}"
        + (" (quick smoke run: numbers mean nothing)" if info["quick"] else ""),
        "",
        f"Engine overhead, resnet50, trace input {'x'.join(map(str, info['trace_input']))}, "
        f"median of {info['engine_reps']}:",
        "",
        "| step | seconds | aim < 1 s |",
        "|---|---:|---|",
    ]
    steps = (("trace", "trace_s"), ("apply_plan (uniform 50 %)", "apply_s"))
    out += [f"| {step} | {info[k]:.3f} | {'met' if info[k] < 1 else 'NOT met'} |" for step, k in steps]
    out += [
        "",
        f"Latency vs FLOPs, resnet50, input {b}x3x{h}x{h} ({h} px{info['size_note']}), "
        f"latency = median of {info['reps']} reps after {info['warmup']} warm-up:",
        "",
        "| model | round_to | params kept % | MACs kept % | FLOPs reduction | latency ms | speed-up | efficiency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    out += [
        f"| {r.model} | {r.round_to} | {100 * r.params_kept:.1f} | {100 * r.macs_kept:.1f} | "
        f"{r.flops_reduction:.2f}x | {r.latency_ms:.0f} | {r.speedup:.2f}x | {r.efficiency:.2f} |"
        for r in rows
    ]
    eff = [r.efficiency for r in rows if r.sparsity > 0]
    out += ["", f"Efficiency aim >= 0.8: met by {sum(e >= 0.8 for e in eff)}/{len(eff)} pruned models "
            f"(min {min(eff):.2f}, max {max(eff):.2f})."]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description="prunecore engine benchmark on resnet50")
    parser.add_argument("--quick", action="store_true", help="tiny input and 1 rep: only checks the script runs")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    engine_reps, reps, warmup = (1, 1, 0) if args.quick else (3, 5, 1)
    example = torch.randn(1, 3, 64, 64) if args.quick else torch.randn(1, 3, 224, 224)
    info: dict[str, Any] = dict(
        torch=torch.__version__, torchvision=torchvision.__version__, threads=torch.get_num_threads(),
        cpu=cpu_model(), quick=args.quick, trace_input=list(example.shape), engine_reps=engine_reps,
    )
    info |= engine_overhead(model, example, engine_reps)
    batch, size, note = (2, 64, ", quick") if args.quick else (32, 160, ", the issue allows 224 or smaller")
    x = torch.randn(batch, 3, size, size)  # (B, C, H, W)
    if not args.quick and latency(model, x, reps=1, warmup=0) > SLOW_DENSE_S:
        size, note = 128, f", dropped from 160 because one dense forward took > {SLOW_DENSE_S:.0f} s"
        x = torch.randn(batch, 3, size, size)
    info |= dict(input=[batch, 3, size, size], size_note=note, reps=reps, warmup=warmup)
    rows = latency_rows(model, x, reps, warmup)
    print(markdown(info, rows))
    if args.json:
        args.json.write_text(json.dumps({**info, "rows": [asdict(r) for r in rows]}, indent=2))
        print(f"\nJSON written to {args.json}")


if __name__ == "__main__":
    main()
