"""Recovery: how much of a pruned sample's accuracy do a few epochs of fine-tuning win back, and how best?

For every sample model, at `dp` plans keeping 50 % and 30 % of the FLOPs, held-out accuracy (the
1,000 digits no model trained on; for `tinylm`, perplexity on its 528 held-out blocks of text):

- one-shot: the plan applied, BatchNorm re-estimated on the calibration images, no training;
- fine-tuned for 1, 2 and 5 epochs on the training split (the 4,000 training digits, or tinylm's
  2,934 training blocks of 128 bytes; each its own cosine schedule), with distillation from the
  dense model (`distill=0.5`, T=4) and without (cross-entropy only, next-byte for tinylm);
- iterative: `prune_iteratively` in 3 steps of 1 epoch, against one-shot with 3 epochs (same total);
- from scratch: the pruned architecture re-initialised and trained for 5 epochs (cross-entropy),
  the classic baseline (Liu et al. 2019, "Rethinking the value of network pruning");
- seconds per epoch of `finetune` against a plain PyTorch loop (same model, data, optimiser and
  loss, no prunecore), alternated, median of 2 each.

Protocol: curves from an exact sweep over the 500 calibration images (tinylm: its 179 calibration
blocks) with BatchNorm re-estimated per point (as `bench_allocate.py`; cached in the run store),
`dp` protecting the loss, so nothing is selected on the held-out set. SGD (momentum 0.9, Nesterov,
weight decay 5e-4), lr 0.01 for fine-tuning and 0.05 from scratch, the batch each sample trained
with (128 digits, 32 blocks). Results are cached per (model, budget, options) in
--json, so an interrupted run continues.

Options for the best pipeline prunecore offers, still selecting nothing on the held-out set:
`--objective calibrated` allocates on the predictor `sweep --calibrate` fits (`predict.calibrate`,
24 plans measured on the calibration images) instead of adding up the curves; `--lrs 0.01,0.02`
picks the fine-tuning rate per row by a 5-epoch fine-tune on all but 500 training examples, scored
on those 500 (a seeded random split), then fine-tunes on the whole split at that rate (every
fine-tuning column, iterative included).

Run: `OMP_NUM_THREADS=2 .venv/bin/python bench/bench_recover.py [--models resnet20,vit] [--budgets 0.5,0.3]
[--objective calibrated] [--lrs 0.01,0.02]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

import prunecore as pc
from prunecore.datasets import load_data
from prunecore.predict import calibrate, objective_problem

EPOCHS = (1, 2, 5)
LR, SCRATCH_LR = 0.01, 0.05
BN_BATCHES = 50
VALIDATION = 500  # training digits held back while a learning rate is chosen


def one_budget(name: str, budget: float, store: Path, objective: str = "additive",
               lrs: tuple[float, ...] = (LR,)) -> dict[str, Any]:  # fmt: skip
    sample = pc.load_sample(name)
    calibration, held = splits(sample)
    score = scorer(sample)
    graph = pc.trace(sample.model, sample.example)
    curves = pc.sweep(sample.model, calibration, sample.example, metric=["accuracy", "loss"], graph=graph,
                      bn_recalibration=4, calibration=calibration, store=store, model_name=f"sample:{name}",
                      progress=False)  # fmt: skip
    problem = pc.allocation_problem(curves, graph, sample.model, model_name=f"sample:{name}")
    if objective == "calibrated":
        problem = objective_problem(problem, calibrate(sample.model, problem, calibration, 4, graph=graph,
                                                       seed=1))  # fmt: skip
    plan = pc.solve(problem, pc.Budget(flops=budget), "dp")
    pruned = pc.recalibrate_bn_(pc.apply_plan(sample.model, plan, graph=graph), calibration, BN_BATCHES)
    lr, scores = chosen_lr(pruned, sample, lrs)
    row: dict[str, Any] = {
        "model": name, "budget": budget, "flops_kept": plan.totals.flops_after / plan.totals.flops_before,
        "metric": score.metric, "dense": score(sample.model, held), "one_shot": score(pruned, held),
        "objective": objective, "lr": lr, "lr_validation": scores,
    }  # fmt: skip
    for epochs in EPOCHS:
        for label, teacher in (("distill", sample.model), ("ce", None)):
            began = time.perf_counter()
            tuned = pc.finetune(pruned, sample.train, teacher=teacher, epochs=epochs, lr=lr, device="cpu").model
            row[f"{label}_{epochs}"] = score(tuned, held)
            row[f"{label}_{epochs}_s"] = time.perf_counter() - began
    row["distill_3"] = score(pc.finetune(pruned, sample.train, teacher=sample.model, epochs=3, lr=lr,
                                            device="cpu").model, held)  # fmt: skip
    began = time.perf_counter()
    iterative = pc.prune_iteratively(sample.model, sample.example, pc.Budget(flops=budget), data=calibration,
                                     train=sample.train, calibration=calibration, steps=3, epochs=1, lr=lr,
                                     device="cpu")  # fmt: skip
    row["iterative_3"] = score(iterative.model, held)
    row["iterative_flops_kept"] = iterative.steps[-1].flops_kept
    row["iterative_s"] = time.perf_counter() - began
    scratch = reinitialised(pc.apply_plan(sample.model, plan, graph=graph))
    row["scratch_5"] = score(pc.finetune(scratch, sample.train, epochs=5, lr=SCRATCH_LR, device="cpu").model,
                             held)  # fmt: skip
    row.update(epoch_seconds(pruned, sample.train))
    return row


def splits(sample: pc.Sample) -> tuple[Any, Any]:
    """(calibration, held-out) data: the image samples' 500 calibration and 1,000 held-out digits, the
    language model's calibration and held-out text blocks (no split shares a document)."""
    if pc.samples.get_spec(sample.name).data == "text":
        return sample.calibration, sample.heldout
    data = load_data("sample")
    return data.calibration, data.evaluation


