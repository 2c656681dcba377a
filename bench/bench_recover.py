"""Recovery: how much of a pruned sample's accuracy do a few epochs of fine-tuning win back, and how best?

For every sample model, at `dp` plans keeping 50 % and 30 % of the FLOPs, held-out accuracy (the
1,000 digits no model trained on):

- one-shot: the plan applied, BatchNorm re-estimated on the calibration images, no training;
- fine-tuned for 1, 2 and 5 epochs on the 4,000 training digits (each its own cosine schedule),
  with distillation from the dense model (`distill=0.5`, T=4) and without (cross-entropy only);
- iterative: `prune_iteratively` in 3 steps of 1 epoch, against one-shot with 3 epochs (same total);
- from scratch: the pruned architecture re-initialised and trained for 5 epochs (cross-entropy),
  the classic baseline (Liu et al. 2019, "Rethinking the value of network pruning");
- seconds per epoch of `finetune` against a plain PyTorch loop (same model, data, optimiser and
  loss, no prunecore), alternated, median of 2 each.

Protocol: curves from an exact sweep over the 500 calibration images with BatchNorm re-estimated
per point (as `bench_allocate.py`; cached in the run store), `dp` protecting the loss, so nothing
is selected on the held-out set. SGD (momentum 0.9, Nesterov, weight decay 5e-4), lr 0.01 for
fine-tuning and 0.05 from scratch, batch 128. Results are cached per (model, budget) in --json,
so an interrupted run continues.

Run: `OMP_NUM_THREADS=2 .venv/bin/python bench/bench_recover.py [--models resnet20,vit] [--budgets 0.5,0.3]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import prunecore as pc
from prunecore.datasets import load_data

EPOCHS = (1, 2, 5)
LR, SCRATCH_LR = 0.01, 0.05
BN_BATCHES = 50


def one_budget(name: str, budget: float, store: Path) -> dict[str, Any]:
    sample = pc.load_sample(name)
    data = load_data("sample")
    graph = pc.trace(sample.model, sample.example)
    curves = pc.sweep(sample.model, data.calibration, sample.example, metric=["accuracy", "loss"], graph=graph,
                      bn_recalibration=4, calibration=data.calibration, store=store, model_name=f"sample:{name}",
                      progress=False)  # fmt: skip
    problem = pc.allocation_problem(curves, graph, sample.model, model_name=f"sample:{name}")
    plan = pc.solve(problem, pc.Budget(flops=budget), "dp")
    pruned = pc.recalibrate_bn_(pc.apply_plan(sample.model, plan, graph=graph), data.calibration, BN_BATCHES)
    held = data.evaluation
    row: dict[str, Any] = {
        "model": name, "budget": budget, "flops_kept": plan.totals.flops_after / plan.totals.flops_before,
        "dense": accuracy(sample.model, held), "one_shot": accuracy(pruned, held),
    }  # fmt: skip
    for epochs in EPOCHS:
        for label, teacher in (("distill", sample.model), ("ce", None)):
            began = time.perf_counter()
            tuned = pc.finetune(pruned, sample.train, teacher=teacher, epochs=epochs, lr=LR, device="cpu").model
            row[f"{label}_{epochs}"] = accuracy(tuned, held)
            row[f"{label}_{epochs}_s"] = time.perf_counter() - began
    row["distill_3"] = accuracy(pc.finetune(pruned, sample.train, teacher=sample.model, epochs=3, lr=LR,
                                            device="cpu").model, held)  # fmt: skip
    began = time.perf_counter()
    iterative = pc.prune_iteratively(sample.model, sample.example, pc.Budget(flops=budget), data=data.calibration,
                                     train=sample.train, calibration=data.calibration, steps=3, epochs=1, lr=LR,
                                     device="cpu")  # fmt: skip
    row["iterative_3"] = accuracy(iterative.model, held)
    row["iterative_flops_kept"] = iterative.steps[-1].flops_kept
    row["iterative_s"] = time.perf_counter() - began
    scratch = reinitialised(pc.apply_plan(sample.model, plan, graph=graph))
    row["scratch_5"] = accuracy(pc.finetune(scratch, sample.train, epochs=5, lr=SCRATCH_LR, device="cpu").model,
                                held)  # fmt: skip
    row.update(epoch_seconds(pruned, sample.train))
    return row


def accuracy(model: nn.Module, data: Any) -> float:
    return pc.evaluate(model, data, "accuracy")["accuracy"]


def reinitialised(model: nn.Module) -> nn.Module:
    """Every layer re-drawn as at construction; parameters a module owns without a reset (ViT's position
    embedding, class token) drawn from N(0, 0.02), as ViTs initialise them."""
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        elif hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
        else:
            for p in module.parameters(recurse=False):
                nn.init.trunc_normal_(p, std=0.02)
    return model


def plain_epoch(model: nn.Module, train: Any) -> float:
    """One epoch of the textbook loop, the same optimiser and schedule shape as `finetune`: its seconds."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = len(train)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    began = time.perf_counter()
    model.train()
    for x, y in train:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return time.perf_counter() - began


def epoch_seconds(model: nn.Module, train: Any) -> dict[str, float]:
    ours, plain = [], []
    for _ in range(2):  # alternated, so a busy spell of the machine hits both
        plain.append(plain_epoch(model, train))
        began = time.perf_counter()
        pc.finetune(model, train, epochs=1, lr=LR, device="cpu")
        ours.append(time.perf_counter() - began)
    return {"epoch_s": statistics.median(ours), "plain_epoch_s": statistics.median(plain)}


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["| model, FLOPs kept | dense | one-shot | +1 ep | +2 ep | +5 ep | no distill 1 / 2 / 5 ep | "
             "3 ep one-shot | 3 steps x 1 ep | scratch 5 ep | s/epoch (plain loop) |",
             "| --- |" + " ---: |" * 10]  # fmt: skip
    for r in rows:
        pct = lambda v: f"{v:.1%}"  # noqa: E731
        lines.append(
            f"| {r['model']}, {r['flops_kept']:.0%} | {pct(r['dense'])} | {pct(r['one_shot'])} | "
            f"{pct(r['distill_1'])} | {pct(r['distill_2'])} | {pct(r['distill_5'])} | "
            f"{pct(r['ce_1'])} / {pct(r['ce_2'])} / {pct(r['ce_5'])} | {pct(r['distill_3'])} | "
            f"{pct(r['iterative_3'])} ({r['iterative_flops_kept']:.0%}) | {pct(r['scratch_5'])} | "
            f"{r['epoch_s']:.1f} ({r['plain_epoch_s']:.1f}, {r['epoch_s'] / r['plain_epoch_s']:.2f}x) |"
        )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(pc.list_samples()))
    parser.add_argument("--budgets", default="0.5,0.3")
    parser.add_argument("--store", type=Path, default=Path("build/bench_recover.sqlite"))
    parser.add_argument("--json", type=Path, default=Path("build/bench_recover.json"))
    args = parser.parse_args()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(args.json.read_text()) if args.json.exists() else {}
    rows = []
    for name in args.models.split(","):
        for budget in (float(b) for b in args.budgets.split(",")):
            key = f"{name}@{budget}"
            if key not in done:
                began = time.perf_counter()
                done[key] = {**one_budget(name, budget, args.store), "seconds": time.perf_counter() - began}
                pc.files.write_atomic(args.json, json.dumps(done, indent=1))
                print(f"{key}: {done[key]['seconds']:.0f} s", flush=True)
            rows.append(done[key])
    print(report(rows))


if __name__ == "__main__":
    main()
