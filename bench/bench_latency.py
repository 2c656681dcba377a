"""Latency model benchmark: how well `prunecore.latency` predicts, and what a latency budget buys.

For every model (default: the sample image models resnet20, mobilenet_v2 and vit at batch 1, and
torchvision resnet50, random init, 224 px, at batch 1 and 32), per runtime (PyTorch eager on the
CPU, ONNX Runtime's CPU provider) and batch:

1. **Prediction against measurement.** `latency_model` is built (layer tables timed, then
   calibrated on whole models; build time reported), then 10 test plans are made: uniform at 20,
   40, 60 and 80 % sparsity and 6 with seeded random per-group sparsities in [0, 0.8] (a seed other
   than the calibration's, so no test plan is a calibration plan). Every plan keeps channel counts
   rounded to `--round-to` (8): ONNX Runtime's CPU convs pad channels into blocks of 8 (16 with
   AVX-512) and take a slow path on input widths not divisible by 4 (`latency.py`, `align=4`), so
   unrounded plans would measure that path rather than the model. The dense model and the 10 pruned
   ones are timed whole, rounds interleaved (`measure_plans_ms`); reported: the median and largest
   |predicted - measured| / measured over the 10 plans (every plan with `--verbose`).
2. **Latency budget against FLOPs budget** (sample models: they have labelled data). Curves are
   swept on the 500 calibration images (accuracy and loss, BatchNorm re-estimated per point, as in
   `bench_allocate.py`). A latency budget halfway (`--latency-share`) between the smallest reachable
   predicted latency and the dense one is allocated by `--method` (default `dp`) twice: FLOPs-guided
   (the default of `solve`: the method's plan for the largest FLOPs budget whose predicted latency
   fits) and latency-guided (`guide="latency"`: the method trades damage against predicted ms).
   Then the FLOPs-budget plan whose *measured* latency is closest to the latency-guided plan's
   (bisection on the FLOPs fraction, each step timing both plans together; the table gives the
   final interleaved timing of all three). Held-out accuracy of each (1,000 images, BatchNorm
   re-estimated on the calibration images). Under test: the FLOPs-guided plan meets its budget as
   measured, and whether the latency-guided plan is at least as accurate at equal measured latency.
3. **Dense / pruned / pruned + INT8** (sample models): `measure_plan(..., int8=True)` on the latency
   plan of the first runtime and batch: held-out accuracy and latency of the dense and pruned models
   in PyTorch and of the pruned model quantised to INT8 in ONNX Runtime, timed in the same rounds at
   the plan's example batch.

On a shared CPU only numbers measured within one run compare; absolute milliseconds do not carry
over between runs or machines. Tables and curves go to a temporary run store unless `--store`.

Run: `.venv/bin/python bench/bench_latency.py [--quick] [--verbose] [--models resnet20,resnet50]
[--runtimes torch,onnxruntime] [--batches 1,32] [--threads 2] [--store PATH] [--json PATH]`.
`--quick` (resnet20, torch, estimated curves) only checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

import prunecore as pc
from prunecore.datasets import EvalData, load_data
from prunecore.latency import LatencyModel, latency_model, list_runtimes, measure_plans_ms

SAMPLES = ("resnet20", "mobilenet_v2", "vit")  # the image samples: labelled digits
DEFAULT_MODELS = (*SAMPLES, "resnet50")
DEFAULT_BATCHES = {"resnet50": (1, 32)}  # others: batch 1
UNIFORM = (0.2, 0.4, 0.6, 0.8)
RANDOM_PLANS = 6
MAX_RANDOM = 0.8
TEST_SEED_OFFSET = 1000  # test plans draw from seed + this; the calibration plans from seed itself


@dataclass(frozen=True, eq=False)
class Subject:
    """One model to time: a sample (with labelled data) or torchvision resnet50 (random init)."""

    name: str
    model: nn.Module
    example: torch.Tensor
    graph: pc.ChannelGraph
    cost: pc.CostModel
    batches: tuple[int, ...]
    labelled: bool


def load_subject(name: str, batches: tuple[int, ...] | None, image_size: int) -> Subject:
    if name == "resnet50":
        model = torchvision.models.resnet50(weights=None).eval()
        example = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        labelled = False
    else:
        sample = pc.load_sample(name)
        model, example, labelled = sample.model, sample.example[:1], name in SAMPLES
    graph = pc.trace(model, example)
    return Subject(name, model, example, graph, pc.cost_model(model, example, graph),
                   batches or DEFAULT_BATCHES.get(name, (1,)), labelled)  # fmt: skip


def flops_kept(plan: pc.Plan, cost: pc.CostModel) -> float:
    """The share of the dense model's MACs `plan` keeps (`make_plan`'s plans carry no totals)."""
    _, flops = cost.price({n: len(g.keep) for n, g in plan.groups.items() if n in cost.groups})
    return flops / cost.dense[1]


# -- 1. prediction against measurement -----------------------------------------------------------------------
def test_plans(subject: Subject, round_to: int, seed: int) -> list[tuple[str, pc.Plan]]:
    """4 uniform plans and `RANDOM_PLANS` with seeded random per-group sparsities in [0, MAX_RANDOM]."""
    model, graph = subject.model, subject.graph
    plans = [(f"uniform {s:.0%}", pc.make_plan(model, graph, s, round_to=round_to)) for s in UNIFORM]
    rng = np.random.default_rng(seed + TEST_SEED_OFFSET)
    for r in range(RANDOM_PLANS):
        sparsity = {g.name: float(rng.uniform(0.0, MAX_RANDOM)) for g in graph.prunable}
        plans.append((f"random {r + 1}", pc.make_plan(model, graph, sparsity, round_to=round_to)))
    return plans


def check_predictions(subject: Subject, runtime: str, batch: int, store: Path, args: argparse.Namespace
                      ) -> tuple[LatencyModel, dict[str, Any]]:  # fmt: skip
    began = time.perf_counter()
    lm = latency_model(subject.model, subject.example, subject.graph, runtime=runtime, batch=batch, store=store,
                       round_to=args.round_to, seed=args.seed)  # fmt: skip
    build_s = time.perf_counter() - began
    plans = test_plans(subject, args.round_to, args.seed)
    measured = measure_plans_ms(subject.model, subject.example, subject.graph, [None] + [p for _, p in plans],
                                runtime, batch)  # fmt: skip
    rows = []
    for (what, plan), ms in zip(plans, measured[1:]):
        predicted = lm.predict(plan)
        rows.append({"plan": what, "flops_kept": flops_kept(plan, subject.cost), "predicted_ms": predicted,
                     "measured_ms": ms, "error": abs(predicted - ms) / ms})  # fmt: skip
    errors = [r["error"] for r in rows]
    summary = {
        "model": subject.name, "runtime": runtime, "batch": batch, "build_s": build_s, "layers": len(lm.layers),
        "in_context": lm.in_context,
        "calibration": len(lm.calibration), "calibration_error": lm.error, "dense_predicted_ms": lm.dense_ms,
        "dense_measured_ms": measured[0], "median_error": statistics.median(errors), "max_error": max(errors),
        "worst": rows[int(np.argmax(errors))]["plan"], "plans": rows,
    }  # fmt: skip
    return lm, summary


# -- 2. latency budget against FLOPs budget ------------------------------------------------------------------
def matched_flops_plan(problem: pc.AllocationProblem, subject: Subject, target: pc.Plan, runtime: str, batch: int,
                       steps: int, method: str) -> pc.Plan:  # fmt: skip
    """The `method` FLOPs-budget plan whose measured latency is closest to `target`'s, by bisection on the fraction.

    Each step times the candidate together with `target` (interleaved rounds), so a slow spell on
    the machine slows both; the bracket starts at half and 1.5 times `target`'s FLOPs fraction.
    """
    f0 = flops_kept(target, subject.cost)
    lo, hi, f = f0 / 2, min(1.0, f0 * 1.5), f0
    tried: list[tuple[float, pc.Plan]] = []
    for _ in range(steps):
        try:
            plan = pc.solve(problem, pc.Budget(flops=f), method)
        except pc.AllocationError:  # too small a budget for the sparsity bounds: go up
            lo, f = f, (f + hi) / 2
            continue
        target_ms, plan_ms = measure_plans_ms(subject.model, subject.example, subject.graph, [target, plan],
                                              runtime, batch)  # fmt: skip
        tried.append((abs(plan_ms / target_ms - 1.0), plan))
        lo, hi = (lo, f) if plan_ms > target_ms else (f, hi)
        f = (lo + hi) / 2
    if not tried:
        raise pc.AllocationError(f"no FLOPs budget between {lo:.0%} and {hi:.0%} could be allocated")
    return min(tried, key=lambda t: t[0])[1]


def latency_vs_flops(subject: Subject, curves: Any, lm: LatencyModel, data: EvalData, args: argparse.Namespace
                     ) -> tuple[pc.Plan, list[dict[str, Any]]]:  # fmt: skip
    model, graph = subject.model, subject.graph
    problem = pc.allocation_problem(curves, graph, model, model_name=f"sample:{subject.name}", latency=lm)
    floor = problem.floor("latency", args.method)
    budget = pc.Budget(latency=floor + args.latency_share * (lm.dense_ms - floor))
    by_latency = pc.solve(problem, budget, args.method)  # guide="flops", the default
    direct = pc.solve(problem, budget, args.method, guide="latency")
    matched = matched_flops_plan(problem, subject, direct, lm.runtime, lm.batch, args.bisect_steps, args.method)
    plans = {f"latency budget {budget.value:.3g} ms, FLOPs-guided": by_latency,
             f"latency budget {budget.value:.3g} ms, latency-guided": direct,
             "FLOPs budget, same measured latency as latency-guided": matched}  # fmt: skip
    dense_ms, *measured = measure_plans_ms(model, subject.example, graph, [None, *plans.values()], lm.runtime,
                                           lm.batch)  # fmt: skip
    rows = []
    for (what, plan), ms in zip(plans.items(), measured):
        accuracy = pc.evaluate_plan(model, plan, data.evaluation, "accuracy", bn_recalibration=args.bn_batches,
                                    calibration=data.calibration, graph=graph)["accuracy"]  # fmt: skip
        rows.append({"model": subject.name, "runtime": lm.runtime, "batch": lm.batch, "plan": what,
                     "flops_kept": flops_kept(plan, subject.cost), "predicted_ms": lm.predict(plan), "measured_ms": ms,
                     "dense_ms": dense_ms, "accuracy": accuracy, "budget_ms": budget.value})  # fmt: skip
    return by_latency, rows


def sweep_curves(subject: Subject, data: EvalData, store: Path, args: argparse.Namespace) -> Any:
    settings = {"mode": "estimate"} if args.sweep == "estimate" else {"bn_recalibration": args.bn_batches}
    return pc.sweep(subject.model, data.calibration, subject.example, metric=["accuracy", "loss"],
                    graph=subject.graph, calibration=data.calibration, store=store, round_to=args.round_to,
                    model_name=f"sample:{subject.name}", **settings)  # fmt: skip


# -- 3. dense / pruned / INT8 --------------------------------------------------------------------------------
def int8_rows(subject: Subject, plan: pc.Plan, data: EvalData, args: argparse.Namespace) -> list[dict[str, Any]]:
    m = pc.measure_plan(subject.model, plan, data, "accuracy", bn_recalibration=args.bn_batches, graph=subject.graph,
                        int8=True)  # fmt: skip
    assert m.latency is not None  # measure_plan times by default
    dense, pruned = m.latency
    rows = [("dense", "torch", m.dense["accuracy"], dense), ("pruned", "torch", m.metrics["accuracy"], pruned)]
    if m.int8 is not None:
        rows.append(("pruned + INT8", "onnxruntime", m.int8.metrics["accuracy"], m.int8.latency))
    out = [{"model": subject.name, "row": what, "runtime": runtime, "accuracy": acc, "ms": t.median_s * 1e3,
            "spread": t.spread, "batch": t.batch, "flops_kept": m.flops / m.dense_flops if what != "dense" else 1.0,
            "speedup": dense.median_s / t.median_s} for what, runtime, acc, t in rows]  # fmt: skip
    if m.int8 is None:
        out.append({"model": subject.name, "row": "pruned + INT8", "error": m.int8_error})
    return out


# -- report --------------------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list[str]], text: int = 1) -> str:
    """A markdown table, its first `text` columns left-aligned and the others (numbers) right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * text + " ---: |" * (len(header) - text)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def report_predictions(summaries: list[dict[str, Any]], verbose: bool) -> str:
    out = [table(
        ["model", "runtime", "worst plan", "batch", "build s", "layers", "groups alone", "dense ms predicted",
         "dense ms measured",
         "calibration error (in-sample)", "median error (10 plans)", "max error"],
        [[s["model"], s["runtime"], s["worst"], str(s["batch"]), f"{s['build_s']:.1f}", str(s["layers"]),
          "timed" if s["in_context"] else "no", f"{s['dense_predicted_ms']:.3g}", f"{s['dense_measured_ms']:.3g}",
          f"{s['calibration_error']:.1%} ({s['calibration']} models)", f"{s['median_error']:.1%}",
          f"{s['max_error']:.1%}"] for s in summaries], text=3,
    )]  # fmt: skip
    if verbose:
        for s in summaries:
            out.append(f"\n{s['model']}, {s['runtime']}, batch {s['batch']}:\n")
            out.append(table(["plan", "FLOPs kept", "predicted ms", "measured ms", "error"],
                             [[r["plan"], f"{r['flops_kept']:.1%}", f"{r['predicted_ms']:.3g}",
                               f"{r['measured_ms']:.3g}", f"{r['error']:.1%}"] for r in s["plans"]]))  # fmt: skip
    return "\n".join(out)


