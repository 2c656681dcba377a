"""Allocation quality: does spending a FLOPs budget by sensitivity beat pruning every group alike?

For every sample model, at budgets keeping 70 %, 50 % and 30 % of the FLOPs, every allocation
method's plan is applied, BatchNorm statistics are re-estimated (no fine-tuning), and held-out
accuracy is measured next to the accuracy the plan predicted from its curves.

Protocol, chosen so that the held-out numbers are not selected on:
- curves: an exact sweep at levels 0.1..0.9 over the 500 *calibration* images (a subset of the
  training split), metrics accuracy and loss, BatchNorm re-estimated per point on the same images
  (so curve points are measured the way plans are) — cached in a run store, so a re-run is quick;
- allocation protects the loss curve (the default: smoother than accuracy on 500 images);
- measurement: the 1,000 held-out images; BatchNorm re-estimated on the calibration images.

The curves' dense accuracy (on training images, near 100 %) is not the held-out one, so the
table compares *drops*: measured held-out accuracy minus dense held-out accuracy, next to the
predicted drop (the plan's predicted accuracy minus the curves' dense accuracy).

Run: `.venv/bin/python bench/bench_allocate.py [--store PATH] [--models resnet20,vit] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

import prunecore as pc
from prunecore.datasets import load_data

BUDGETS = (0.7, 0.5, 0.3)
SENSITIVITY = ("dp", "greedy", "threshold")


def run_model(name: str, store: Path, bn_batches: int) -> pd.DataFrame:
    sample = pc.load_sample(name)
    data = load_data("sample")
    graph = pc.trace(sample.model, sample.example)
    began = time.perf_counter()
    curves = pc.sweep(
        sample.model, data.calibration, sample.example, metric=["accuracy", "loss"], graph=graph,
        bn_recalibration=bn_batches, calibration=data.calibration, store=store, model_name=f"sample:{name}",
    )  # fmt: skip
    swept = time.perf_counter() - began
    problem = pc.allocation_problem(curves, graph, sample.model, model_name=f"sample:{name}")
    dense = pc.evaluate(sample.model, data.evaluation, "accuracy")["accuracy"]
    curve_dense = problem.dense["accuracy"]
    rows = []
    for budget in BUDGETS:
        for method in pc.list_methods():
            began = time.perf_counter()
            plan = pc.solve(problem, pc.Budget(flops=budget), method)
            solve_ms = (time.perf_counter() - began) * 1e3
            measured = pc.evaluate_plan(sample.model, plan, data.evaluation, "accuracy", bn_recalibration=bn_batches,
                                        calibration=data.calibration, graph=graph)  # fmt: skip
            rows.append({
                "model": name, "budget": budget, "method": method, "dense": dense,
                "flops_kept": plan.totals.flops_after / plan.totals.flops_before,
                "predicted_drop": plan.predicted["accuracy"] - curve_dense, "measured": measured["accuracy"],
                "solve_ms": solve_ms, "sweep_s": swept,
            })  # fmt: skip
    return pd.DataFrame(rows)


def report(results: pd.DataFrame) -> str:
    lines = []
    for name, table in results.groupby("model", sort=False):
        lines.append(f"\n{name}: dense accuracy {table.dense.iloc[0]:.2%}, sweep {table.sweep_s.iloc[0]:.0f} s")
        header = " | ".join(f"keep {b:.0%} FLOPs: accuracy (drop; predicted drop)" for b in BUDGETS)
        lines.append(f"| method | {header} |")
        lines.append("| --- |" + " ---: |" * len(BUDGETS))
        for method, rows in table.groupby("method", sort=False):
            cells = [
                f"{r.measured:.1%} ({(r.measured - r.dense) * 100:+.1f}; {r.predicted_drop * 100:+.1f})"
                for r in rows.itertuples()
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        uniform = table[table.method == "uniform"].set_index("budget").measured
        for method in SENSITIVITY:
            mine = table[table.method == method].set_index("budget").measured
            wins = sum(mine[b] > uniform[b] for b in BUDGETS)
            lines.append(f"{method} beats uniform at {wins} of {len(BUDGETS)} budgets")
        lines.append(f"solve time: median {table.solve_ms.median():.0f} ms, max {table.solve_ms.max():.0f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("build/bench_runs.db"))
    parser.add_argument("--models", default=",".join(pc.list_samples()))
    parser.add_argument("--bn-batches", type=int, default=4, help="calibration batches per BN re-estimation")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    args = parser.parse_args()
    args.store.parent.mkdir(parents=True, exist_ok=True)
    results = pd.concat([run_model(name, args.store, args.bn_batches) for name in args.models.split(",")])
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results.to_dict(orient="records"), indent=1))


if __name__ == "__main__":
    main()