@dataclass(frozen=True)
class Score:
    """A sample's held-out figure: accuracy (digits, higher is better) or perplexity (text, lower is better)."""

    metric: str

    def __call__(self, model: nn.Module, data: Any) -> float:
        return pc.evaluate(model, data, self.metric)[self.metric]

    def best(self, values: dict[str, float]) -> float:
        return min(values.values()) if self.metric == "perplexity" else max(values.values())


def scorer(sample: pc.Sample) -> Score:
    return Score("perplexity" if pc.samples.get_spec(sample.name).data == "text" else "accuracy")


def chosen_lr(pruned: nn.Module, sample: pc.Sample, lrs: tuple[float, ...]) -> tuple[float, dict[str, float]]:
    """The rate of `lrs` whose 5-epoch distilled fine-tune on all but `VALIDATION` random training examples
    (digits or text blocks) scores best on those (the first of equals); one rate is taken as given. Never the
    held-out set."""
    if len(lrs) == 1:
        return lrs[0], {}
    examples = sample.train.dataset  # the digits are sorted by class: the split is a seeded permutation
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    fit = DataLoader(Subset(examples, order[VALIDATION:]), sample.train.batch_size, shuffle=True,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    validation = DataLoader(Subset(examples, order[:VALIDATION]), 250)
    score = scorer(sample)
    scores = {str(lr): score(pc.finetune(pruned, fit, teacher=sample.model, epochs=5, lr=lr, device="cpu").model,
                             validation) for lr in lrs}  # fmt: skip
    best = score.best(scores)
    return next(lr for lr in lrs if scores[str(lr)] == best), scores


def reinitialised(model: nn.Module) -> nn.Module:
    """Every layer re-drawn as at construction. Parameters a module owns without a reset: a norm's
    (RMSNorm) weight 1 and bias 0, anything else (ViT's position embedding, class token) N(0, 0.02),
    as ViTs initialise them."""
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        elif hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
        elif type(module).__name__.endswith("Norm"):
            for name, p in module.named_parameters(recurse=False):
                nn.init.ones_(p) if name == "weight" else nn.init.zeros_(p)
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
        out = model(x)
        logits = getattr(out, "logits", out)  # (N, C) or a language model's (N, T, V)
        loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
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
    """One markdown table per figure: held-out accuracy (the digit samples), perplexity (the language model)."""
    tables = []
    for metric in ("accuracy", "perplexity"):
        chosen = [r for r in rows if r.get("metric", "accuracy") == metric]
        if not chosen:
            continue
        fmt = (lambda v: f"{v:.1%}") if metric == "accuracy" else (lambda v: f"{v:.2f}")
        lines = [f"held-out {metric}:", "",
                 "| model, FLOPs kept | dense | one-shot | +1 ep | +2 ep | +5 ep | no distill 1 / 2 / 5 ep | "
                 "3 ep one-shot | 3 steps x 1 ep | scratch 5 ep | s/epoch (plain loop) |",
                 "| --- |" + " ---: |" * 10]  # fmt: skip
        for r in chosen:
            lines.append(
                f"| {r['model']}, {r['flops_kept']:.0%}{_options(r)} | {fmt(r['dense'])} | {fmt(r['one_shot'])} | "
                f"{fmt(r['distill_1'])} | {fmt(r['distill_2'])} | {fmt(r['distill_5'])} | "
                f"{fmt(r['ce_1'])} / {fmt(r['ce_2'])} / {fmt(r['ce_5'])} | {fmt(r['distill_3'])} | "
                f"{fmt(r['iterative_3'])} ({r['iterative_flops_kept']:.0%}) | {fmt(r['scratch_5'])} | "
                f"{r['epoch_s']:.1f} ({r['plain_epoch_s']:.1f}, {r['epoch_s'] / r['plain_epoch_s']:.2f}x) |"
            )  # fmt: skip
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _options(row: dict[str, Any]) -> str:
    """What a row ran with beyond the defaults (rows cached before the options have none)."""
    objective, lr = row.get("objective", "additive"), row.get("lr", LR)
    return "" if (objective, lr) == ("additive", LR) else f" ({objective}, lr {lr:g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(pc.list_samples()))
    parser.add_argument("--budgets", default="0.5,0.3")
    parser.add_argument("--store", type=Path, default=Path("build/bench_recover.sqlite"))
    parser.add_argument("--json", type=Path, default=Path("build/bench_recover.json"))
    parser.add_argument("--objective", choices=("additive", "calibrated"), default="additive")
    parser.add_argument("--lrs", default=str(LR), help="fine-tuning rates to choose from on held-back training digits")
    args = parser.parse_args()
    lrs = tuple(float(v) for v in args.lrs.split(","))
    options = "" if (args.objective, lrs) == ("additive", (LR,)) else f"/{args.objective},lr={args.lrs}"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(args.json.read_text()) if args.json.exists() else {}
    rows = []
    for name in args.models.split(","):
        for budget in (float(b) for b in args.budgets.split(",")):
            key = f"{name}@{budget}{options}"
            if key not in done:
                began = time.perf_counter()
                done[key] = {**one_budget(name, budget, args.store, args.objective, lrs),
                             "seconds": time.perf_counter() - began}  # fmt: skip
                pc.files.write_atomic(args.json, json.dumps(done, indent=1))
                print(f"{key}: {done[key]['seconds']:.0f} s", flush=True)
            rows.append(done[key])
    print(report(rows))


if __name__ == "__main__":
    main()
