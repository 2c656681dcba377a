"""Predictions a user can trust: predicted vs measured held-out accuracy and loss of many plans.

For every sample model: method plans (every allocation method at FLOPs budgets 0.9 ... 0.3, on
today's additive objective, and dp/greedy/threshold again on the corrected objective) and 20
random slider plans are applied, BatchNorm is re-estimated, and held-out accuracy and loss are
measured next to the corrected prediction (`prunecore.predict`, with its band) and today's
additive one (`AllocationProblem.predict`).

Protocol, chosen so that nothing is selected on held-out data:
- curves: exact sweep at levels 0.1..0.9 on the 500 *calibration* images (training split),
  accuracy and loss, BatchNorm re-estimated per point — as `bench/bench_allocate.py`, same store;
- calibration (right after the sweep, on the calibration images): `prunecore.predict.calibrate`
  with seed 1: 24 random slider plans and `CALIBRATION_METHODS`' plans (dp/threshold at FLOPs
  budgets 0.85/0.65/0.45/0.32, uniform/global at 0.55/0.32: off the truth budgets) on the
  additive objective; fit; dp/threshold again on the fitted objective, and refit on all of them.
  Calibration seconds are printed per model;
- the predictor is told the dense model's held-out accuracy and loss (one evaluation of the dense
  model, `reference=`) to carry the train/held-out gap over; nothing else about held-out data;
- refined: at FLOPs budgets 0.5, 0.4 and 0.3 the corrected dp plan is also refined
  (`prunecore.refine`, 60 measured moves on the calibration images, selected on their loss) and
  measured on held-out images like every other plan. Its rows are left out of the prediction
  summaries: a refined plan is chosen by measuring, so it tests allocation, not prediction;
- truth: the 1,000 held-out images. The 20 random truth plans come from other generators than the
  calibration's random plans (seed 1000): 10 "hand-edited" plans (a method plan at a random
  budget with a few groups set to random sparsities) and 10 "ramp" plans (sparsity growing or
  shrinking linearly with depth, plus noise), all keeping 30-90 % of the FLOPs.
The additive error is computed on drops (its predicted drop plus the dense held-out value), as
`bench_allocate.py` does, which is kinder to it than its raw value.

Two columns say how far any predictor of this kind could get, so the errors can be read against them:
- "from measured loss": the predictor's own loss-to-accuracy map applied to each plan's *measured*
  held-out loss, i.e. the accuracy error that would remain if loss were predicted exactly;
- "sampling": the error a perfect predictor of the plan's accuracy on unseen digits would still show
  on 1,000 images, sqrt(2/pi) times the binomial standard deviation at the measured accuracy.

Run: `.venv/bin/python bench/bench_truth.py [--models resnet20,vit] [--store PATH] [--json PATH]`
(about 10 minutes for the three samples on a fresh store; measurements are cached beside it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import prunecore as pc
from prunecore.datasets import load_data
from prunecore.predict import Predictor, calibrate, objective_problem
from prunecore.refine import refine

BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
CURVE_METHODS = ("dp", "greedy", "threshold")
RANDOM = ("edited", "ramp")  # truth generators of random plans
N_RANDOM = 10  # plans per generator
METRICS = ["accuracy", "loss"]
REFINED = (0.5, 0.4, 0.3)  # FLOPs budgets at which the corrected dp plan is also refined by measurement
REFINE_STEPS = 60  # measured moves per refinement


class Measurer:
    """Applies plans and measures them, caching results in a JSON file keyed by model, split and kept counts."""

    def __init__(self, name: str, cache: Path, bn_batches: int) -> None:
        self.name, self.cache, self.bn = name, cache, bn_batches
        self.sample = pc.load_sample(name)
        self.data = load_data("sample")
        self.graph = pc.trace(self.sample.model, self.sample.example)
        self.known: dict[str, dict[str, float]] = json.loads(cache.read_text()) if cache.exists() else {}
        self.seconds = {"calibration": 0.0, "evaluation": 0.0}

    def __call__(self, problem: pc.AllocationProblem, sparsities: dict[str, float], split: str) -> dict[str, float]:
        kept = sorted(problem.kept(sparsities).items())
        key = f"{self.name}|{split}|{self.bn}|{kept}"
        if key not in self.known:
            began = time.perf_counter()
            loader = getattr(self.data, split)
            self.known[key] = pc.evaluate_plan(
                self.sample.model, problem.plan(sparsities), loader, METRICS, bn_recalibration=self.bn,
                calibration=self.data.calibration, graph=self.graph,
            )  # fmt: skip
            self.seconds[split] += time.perf_counter() - began
            self.cache.write_text(json.dumps(self.known))
        return self.known[key]


def truth_plans(problem: pc.AllocationProblem, n: int, seed: int) -> list[tuple[str, dict[str, float]]]:
    """`n` plans of each `RANDOM` generator, keeping 30-90 % of the FLOPs: (generator, sparsities)."""
    rng = np.random.default_rng(seed)
    names, f0 = list(problem.curves), problem.cost.dense[1]
    out: list[tuple[str, dict[str, float]]] = []
    for kind in RANDOM:
        count = 0
        while count < n:
            if kind == "edited":
                method = str(rng.choice(pc.list_methods()))
                try:
                    plan = dict(pc.solve(problem, pc.Budget(flops=float(rng.uniform(0.35, 0.9))), method).sparsities)
                except pc.AllocationError:
                    continue
                for name in rng.choice(names, size=int(rng.integers(1, max(2, len(names) // 3) + 1)), replace=False):
                    plan[str(name)] = float(rng.uniform(0.0, 0.9))
            else:
                start, end = rng.uniform(0.0, 0.8, size=2)
                ramp = np.linspace(start, end, len(names)) + rng.normal(0.0, 0.1, size=len(names))
                plan = {name: float(np.clip(v, 0.0, 0.9)) for name, v in zip(names, ramp)}
            if 0.3 <= problem.price(plan)[1] / f0 <= 0.9:
                out.append((kind, plan))
                count += 1
    return out


def accuracy_from_loss(predictor: Predictor, loss: float) -> float:
    """The predictor's loss-to-accuracy map at a held-out `loss`: its accuracy if loss were predicted exactly."""
    base = loss - predictor.shift.get("loss", 0.0)  # the same loss on the calibration data
    accuracy = float(np.interp(base, *predictor.maps["accuracy"])) * predictor.shift.get("accuracy", 1.0)
    return min(max(accuracy, 0.0), 1.0)


