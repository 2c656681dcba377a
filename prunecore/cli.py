"""The `prunecore` command: a thin face over the Python API.

    prunecore inspect --model sample:resnet20
    prunecore prune --model sample:resnet20 --sparsity 0.3 --data sample --check --out pruned.pt
    prunecore prune --model torchvision:resnet18 --sparsity 0.5 --round-to 8 --out pruned.pt
    prunecore sweep --model sample:resnet20 --data sample --levels 0.1,0.3,0.5,0.7 --out curves.csv
    prunecore runs
    prunecore criteria

Bad input (an unknown model, an unreadable weights file, a sparsity out of range, a model that
cannot be traced) ends with a one-line message and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Sequence

import torch

from prunecore.cost import count, latency
from prunecore.datasets import DataSpecError, EvalData, load_data
from prunecore.evaluate import evaluate, recalibrate_bn_
from prunecore.graph import ChannelGraph, TraceError, trace
from prunecore.importance import get_criterion, list_criteria
from prunecore.models import ModelSpecError, default_input_shape, load_model
from prunecore.plan import PlanError
from prunecore.samples import SampleError
from prunecore.sensitivity import DEFAULT_LEVELS, DENSE, sweep
from prunecore.store import RunStore, StoreError
from prunecore.prune import make_plan
from prunecore.surgery import apply_plan

_USER_ERRORS = (
    ModelSpecError, DataSpecError, SampleError, StoreError, TraceError, PlanError, ValueError, FileNotFoundError,
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except _USER_ERRORS as exc:
        print(f"prunecore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunecore: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunecore", description="Structured pruning for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser("inspect", help="trace a model and list its channel groups")
    _model_args(inspect)
    inspect.set_defaults(run=_inspect)

    prune = sub.add_parser("prune", help="prune every prunable group to one sparsity")
    _model_args(prune)
    prune.add_argument("--sparsity", type=float, required=True, help="fraction of units to remove, in [0, 1)")
    prune.add_argument("--criterion", default="l1", choices=list_criteria(), help="importance criterion")
    prune.add_argument("--round-to", type=int, default=1, help="round kept channel counts to a multiple")
    prune.add_argument("--check", action="store_true", help="verify the pruned model against its masked twin")
    prune.add_argument("--data", help="'sample': also report held-out accuracy, with BatchNorm re-estimated")
    prune.add_argument("--out", type=Path, help="write the pruned state_dict here, and the plan beside it")
    prune.set_defaults(run=_prune)

    sweep = sub.add_parser("sweep", help="sensitivity curves: prune each group alone at rising sparsity")
    _model_args(sweep)
    sweep.add_argument("--data", required=True, help="'sample' or imagefolder:PATH (class subfolders: labelled)")
    sweep.add_argument("--limit", type=int, help="use at most N images")
    sweep.add_argument("--levels", type=_levels, default=DEFAULT_LEVELS, help="sparsities, e.g. 0.1,0.3,0.5")
    sweep.add_argument("--metric", type=_names, default=None, help="metrics, e.g. accuracy,loss or kl,agreement")
    sweep.add_argument("--criterion", default="l1", choices=list_criteria())
    sweep.add_argument("--bn-recalibration", type=int, default=0, metavar="N",
                       help="re-estimate BatchNorm statistics on N calibration batches per point")  # fmt: skip
    sweep.add_argument("--groups", type=_names, help="only these groups (comma-separated names)")
    sweep.add_argument("--mode", choices=["exact", "estimate"], default="exact",
                       help="exact: measure every point; estimate: predict the loss curve from gradients")  # fmt: skip
    sweep.add_argument("--store", type=Path, help="run store database (default: $PRUNECORE_STORE or the user cache)")
    sweep.add_argument("--out", type=Path, help="also write the curves to a .csv or .parquet file")
    sweep.set_defaults(run=_sweep)

    runs = sub.add_parser("runs", help="list, export or delete stored sweeps")
    runs.add_argument("--store", type=Path)
    runs.add_argument("--export", metavar="RUN_ID", help="write this run's curves to --out")
    runs.add_argument("--delete", metavar="RUN_ID", help="delete this run")
    runs.add_argument("--out", type=Path)
    runs.set_defaults(run=_runs)

    criteria = sub.add_parser("criteria", help="list the importance criteria")
    criteria.set_defaults(run=_criteria)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="sample:NAME, torchvision:NAME or package.module:function")
    p.add_argument("--weights", type=Path, help="a state_dict file (loaded with weights_only=True)")
    p.add_argument("--input", type=_shape, help="example input shape, e.g. 1,3,224,224 (default: the model's own)")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must be comma-separated integers, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"input shape must be positive integers, got {text!r}")
    return shape


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, ChannelGraph]:
    model = load_model(args.model, args.weights)
    if args.input is None:
        args.input = default_input_shape(args.model)
        if args.input is None:
            raise ValueError(f"pass --input: prunecore cannot know what input {args.model} expects")
    example = torch.randn(args.input, generator=torch.Generator().manual_seed(0))
    return model, example, trace(model, example)


def _inspect(args: argparse.Namespace) -> int:
    model, example, graph = _load(args)
    cost = count(model, example)
    print(f"{args.model}  input {'x'.join(map(str, args.input))}  {_num(cost.params)} params  {_num(cost.flops)} MACs")
    print(graph.summary())
    return 0


def _prune(args: argparse.Namespace) -> int:
    model, example, graph = _load(args)
    if get_criterion(args.criterion).needs_data:
        raise ValueError(f"criterion {args.criterion!r} needs data; the prune command has none yet")
    plan = make_plan(model, graph, args.sparsity, args.criterion, args.round_to)
    pruned = apply_plan(model, plan, graph=graph)
    before, after = count(model, example), count(pruned, example)
    t_before, t_after = latency(model, example), latency(pruned, example)
    print(f"model      {args.model} ({graph.model_type}), input {'x'.join(map(str, args.input))}")
    print(f"groups     {len(graph.groups)} ({len(graph.prunable)} prunable)")
    print(f"plan       {args.criterion}, sparsity {args.sparsity:g}, round_to {args.round_to}")
    print(f"{'':10} {'dense':>10} {'pruned':>10}   kept")
    print(f"{'params':10} {_num(before.params):>10} {_num(after.params):>10}   {after.params / before.params:6.1%}")
    print(f"{'MACs':10} {_num(before.flops):>10} {_num(after.flops):>10}   {after.flops / before.flops:6.1%}")
    print(
        f"{'latency':10} {t_before * 1e3:>8.1f}ms {t_after * 1e3:>8.1f}ms   "
        f"{t_before / t_after:.2f}x faster (CPU, median of 10)"
    )
    if args.data is not None:
        _report_accuracy(model, pruned, load_data(args.data))
    status = 0
    if args.check:
        masked = apply_plan(model, plan, mode="mask", graph=graph)
        with torch.no_grad():
            a, b = pruned(example), masked(example)
        diff = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
        ok = diff < 1e-4
        print(f"check      max |pruned - masked| / max |masked| = {diff:.1e}  {'OK' if ok else 'MISMATCH'}")
        status = 0 if ok else 1
    if args.out is not None:
        plan_path = args.out.with_suffix(".plan.json")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(pruned.state_dict(), args.out)
        plan_path.write_text(plan.to_json())
        print(f"saved      {args.out} (state_dict) and {plan_path} (plan)")
        print("rebuild    apply_plan(load_model(MODEL), Plan.from_json(PLAN_TEXT)).load_state_dict(STATE_DICT)")
    return status


def _report_accuracy(model: torch.nn.Module, pruned: torch.nn.Module, data: EvalData) -> None:
    """Dense vs pruned accuracy; the pruned model is also measured after BatchNorm re-estimation."""
    dense = evaluate(model, data.evaluation, ["accuracy", "loss"])
    raw = evaluate(pruned, data.evaluation, ["accuracy", "loss"])
    recalibrated = evaluate(recalibrate_bn_(copy.deepcopy(pruned), data.calibration), data.evaluation, ["accuracy"])
    print(f"{'accuracy':10} {dense['accuracy']:>10.2%} {raw['accuracy']:>10.2%}   "
          f"{recalibrated['accuracy']:.2%} after BatchNorm re-estimation (no fine-tuning)")  # fmt: skip


def _sweep(args: argparse.Namespace) -> int:
    model, example, graph = _load(args)
    data = load_data(args.data, input_shape=tuple(example.shape), limit=args.limit)
    metrics = args.metric or (["accuracy", "loss"] if data.labelled else ["kl", "agreement"])
    if args.mode == "estimate":
        metrics = ["loss"]
    store = RunStore(args.store)
    print(f"sweeping {args.model} on {data.description}: {len(graph.prunable)} groups x {len(args.levels)} levels")
    curves = sweep(
        model, data.evaluation, example, levels=args.levels, criterion=args.criterion, metric=metrics,
        groups=args.groups, bn_recalibration=args.bn_recalibration, calibration=data.calibration,
        store=store, graph=graph, model_name=args.model, mode=args.mode,
    )  # fmt: skip
    print(f"run {curves.attrs['run_id']} in {store.path}: {len(curves)} rows")
    print(_curve_table(curves, metrics[0]))
    if args.out is not None:
        store.export(curves.attrs["run_id"], args.out)
        print(f"wrote {args.out}")
    return 0


def _curve_table(curves, metric: str) -> str:
    """Groups as rows, sparsity levels as columns: the metric at each point."""
    points = curves[curves.group != DENSE]
    table = points.pivot(index="group", columns="sparsity", values=metric).reindex(points.group.unique())
    dense = curves[curves.group == DENSE][metric]
    head = f"{metric} (dense {dense.iloc[0]:.4g})" if len(dense) else metric
    return head + "\n" + table.to_string(float_format=lambda v: f"{v:.3f}")


def _runs(args: argparse.Namespace) -> int:
    store = RunStore(args.store)
    if args.delete:
        store.delete(args.delete)
        print(f"deleted run {args.delete}")
        return 0
    if args.export:
        if args.out is None:
            raise ValueError("--export needs --out FILE.csv or FILE.parquet")
        print(f"wrote {store.export(args.export, args.out)}")
        return 0
    runs = store.runs()
    if not runs:
        print(f"no stored sweeps in {store.path}")
    for r in runs:
        state = "complete" if r.complete else f"{r.points}/{r.expected} points"
        print(f"{r.run_id}  {r.created[:19]}  {r.model_name:<28} {state:<16} {r.config.get('metrics')}")
    return 0


def _levels(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _criteria(args: argparse.Namespace) -> int:
    for name in list_criteria():
        crit = get_criterion(name)
        print(f"{name:10} {'(needs data) ' if crit.needs_data else ''}{crit.doc}")
    return 0


def _num(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


if __name__ == "__main__":
    raise SystemExit(main())