def report_budgets(rows: list[dict[str, Any]]) -> str:
    out = [table(
        ["model", "runtime", "plan", "batch", "FLOPs kept", "predicted ms", "measured ms", "of dense",
         "held-out accuracy"],
        [[r["model"], r["runtime"], r["plan"], str(r["batch"]), f"{r['flops_kept']:.1%}", f"{r['predicted_ms']:.3g}",
          f"{r['measured_ms']:.3g}", f"{r['measured_ms'] / r['dense_ms']:.0%}", f"{r['accuracy']:.1%}"]
         for r in rows], text=3,
    )]  # fmt: skip
    for k in range(0, len(rows), 3):
        guided, direct, matched = rows[k : k + 3]
        over = guided["measured_ms"] / guided["budget_ms"] - 1.0
        verdict = "not worse" if direct["accuracy"] >= matched["accuracy"] else "WORSE"
        gap = matched["measured_ms"] / direct["measured_ms"] - 1.0
        out.append(f"- {guided['model']}, {guided['runtime']}, batch {guided['batch']}: the FLOPs-guided plan "
                   f"measured {over:+.1%} against its budget; the latency-guided plan ({direct['accuracy']:.1%}) is "
                   f"{verdict} than the FLOPs plan matched on measured latency ({matched['accuracy']:.1%}, which "
                   f"measured {gap:+.1%} of its time in the same rounds)")  # fmt: skip
    return "\n".join(out)