def run_model(name: str, store: Path, bn_batches: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    measure = Measurer(name, store.with_suffix(".measured.json"), bn_batches)
    sample, data, graph = measure.sample, measure.data, measure.graph
    curves = pc.sweep(
        sample.model, data.calibration, sample.example, metric=METRICS, graph=graph, bn_recalibration=bn_batches,
        calibration=data.calibration, store=store, model_name=f"sample:{name}", progress=False,
    )  # fmt: skip
    problem = pc.allocation_problem(curves, graph, sample.model, model_name=f"sample:{name}")
    reference = pc.evaluate(sample.model, data.evaluation, METRICS)
    began = time.perf_counter()
    predictor = calibrate(sample.model, problem, data.calibration, bn_batches, graph=graph, reference=reference,
                          seed=1, measure=lambda s: measure(problem, dict(s), "calibration"))  # fmt: skip
    info = {"model": name, "calibration_s": time.perf_counter() - began, "calibration_plans": predictor.plans,
            "exponent": predictor.exponent, "power": predictor.power,
            "ceiling": predictor.ceiling, "dense": reference}  # fmt: skip
    corrected = objective_problem(problem, predictor)
    plans: list[tuple[str, str, float | None, dict[str, float]]] = []
    for budget in BUDGETS:
        for method in pc.list_methods():
            plans.append(("additive", method, budget, pc.solve(problem, pc.Budget(flops=budget), method).sparsities))
        for method in CURVE_METHODS:
            plans.append(("corrected", method, budget,
                          pc.solve(corrected, pc.Budget(flops=budget), method).sparsities))  # fmt: skip
    for budget in REFINED:  # the corrected dp plan, refined by measuring moves on the calibration images
        start = pc.solve(corrected, pc.Budget(flops=budget), "dp")
        began = time.perf_counter()
        refined = refine(sample.model, problem, start, data.calibration, steps=REFINE_STEPS,
                         measure=lambda s: measure(problem, dict(s), "calibration"))  # fmt: skip
        info.setdefault("refine", []).append({"budget": budget, "seconds": time.perf_counter() - began,
                                              "moves": refined.moves, "trials": len(refined.trials)})  # fmt: skip
        plans.append(("refined", "dp", budget, refined.plan.sparsities))
    plans += [("-", f"random:{kind}", None, s) for kind, s in truth_plans(problem, N_RANDOM, seed=1000)]
    rows = []
    samples = len(data.evaluation.dataset)
    for objective, method, budget, s in plans:
        p0, f0 = problem.cost.dense
        params, flops = problem.price(s)
        new, old = predictor.predict(s), problem.predict(s)
        truth = measure(problem, s, "evaluation")
        rows.append({
            "model": name, "objective": objective, "method": method, "budget": budget, "flops_kept": flops / f0,
            **{f"{m}_{k}": getattr(new[m], k) for m in METRICS for k in ("value", "low", "high")},
            **{f"{m}_additive": old[m] - problem.dense[m] + reference[m] for m in METRICS},
            **{f"{m}_measured": truth[m] for m in METRICS},
            "accuracy_from_loss": accuracy_from_loss(predictor, truth["loss"]),
            "sampling_sd": float(np.sqrt(truth["accuracy"] * (1.0 - truth["accuracy"]) / samples)),
        })  # fmt: skip
    info["measure_s"] = dict(measure.seconds)
    return pd.DataFrame(rows), info


def summary(table: pd.DataFrame) -> dict[str, float]:
    """MAE / worst in accuracy points, band coverage, loss relative errors, over 30-90 % FLOPs kept."""
    t = table[(table.flops_kept >= 0.3 - 1e-9) & (table.flops_kept <= 0.9 + 1e-9)]
    err = (t.accuracy_value - t.accuracy_measured).abs() * 100
    old = (t.accuracy_additive - t.accuracy_measured).abs() * 100
    from_loss = (t.accuracy_from_loss - t.accuracy_measured).abs() * 100
    covered = (t.accuracy_low <= t.accuracy_measured) & (t.accuracy_measured <= t.accuracy_high)
    loss_covered = (t.loss_low <= t.loss_measured) & (t.loss_measured <= t.loss_high)
    return {
        "plans": len(t), "mae": err.mean(), "worst": err.max(), "coverage": covered.mean(),
        "loss_rel": ((t.loss_value - t.loss_measured).abs() / t.loss_measured).mean(),
        "loss_rel_worst": ((t.loss_value - t.loss_measured).abs() / t.loss_measured).max(),
        "loss_coverage": loss_covered.mean(), "additive_mae": old.mean(), "additive_worst": old.max(),
        "additive_loss_rel": ((t.loss_additive - t.loss_measured).abs() / t.loss_measured).mean(),
        "from_loss_mae": from_loss.mean(), "from_loss_worst": from_loss.max(),
        "sampling_mae": (t.sampling_sd * np.sqrt(2.0 / np.pi) * 100).mean(),
    }  # fmt: skip


def report(results: pd.DataFrame, infos: list[dict[str, Any]]) -> str:
    lines = []
    for info in infos:
        name = info["model"]
        table = results[results.model == name]
        lines.append(
            f"\n{name}: dense held-out accuracy {info['dense']['accuracy']:.1%}, loss {info['dense']['loss']:.3f}; "
            f"calibration {info['calibration_plans']} plans in {info['calibration_s']:.0f} s "
            f"(q={info['exponent']}, p={info['power']}, ceiling={info['ceiling']:.2f})"
        )
        lines.append("| objective | method | budget | FLOPs kept | accuracy: predicted [band] | additive | measured "
                     "| loss: predicted [band] | additive | measured |")  # fmt: skip
        lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in table.itertuples():
            budget = "" if r.budget is None or np.isnan(r.budget) else f"{r.budget:.1f}"
            lines.append(
                f"| {r.objective} | {r.method} | {budget} | {r.flops_kept:.0%} | {r.accuracy_value:.1%} "
                f"[{r.accuracy_low:.1%}, {r.accuracy_high:.1%}] | {r.accuracy_additive:.1%} "
                f"| {r.accuracy_measured:.1%} "
                f"| {r.loss_value:.3f} [{r.loss_low:.3f}, {r.loss_high:.3f}] | {r.loss_additive:.3f} "
                f"| {r.loss_measured:.3f} |"
            )
        lines.append("\n| plans | n | MAE (worst), pts | band coverage | loss rel. err (worst) | additive MAE (worst) "
                     "| additive loss rel. | from measured loss: MAE (worst) | sampling MAE |")  # fmt: skip
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        scored = table[table.objective != "refined"]  # refined plans are chosen by measuring: not a prediction test
        curve = scored.method.isin(CURVE_METHODS)
        random = scored.method.str.startswith("random")
        groups = (("all", scored), ("curve methods", scored[curve]), ("random", scored[random]),
                  ("uniform/global", scored[scored.method.isin(["uniform", "global"])]))  # fmt: skip
        for label, rows in groups:
            s = summary(rows)
            lines.append(
                f"| {label} | {s['plans']} | {s['mae']:.2f} ({s['worst']:.1f}) | {s['coverage']:.0%} "
                f"| {s['loss_rel']:.1%} ({s['loss_rel_worst']:.0%}) "
                f"| {s['additive_mae']:.2f} ({s['additive_worst']:.1f}) "
                f"| {s['additive_loss_rel']:.1%} | {s['from_loss_mae']:.2f} ({s['from_loss_worst']:.1f}) "
                f"| {s['sampling_mae']:.2f} |"
            )
        for budget in REFINED:
            cells = []
            for objective in ("additive", "corrected", "refined"):
                r = table[(table.objective == objective) & (table.method == "dp") & (table.budget == budget)].iloc[0]
                cells.append(f"{objective} {r.accuracy_measured:.1%} (loss {r.loss_measured:.3f})")
            lines.append(f"dp @ {budget:.0%} FLOPs, measured: " + " vs ".join(cells))
        lines.append(f"measurement seconds: {info['measure_s']}")
        lines.append("refinement: " + "; ".join(f"{r['budget']:.0%} FLOPs, {r['moves']} of {r['trials']} moves kept, "
                                                 f"{r['seconds']:.0f} s" for r in info["refine"]))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("/tmp/prunecore_truth/runs.db"))
    parser.add_argument("--models", default=",".join(pc.list_samples()))
    parser.add_argument("--bn-batches", type=int, default=4, help="calibration batches per BN re-estimation")
    parser.add_argument("--json", type=Path, help="also write the raw rows and per-model info here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.store.parent.mkdir(parents=True, exist_ok=True)
    parts = [run_model(name, args.store, args.bn_batches) for name in args.models.split(",")]
    results = pd.concat([table for table, _ in parts])
    print(report(results, [info for _, info in parts]))
    if args.json:
        args.json.write_text(json.dumps({"rows": results.to_dict(orient="records"),
                                         "models": [info for _, info in parts]}, indent=1, default=float))  # fmt: skip


if __name__ == "__main__":
    main()