def report_int8(rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if "error" not in r]
    out = [table(
        ["model", "model run", "runtime", "FLOPs kept", "held-out accuracy", "latency ms (batch)", "speed-up"],
        [[r["model"], r["row"], r["runtime"], f"{r['flops_kept']:.1%}", f"{r['accuracy']:.1%}",
          f"{r['ms']:.3g} ±{r['spread']:.0%} ({r['batch']})", f"{r['speedup']:.2f}x"] for r in done], text=3,
    )]  # fmt: skip
    out += [f"- {r['model']}: no INT8 model: {r['error']}" for r in rows if "error" in r]
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, store: Path) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {"predictions": [], "budgets": [], "int8": []}
    data = None
    for name in args.models:
        subject = load_subject(name, args.batches, args.image_size)
        curves = None
        latency_plan = None
        for runtime in args.runtimes:
            for batch in subject.batches:
                lm, summary = check_predictions(subject, runtime, batch, store, args)
                results["predictions"].append(summary)
                print(f"\n{name}, {runtime}, batch {batch}: {summary['median_error']:.1%} median error", flush=True)
                if not subject.labelled or args.skip_budgets:
                    continue
                if data is None:
                    data = load_data("sample")
                curves = curves if curves is not None else sweep_curves(subject, data, store, args)
                try:
                    plan, rows = latency_vs_flops(subject, curves, lm, data, args)
                except pc.AllocationError as exc:
                    print(f"- {name}, {runtime}, batch {batch}: no latency plan: {exc}")
                    continue
                results["budgets"] += rows
                if latency_plan is None:
                    latency_plan = plan
        if latency_plan is not None and not args.skip_int8:
            assert data is not None
            results["int8"] += int8_rows(subject, latency_plan, data, args)
    return results


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    out = [f"\n## Latency model: predicted against measured ({torch.get_num_threads()} threads)\n",
           f"Plans keep channel counts rounded to {args.round_to}: ONNX Runtime's CPU convs pad channels into "
           "blocks of 8 (16 with AVX-512) and take a slow path on input widths not divisible by 4. Error: "
           "|predicted - measured| / measured; calibration error is on the models the latency model was fitted to.\n",
           report_predictions(results["predictions"], args.verbose)]  # fmt: skip
    if results["budgets"]:
        out += [f"\n## Latency budget ({args.latency_share:.0%} of the way from the smallest reachable to the dense "
                f"predicted ms) against FLOPs budget, {args.method}, BatchNorm re-estimated\n",
                report_budgets(results["budgets"])]  # fmt: skip
    if results["int8"]:
        out += ["\n## Dense / pruned (latency plan) / pruned + INT8, measure_plan\n", report_int8(results["int8"])]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="resnet20, torch, estimated curves: checks that it runs")
    parser.add_argument("--models", help=f"comma-separated, from {', '.join(DEFAULT_MODELS)} (default: all)")
    parser.add_argument("--runtimes", help=f"comma-separated, from {', '.join(list_runtimes())} "
                        "(default: torch,onnxruntime)")  # fmt: skip
    parser.add_argument("--batches", help="comma-separated batch sizes for every model (default: 1; resnet50 1,32)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (ONNX Runtime follows)")
    parser.add_argument("--round-to", type=int, default=8, help="kept channels rounded to a multiple of this")
    parser.add_argument("--image-size", type=int, default=224, help="resnet50's input size")
    parser.add_argument("--seed", type=int, default=0, help="calibration plans' seed; test plans use seed + 1000")
    parser.add_argument("--bn-batches", type=int, default=4, help="calibration batches per BN re-estimation")
    parser.add_argument("--latency-share", type=float, default=0.5, help="step 2's budget: this share of the way "
                        "from the smallest reachable predicted latency to the dense one")  # fmt: skip
    parser.add_argument("--method", default="dp", help="allocation method of step 2")
    parser.add_argument("--bisect-steps", type=int, default=5, help="steps matching the FLOPs plan's latency")
    parser.add_argument("--sweep", choices=("exact", "estimate"), help="how curves are made (default: exact)")
    parser.add_argument("--skip-budgets", action="store_true", help="step 1 only: no sweeps, no allocation")
    parser.add_argument("--skip-int8", action="store_true", help="no dense / pruned / INT8 rows")
    parser.add_argument("--store", type=Path, help="run store for tables, calibrations and curves (default: temporary)")
    parser.add_argument("--verbose", action="store_true", help="predicted and measured ms of every plan")
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args()
    quick = {"models": "resnet20", "runtimes": "torch", "sweep": "estimate"} if args.quick else {}
    defaults = {"models": ",".join(DEFAULT_MODELS), "runtimes": "torch,onnxruntime", "sweep": "exact"}
    for key, value in defaults.items():
        setattr(args, key, getattr(args, key) or quick.get(key, value))
    args.models, args.runtimes = args.models.split(","), args.runtimes.split(",")
    args.batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else None
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        store = args.store or Path(tmp) / "runs.db"
        store.parent.mkdir(parents=True, exist_ok=True)
        results = run(args, store)
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
