"""The `prunecore` command: a thin face over the Python API.

    prunecore inspect --model sample:resnet20
    prunecore prune --model sample:resnet20 --sparsity 0.3 --data sample --check --out pruned.pt
    prunecore prune --model torchvision:resnet18 --sparsity 0.5 --round-to 8 --out pruned.pt
    prunecore sweep --model sample:resnet20 --data sample --levels 0.1,0.3,0.5,0.7 --out curves.csv
    prunecore allocate --model sample:resnet20 --budget flops=0.5 --method dp --out plan.json
    prunecore apply plan.json --model sample:resnet20 --out pruned.pt --check
    prunecore evaluate --model sample:resnet20 --plan plan.json --data sample --update
    prunecore runs
    prunecore criteria
    prunecore methods

Bad input (an unknown model, an unreadable weights file, a sparsity out of range, a model that
cannot be traced) ends with a one-line message and a non-zero exit status, never a traceback.

Building the parser imports neither torch, pandas nor the engine, so `--help` and usage errors are
instant: each command imports what it needs when it runs, and criterion and method names are
checked then (one-line errors that list the choices) rather than by argparse.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NoReturn, Sequence

from prunecore.errors import ArgumentError, UserError
from prunecore.files import check_output_path, write_atomic

if TYPE_CHECKING:  # the commands import these when they run: --help stays free of torch
    import pandas as pd
    import torch

    from prunecore.allocate import AllocationProblem
    from prunecore.cost import Cost
    from prunecore.datasets import EvalData
    from prunecore.graph import ChannelGraph
    from prunecore.plan import Plan
    from prunecore.refine import Refined
    from prunecore.store import RunInfo, RunStore


def command() -> int:
    """The `prunecore` console script: `main` in a process of prunecore's own, which keeps freed memory."""
    from prunecore._memory import keep_freed_memory

    keep_freed_memory()
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every `UserError` ends as one line on stderr and exit status 2."""
    args = _parser().parse_args(argv)
    try:
        for attr in ("out", "export", "checkpoint", "onnx", "int8"):  # a folder, a path under a file: refused now
            if isinstance(getattr(args, attr, None), Path):
                check_output_path(getattr(args, attr), f"--{attr}")
        if getattr(args, "model", None):  # one spelling in stores, plans and files: args sorted, no spaces
            from prunecore.models import canonical_spec

            args.model = canonical_spec(args.model)
        return args.run(args)
    except UserError as exc:
        print(f"prunecore: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunecore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `prunecore runs | head`: the reader left early, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error of every other failure (usage stays behind --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"prunecore: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prunecore", description="Structured pruning for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser("inspect", help="trace a model and list its channel groups")
    _model_args(inspect)
    inspect.set_defaults(run=_inspect)

    prune = sub.add_parser("prune", help="prune every prunable group to one sparsity")
    _model_args(prune)
    prune.add_argument("--sparsity", type=float, required=True, help="fraction of units to remove, in [0, 1)")
    prune.add_argument("--criterion", default="l1", help="importance criterion (see `prunecore criteria`)")
    prune.add_argument("--round-to", type=_positive, default=1, help="round kept channel counts to a multiple")
    prune.add_argument("--check", action="store_true", help="verify the pruned model against its masked twin")
    prune.add_argument("--data", help="'sample': also report held-out accuracy, with BatchNorm re-estimated")
    prune.add_argument("--out", type=Path, help="write the pruned model here (load_pruned reads it), the plan beside")
    prune.set_defaults(run=_prune)

    sweep = sub.add_parser("sweep", help="sensitivity curves: prune each group alone at rising sparsity")
    _model_args(sweep)
    sweep.add_argument("--data", required=True,
                       help="'sample', imagefolder:PATH (class subfolders: labelled), 'random' (label-free noise) "
                            "or text:PATH (.txt or .jsonl, for a language model)")  # fmt: skip
    sweep.add_argument("--limit", type=_positive, help="use at most N images")
    sweep.add_argument("--levels", type=_levels, help="sparsities, e.g. 0.1,0.3,0.5 (default: 0.1 to 0.9 by 0.1)")
    sweep.add_argument("--metric", type=_names, default=None, help="metrics, e.g. accuracy,loss or kl,agreement")
    sweep.add_argument("--criterion", default="l1", help="importance criterion (see `prunecore criteria`)")
    sweep.add_argument("--bn-recalibration", type=_non_negative, default=0, metavar="N",
                       help="re-estimate BatchNorm statistics on N calibration batches per point")  # fmt: skip
    sweep.add_argument("--groups", type=_some_names, help="only these groups (comma-separated names)")
    sweep.add_argument("--mode", choices=["exact", "estimate"], default="exact",
                       help="exact: measure every point; estimate: predict the loss curve from gradients")  # fmt: skip
    sweep.add_argument("--store", type=Path, help="run store database (default: $PRUNECORE_STORE or the user cache)")
    sweep.add_argument("--out", type=Path, help="also write the curves to a .csv or .parquet file")
    sweep.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    sweep.add_argument("--autocast", choices=["bf16", "fp16"],
                       help="evaluate in mixed precision (faster on GPUs; recorded in the run, a separate run id)")
    sweep.add_argument("--channels-last", action="store_true",
                       help="evaluate on channels-last images and weights: faster for some CNNs (MobileNets) on "
                            "CPUs and GPUs, slower for others; recorded in the run, a separate run id")  # fmt: skip
    sweep.add_argument("--workers", type=_positive, default=1, metavar="N",
                       help="measure groups in N local processes (with --ray: N Ray actors); same points")
    sweep.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="measure groups on a Ray cluster: its ADDRESS (e.g. ray://head:10001; auto: the one "
                            "'ray start' runs on this machine), or none for a local one started for the sweep "
                            "(pip install 'prunecore[ray]')")  # fmt: skip
    sweep.add_argument("--threads", type=_positive, metavar="N",
                       help="torch threads per worker (default: this machine's threads divided among the workers)")
    sweep.add_argument("--calibrate", type=_non_negative, default=0, metavar="N",
                       help="then measure N random plans and each method's plans at a few budgets (about N + 20 "
                            "in all) and fit a predictor that knows damage compounds; stored with the run, allocate "
                            "predicts and allocates with it (0: off)")  # fmt: skip
    sweep.set_defaults(run=_sweep)

    runs = sub.add_parser("runs", help="list (id, age, model, data, mode, levels, groups), export or delete sweeps")
    runs.add_argument("--store", type=Path)
    runs.add_argument("--export", metavar="RUN_ID", help="write this run's curves to --out")
    runs.add_argument("--delete", metavar="RUN_ID", help="delete this run")
    runs.add_argument("--out", type=Path)
    runs.set_defaults(run=_runs)

    criteria = sub.add_parser("criteria", help="list the importance criteria")
    criteria.set_defaults(run=_criteria)

    _allocate_parser(sub)
    methods = sub.add_parser("methods", help="list the allocation methods")
    methods.set_defaults(run=_methods)

    apply = sub.add_parser("apply", help="apply a plan file to a model and save the smaller model")
    apply.add_argument("plan", type=Path, help="a plan JSON file (from allocate or prune --out)")
    _model_args(apply, with_input=False)
    apply.add_argument("--out", type=Path, required=True, help="write the pruned model here (load_pruned reads it)")
    apply.add_argument("--force", action="store_true", help="apply a plan made for a model of another fingerprint")
    apply.add_argument("--export", type=Path, metavar="PROGRAM.pt2",
                       help="also save a torch.export program (batch size dynamic where the model allows)")  # fmt: skip
    apply.add_argument("--save-pretrained", type=Path, metavar="FOLDER",
                       help="an hf: model: also save_pretrained the pruned model there, so that transformers' "
                            "from_pretrained loads it (refused, with the reason, where its config cannot)")  # fmt: skip
    apply.add_argument("--onnx", type=Path, metavar="MODEL.onnx",
                       help="also export ONNX (dynamic batch), checked against PyTorch in ONNX Runtime")  # fmt: skip
    apply.add_argument("--int8", type=Path, metavar="MODEL.int8.onnx",
                       help="with --onnx: also an INT8 version (static, calibrated on --data; else dynamic)")
    apply.add_argument("--data", help="calibration images for --bn-recalibration; with --onnx, also measure dense, "
                       "pruned and INT8 accuracy and latency on its evaluation images")  # fmt: skip
    apply.add_argument("--bn-recalibration", type=_non_negative, default=0, metavar="N",
                       help="re-estimate the pruned model's BatchNorm on N batches of --data before saving (0: off)")
    apply.add_argument("--limit", type=_positive, help="use at most N images of --data")
    apply.add_argument("--check", action="store_true", help="verify the pruned model against its masked twin")
    apply.set_defaults(run=_apply)

    ev = sub.add_parser("evaluate", help="measure the dense and the pruned model on data")
    _model_args(ev)
    pruned = ev.add_mutually_exclusive_group()
    pruned.add_argument("--plan", type=Path, help="a plan JSON file, applied to the model")
    pruned.add_argument("--pruned", type=Path, help="a pruned-model file (from apply or prune --out)")
    ev.add_argument("--data", required=True, help="'sample', imagefolder:PATH, 'random' or text:PATH")
    ev.add_argument("--metric", type=_names, help="metrics, e.g. accuracy,loss (default: the plan's predicted ones)")
    ev.add_argument("--bn-recalibration", type=_non_negative, default=50, metavar="N",
                    help="re-estimate the pruned model's BatchNorm statistics on N batches (0: off)")  # fmt: skip
    ev.add_argument("--limit", type=_positive, help="use at most N images")
    ev.add_argument("--update", action="store_true", help="write the measured metrics into the --plan file")
    ev.add_argument("--latency", action="store_true", help="also time the dense and the pruned model on the CPU")
    ev.add_argument("--device", help="measure on cpu, cuda, cuda:1 ... (default: CUDA when present)")
    ev.add_argument("--trust-model-code", action="store_true",
                    help="let --pruned name a package.module:function model; prunecore runs it to rebuild the model")
    ev.set_defaults(run=_evaluate)
    _recover_parsers(sub)
    return parser


def _recover_parsers(sub: argparse._SubParsersAction) -> None:
    ft = sub.add_parser("finetune", help="fine-tune a pruned model, distilling from the dense one, with checkpoints")
    ft.add_argument("pruned", type=Path, help="a pruned-model file (from apply, prune --out or prune-iterative)")
    _model_args(ft, with_input=False)
    _training_args(ft)
    ft.add_argument("--checkpoint", type=Path, help="per-epoch checkpoint (default: OUT with .finetune.pt)")
    ft.add_argument("--out", type=Path, required=True, help="write the fine-tuned model here (load_pruned reads it)")
    ft.add_argument("--trust-model-code", action="store_true",
                    help="let the pruned file name a package.module:function model; prunecore runs it")  # fmt: skip
    ft.set_defaults(run=_finetune)

    it = sub.add_parser("prune-iterative", help="reach a budget in steps of sweep, allocate, apply and fine-tune")
    _model_args(it)
    it.add_argument("--budget", required=True, help="flops=F or params=F, a fraction of the dense model")
    it.add_argument("--steps", type=_positive, default=3, help="pruning steps (default 3)")
    it.add_argument("--method", default="dp", help="allocation method of each step (see `prunecore methods`)")
    it.add_argument("--mode", choices=["exact", "estimate"], default="exact", help="how each step sweeps")
    it.add_argument("--levels", type=_levels, help="sweep sparsities (default: 0.1 to 0.9 by 0.1)")
    it.add_argument("--bn-recalibration", type=_non_negative, default=4, metavar="N",
                    help="re-estimate BatchNorm on N calibration batches per sweep point")  # fmt: skip
    _training_args(it)
    it.add_argument("--statable", action="store_true",
                    help="a transformers model: every step allocates only what its config can state (see allocate "
                         "--statable), so the final model saves with save_pretrained")  # fmt: skip
    it.add_argument("--workdir", type=Path, help="each step's model and checkpoints (default: OUT with .steps)")
    it.add_argument("--out", type=Path, required=True, help="write the final model here; its plan beside, as JSON")
    it.set_defaults(run=_prune_iterative)


def _training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="held-out data, measured after every epoch: 'sample', "
                   "imagefolder:PATH or 'random'")  # fmt: skip
    p.add_argument("--train", help="training data (default: --data; 'sample' trains on the 4,000 training digits)")
    p.add_argument("--limit", type=_positive, help="use at most N held-out images")
    p.add_argument("--epochs", type=_positive, default=1, help="epochs of fine-tuning (per step for prune-iterative)")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate of the cosine schedule (SGD)")
    p.add_argument("--distill", type=float, default=0.5,
                   help="weight of distillation from the dense model against cross-entropy, 0..1 (1: labels unused)")
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoints are there")


def _allocate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("allocate", help="per-group sparsities that meet a FLOPs, params or latency budget, from "
                       "sweep curves")  # fmt: skip
    _model_args(p)
    p.add_argument("--budget", required=True, help="flops=0.5 or params=0.3 (fractions of dense), flops=2e7 "
                   "(absolute), or latency=12.5 (milliseconds per forward pass, measured: see --runtime)")  # fmt: skip
    p.add_argument("--runtime", default="torch", help="with a latency budget: the runtime whose latency is measured "
                   "and predicted (torch: PyTorch eager on the CPU; torch-cuda: PyTorch eager on a CUDA GPU; "
                   "onnxruntime: ONNX Runtime's CPU provider)")  # fmt: skip
    p.add_argument("--batch", type=_positive, help="with a latency budget: the batch size timed (default: the "
                   "--input's)")  # fmt: skip
    p.add_argument("--guide", choices=("flops", "latency"), default="flops",
                   help="with a latency budget: flops (the method's plan for the largest FLOPs budget whose predicted "
                        "latency fits) or latency (trade damage against predicted ms directly)")  # fmt: skip
    p.add_argument("--method", default="dp", help="allocation method (see `prunecore methods`)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--run", dest="run_id", metavar="RUN_ID",
                        help="a stored sweep (default: the newest complete one of --model)")  # fmt: skip
    source.add_argument("--curves", type=Path, help="curves exported by sweep --out or runs --export (.csv, .parquet)")
    p.add_argument("--store", type=Path, help="run store database (default: $PRUNECORE_STORE or the user cache)")
    p.add_argument("--metric", help="the curve metric to protect (default: loss, kl, accuracy or agreement)")
    p.add_argument("--min-sparsity", type=float, default=0.0, help="every group prunes at least this fraction")
    p.add_argument("--max-sparsity", type=float, default=0.9, help="no group prunes more than this fraction")
    p.add_argument("--lock", default="", help="pin groups to sparsities, e.g. stem.0=0.25,layer1.0.conv1=0")
    p.add_argument("--exclude", type=_names, default=[], help="keep these groups dense (comma-separated)")
    p.add_argument("--statable", action="store_true",
                   help="a transformers model: allocate only what its config can state (one head count and one MLP "
                        "width for every layer), so that apply --save-pretrained always reloads")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="write the plan JSON here")
    p.add_argument("--data", help="with --evaluate or --refine: measure plans on this data ('sample' or "
                   "imagefolder:PATH)")  # fmt: skip
    p.add_argument("--evaluate", action="store_true", help="measure the plan on --data and record it in the plan")
    p.add_argument("--refine", type=_non_negative, default=0, metavar="N",
                   help="then refine the plan by up to N measured moves on --data (give the data the sweep measured "
                        "on): each moves a slice of the budget from one group to another and is kept when the "
                        "measured loss (without labels: the protected metric) improves; about N plan "
                        "evaluations")  # fmt: skip
    p.add_argument("--bn-recalibration", type=_non_negative, default=50, metavar="N",
                   help="with --evaluate or --refine: BatchNorm re-estimation batches (0: off)")  # fmt: skip
    p.add_argument("--limit", type=_positive, help="with --evaluate or --refine: use at most N images")
    p.add_argument("--device", help="with --evaluate or --refine: measure on cpu, cuda, cuda:1 ... (default: CUDA "
                   "when present)")  # fmt: skip
    p.add_argument("--additive", action="store_true",
                   help="predict by adding up the curves even where the run has a fitted predictor")  # fmt: skip
    p.set_defaults(run=_allocate)


def _model_args(p: argparse.ArgumentParser, with_input: bool = True) -> None:
    p.add_argument("--model", required=True,
                   help="sample:NAME, torchvision:NAME, timm:NAME, hf:FOLDER_OR_CONFIG or package.module:function")
    p.add_argument("--weights", type=Path, help="a state_dict file (loaded with weights_only=True)")
    if with_input:
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
    from prunecore.graph import trace
    from prunecore.models import load_model

    model = load_model(args.model, args.weights)
    example = _example(args)
    return model, example, trace(model, example)


def _example(args: argparse.Namespace) -> torch.Tensor:
    """The example input --input (or the model's known default) describes; sets `args.input`."""
    from prunecore.models import default_input_shape, example_input

    if args.input is None:
        args.input = default_input_shape(args.model)
        if args.input is None:
            raise ArgumentError(f"pass --input: prunecore cannot know what input {args.model} expects")
    return example_input(args.model, tuple(args.input))


def _inspect(args: argparse.Namespace) -> int:
    from prunecore.cost import count

    model, example, graph = _load(args)
    cost = count(model, example)
    print(f"{args.model}  input {'x'.join(map(str, args.input))}  {_num(cost.params)} params  {_num(cost.flops)} MACs")
    print(graph.summary())
    return 0


def _prune(args: argparse.Namespace) -> int:
    from prunecore.datasets import load_data
    from prunecore.importance import get_criterion
    from prunecore.models import save_pruned
    from prunecore.prune import make_plan
    from prunecore.surgery import apply_plan

    criterion = get_criterion(args.criterion)  # an unknown name fails before the model loads
    model, example, graph = _load(args)
    if criterion.needs_data:
        raise ArgumentError(f"criterion {args.criterion!r} needs data; the prune command has none yet")
    plan = make_plan(model, graph, args.sparsity, args.criterion, args.round_to)
    pruned = apply_plan(model, plan, graph=graph)
    print(f"model      {args.model} ({graph.model_type}), input {'x'.join(map(str, args.input))}")
    print(f"groups     {len(graph.groups)} ({len(graph.prunable)} prunable)")
    print(f"plan       {args.criterion}, sparsity {args.sparsity:g}, round_to {args.round_to}")
    _report_costs(model, pruned, (example,))
    if args.data is not None:
        _report_accuracy(model, pruned, load_data(args.data, input_shape=tuple(example.shape), model=args.model))
    status = _check(model, pruned, plan, graph) if args.check else 0
    if args.out is not None:
        plan_path = args.out.with_suffix(".plan.json")
        save_pruned(args.out, pruned, plan, args.model)
        write_atomic(plan_path, plan.to_json())
        print(f"saved      {args.out} (pruned model) and {plan_path} (plan)")
        print("rebuild    pruned, plan = prunecore.models.load_pruned(PATH)")
    return status


def _report_costs(model: torch.nn.Module, pruned: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> Cost:
    """Print params, MACs and CPU latency of the dense and the pruned model; return the pruned cost.

    The latency line is `cost.compare_latency` and `cost.format_speedup`, as on the dashboard's
    Validate page: interleaved rounds, and no ratio where the timings are too noisy to carry one.
    """
    from prunecore import cost

    before, after = cost.count(model, example), cost.count(pruned, example)
    t_before, t_after = cost.compare_latency(model, pruned, example)
    print(_cost_lines(before.params, after.params, before.flops, after.flops))
    print(f"{'latency':10} {_duration(t_before.median_s):>10} {_duration(t_after.median_s):>10}   "
          f"{cost.format_speedup(t_before, t_after)}")  # fmt: skip
    return after


def _check(model: torch.nn.Module, pruned: torch.nn.Module, plan: Plan, graph: ChannelGraph) -> int:
    """Compare the pruned model with its masked twin on the plan's inputs: 0 if they agree, else 1."""
    import torch

    from prunecore.surgery import apply_plan

    masked = apply_plan(model, plan, mode="mask", graph=graph)
    example = tuple(spec.example() for spec in graph.inputs)
    with torch.no_grad():
        a, b = pruned(*example), masked(*example)
    diff = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
    ok = diff < 1e-4
    print(f"check      max |pruned - masked| / max |masked| = {diff:.1e}  {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _report_accuracy(model: torch.nn.Module, pruned: torch.nn.Module, data: EvalData) -> None:
    """Dense vs pruned accuracy; the pruned model is also measured after BatchNorm re-estimation."""
    from prunecore.evaluate import evaluate, recalibrate_bn_

    dense = evaluate(model, data.evaluation, ["accuracy", "loss"])
    raw = evaluate(pruned, data.evaluation, ["accuracy", "loss"])
    recalibrated = evaluate(recalibrate_bn_(copy.deepcopy(pruned), data.calibration), data.evaluation, ["accuracy"])
    print(f"{'accuracy':10} {dense['accuracy']:>10.2%} {raw['accuracy']:>10.2%}   "
          f"{recalibrated['accuracy']:.2%} after BatchNorm re-estimation (no fine-tuning)")  # fmt: skip


def _sweep(args: argparse.Namespace) -> int:
    from prunecore.datasets import load_data
    from prunecore.importance import get_criterion
    from prunecore.measure import default_metrics
    from prunecore.sensitivity import DEFAULT_LEVELS, SweepConfig, sweep
    from prunecore.store import RunStore

    get_criterion(args.criterion)  # an unknown name fails before the model loads
    model, example, graph = _load(args)
    data = load_data(args.data, input_shape=tuple(example.shape), limit=args.limit, model=args.model)
    metrics = args.metric or default_metrics(None, data)
    if args.mode == "estimate":
        metrics = ["loss"]
    store = RunStore(args.store)
    print(f"sweeping {args.model} on {data.description}: {len(graph.prunable)} groups x "
          f"{len(args.levels or DEFAULT_LEVELS)} levels")  # fmt: skip
    config = SweepConfig(levels=tuple(args.levels or DEFAULT_LEVELS), criterion=args.criterion, metric=tuple(metrics),
                         groups=None if args.groups is None else tuple(args.groups),
                         bn_recalibration=args.bn_recalibration, mode=args.mode, autocast=args.autocast,
                         channels_last=args.channels_last)  # fmt: skip
    curves = sweep(
        model, data.evaluation, example, config, calibration=data.calibration, store=store, graph=graph,
        model_name=args.model, device=args.device, workers=args.workers, threads=args.threads,
        executor="local" if args.ray is None else "ray", address=args.ray or None,
    )  # fmt: skip
    if curves.attrs.get("workers"):
        print("workers: " + ", ".join(f"#{w['worker']} {w['groups']} groups, peak {w['peak_rss_mib']:.0f} MiB"
                                      + (f", {w['restarts']} restarted" if w["restarts"] else "")
                                      for w in curves.attrs["workers"]))  # fmt: skip
    print(f"run {curves.attrs['run_id']} in {store.path}: {len(curves)} rows")
    print(_curve_table(curves, metrics[0]))
    if args.out is not None:
        store.export(curves.attrs["run_id"], args.out)
        print(f"wrote {args.out}")
    if args.calibrate:
        _calibrate(args, model, graph, curves, data, store)
    return 0


def _calibrate(args: argparse.Namespace, model: torch.nn.Module, graph: ChannelGraph, curves: pd.DataFrame,
               data: EvalData, store: RunStore) -> None:  # fmt: skip
    """Measure calibration plans on the sweep's data, as the sweep measured its points, fit, store the predictor."""
    from tqdm.auto import tqdm

    from prunecore.allocate import allocation_problem
    from prunecore.predict import calibrate

    if args.mode == "estimate":
        raise ArgumentError("--calibrate measures plans: use it with --mode exact (the curves must be measured)")
    problem = allocation_problem(curves, graph, model, model_name=args.model)
    began = time.perf_counter()
    with tqdm(desc="calibrating", unit="plan", leave=False) as bar:
        def step(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        predictor = calibrate(model, problem, data.evaluation, args.bn_recalibration, graph, n=args.calibrate,
                              progress=step, bn_data=data.calibration, device=args.device, autocast=args.autocast,
                              channels_last=args.channels_last)  # fmt: skip
    store.put_predictor(curves.attrs["run_id"], predictor.to_dict())
    print(f"calibrated on {predictor.plans} plans measured in {time.perf_counter() - began:.0f} s; the predictor is "
          f"stored with run {curves.attrs['run_id']}, and allocate predicts and allocates with it")  # fmt: skip


def _device(args: argparse.Namespace) -> Any:
    """`--device`, or CUDA when present, else the CPU (the models are loaded on the CPU and never moved)."""
    from prunecore.devices import resolve_device

    return resolve_device(args.device)


def _curve_table(curves, metric: str) -> str:
    """Groups as rows, sparsity levels as columns: the metric at each point."""
    from prunecore.sensitivity import DENSE

    points = curves[curves.group != DENSE]
    table = points.pivot(index="group", columns="sparsity", values=metric).reindex(points.group.unique())
    dense = curves[curves.group == DENSE][metric]
    head = f"{metric} (dense {dense.iloc[0]:.4g})" if len(dense) else metric
    return head + "\n" + table.to_string(float_format=lambda v: f"{v:.3f}")


def _runs(args: argparse.Namespace) -> int:
    from prunecore.store import RunStore

    store = RunStore(args.store)
    if args.delete:
        store.delete(args.delete)
        print(f"deleted run {args.delete}")
        return 0
    if args.export:
        if args.out is None:
            raise ArgumentError("--export needs --out FILE.csv or FILE.parquet")
        print(f"wrote {store.export(args.export, args.out)}")
        return 0
    runs = store.runs()
    if not runs:
        print(f"no stored sweeps in {store.path}")
        return 0
    print(_runs_table(runs, datetime.now(timezone.utc)))
    print(f"{len(runs)} run(s) in {store.path}; data fp: fingerprint of the swept data (same data, same fp); "
          "levels: first..last/step. Use an id with `prunecore allocate --run RUN_ID`")  # fmt: skip
    return 0


def _runs_table(runs: Sequence[RunInfo], now: datetime) -> str:
    """One row per stored sweep, newest first: id, age, model, data, mode, criterion, levels, groups, metrics, state."""
    heads = ("run id", "age", "model", "data fp", "mode", "criterion", "levels", "groups", "metrics", "state")
    rows = [heads]
    for r in runs:
        c = r.config
        state = "complete" if r.complete else f"{r.points}/{r.expected} points"
        rows.append((r.run_id, _age(r.created, now), r.model_name, r.data_fp[:8], str(c.get("mode", "exact")),
                     str(c.get("criterion", "?")), _level_range(c.get("levels", [])), str(len(c.get("groups", []))),
                     ",".join(c.get("metrics") or []) or "-", state))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(heads))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _level_range(levels: Sequence[float]) -> str:
    """`0.1..0.9/0.2` for more than three evenly spaced levels (first..last/step), else the list: `0.3,0.6`."""
    step = levels[1] - levels[0] if len(levels) > 3 else 0
    if step > 0 and all(abs((b - a) - step) < 1e-9 for a, b in zip(levels, levels[1:])):
        return f"{levels[0]:g}..{levels[-1]:g}/{round(step, 6):g}"
    return ",".join(f"{v:g}" for v in levels) or "-"


def _age(created: str, now: datetime) -> str:
    """`'3 min ago'` for an ISO timestamp (UTC where it names no zone); the text itself if unreadable."""
    try:
        then = datetime.fromisoformat(created)
    except ValueError:
        return created[:19] or "?"
    seconds = (now - (then if then.tzinfo else then.replace(tzinfo=timezone.utc))).total_seconds()
    if seconds < 60:
        return "just now" if seconds >= -60 else created[:19]  # a clock a little behind is still "now"
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if unit == 'day' and n != 1 else ''} ago"
    raise AssertionError("unreachable")


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _levels(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _some_names(text: str) -> list[str]:
    names = _names(text)
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _criteria(args: argparse.Namespace) -> int:
    from prunecore.importance import get_criterion, list_criteria

    for name in list_criteria():
        crit = get_criterion(name)
        print(f"{name:10} {'(needs data) ' if crit.needs_data else ''}{crit.doc}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from prunecore.allocate import get_method, list_methods

    for name in list_methods():
        method = get_method(name)
        print(f"{name:10} {'' if method.needs_curves else '(no curves needed) '}{method.doc}")
    return 0


# -- allocate, apply, evaluate ---------------------------------------------------------------------
def _allocate(args: argparse.Namespace) -> int:
    from prunecore.allocate import allocation_problem, get_method, solve, with_latency
    from prunecore.datasets import load_data
    from prunecore.latency import get_runtime, latency_model
    from prunecore.measure import measure_plan
    from prunecore.plan import Budget

    get_method(args.method)  # an unknown name fails before the model loads
    budget, locked = Budget.parse(args.budget), _locks(args.lock)
    timed = budget.kind == "latency"
    if timed:
        get_runtime(args.runtime).check()
    elif args.batch is not None or args.runtime != "torch" or args.guide != "flops":
        raise ArgumentError("--runtime, --batch and --guide go with a latency budget: --budget latency=MS")
    if args.refine and args.data is None:
        raise ArgumentError("--refine measures plans: give it --data SPEC, the data the sweep measured on")
    if args.evaluate != (args.data is not None) and not args.refine:
        raise ArgumentError("--evaluate and --data go together: --evaluate --data SPEC measures the plan")
    model, example, graph = _load(args)
    curves, source = _curves(args, model, graph)
    problem = allocation_problem(curves, graph, model, metric=args.metric, model_name=args.model)
    problem, how = _with_stored_predictor(args, problem, curves)
    exclude = list(args.exclude)
    if args.statable:
        from prunecore.hf import statable

        limits = statable(model, graph)
        problem, kept_dense = limits.constrain(problem)
        exclude += [g for g in kept_dense if g not in exclude]
    if timed:
        lm = latency_model(model, example, graph, runtime=args.runtime, batch=args.batch, store=args.store,
                           round_to=problem.round_to)  # fmt: skip
        problem = with_latency(problem, lm)
    plan = solve(problem, budget, args.method, args.min_sparsity, args.max_sparsity, locked, exclude, args.guide)
    data = None
    if args.data is not None:
        data = load_data(args.data, input_shape=tuple(example.shape), limit=args.limit, model=args.model)
    refined = None
    if args.refine:
        assert data is not None  # checked with the arguments
        refined = _refine(args, model, graph, problem, plan, data, [*exclude, *locked])
        plan = refined.plan
    print(f"model      {args.model} ({graph.model_type}), input {'x'.join(map(str, args.input))}")
    print(f"curves     {source}")
    print(f"predicted  {how}")
    if args.statable:
        sets = ", ".join(f"{len(t)} groups of {'/'.join(str(n) for n in sorted({graph[g].size for g in t}))} units"
                         for t in limits.ties)  # fmt: skip
        print(f"statable   {len(limits.ties)} set(s) of groups kept at one fraction ({sets or 'none'}); "
              f"{len(limits.keep)} group(s) kept dense")  # fmt: skip
        for reason in sorted(set(limits.keep.values())):
            print(f"           {reason}")
    if timed:
        print(f"latency    batch {lm.batch} on {lm.machine}: tables of {len(lm.layers)} layers calibrated on "
              f"{len(lm.calibration)} whole-model timings (median error {lm.error:.1%})")  # fmt: skip
        print(f"           dense {lm.dense_ms:.3g} ms, the plan {lm.predict(plan):.3g} ms (predicted)")
        if plan.round_to != problem.round_to:
            print(f"           widths kept to multiples of {plan.round_to}: {lm.runtime} runs other widths on a "
                  "slower path")  # fmt: skip
    print(f"plan       {args.method}, budget {budget}, protecting {problem.metric or 'nothing (no curves)'}")
    print(_group_table(plan, problem.metric))
    assert plan.totals is not None  # solve always prices its plan
    t = plan.totals
    print(_cost_lines(t.params_before, t.params_after, t.flops_before, t.flops_after))
    columns: dict[str, Mapping[str, float]] = {"dense": problem.dense, "predicted": plan.predicted}
    if refined is not None:
        print(f"refined    {len(refined.trials)} measured moves on {data.description}, {refined.moves} kept: "
              f"{_changes(refined.start, refined.metrics)}; chosen on this data, so measure the plan on other data "
              "to see what it is worth there")  # fmt: skip
    if args.evaluate:
        assert data is not None  # checked with the arguments
        print(f"measured   on {data.description}, {_bn_note(args.bn_recalibration, model)}")
        measurement = measure_plan(model, plan, data, bn_recalibration=args.bn_recalibration, graph=graph,
                                   latency=False, device=_device(args))  # fmt: skip
        plan = measurement.record(plan)
        columns["measured"] = measurement.metrics
    if any(columns.values()):
        print(_metric_table(columns))
    for metric, (low, high) in plan.band.items():
        print(f"band       {metric} {_metric(metric, low)} to {_metric(metric, high)} "
              "(about 90 % of plans measure inside)")  # fmt: skip
    write_atomic(args.out, plan.to_json())
    print(f"wrote      {args.out}")
    return 0


def _refine(args: argparse.Namespace, model: torch.nn.Module, graph: ChannelGraph, problem: AllocationProblem,
            plan: Plan, data: EvalData, frozen: list[str]) -> Refined:  # fmt: skip
    """`refine` on the sweep's data, measured as the sweep measured its points, with a progress bar."""
    from tqdm.auto import tqdm

    from prunecore.refine import refine

    with tqdm(desc="refining", unit="plan", leave=False) as bar:
        def step(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return refine(model, problem, plan, data.evaluation, steps=args.refine, frozen=frozen,
                      max_sparsity=args.max_sparsity, bn_recalibration=args.bn_recalibration,
                      bn_data=data.calibration, graph=graph, device=_device(args), progress=step)  # fmt: skip


def _changes(before: Mapping[str, float], after: Mapping[str, float]) -> str:
    """'loss 0.3910 -> 0.2830, accuracy 93.40% -> 96.20%': each metric measured before and after."""
    return ", ".join(f"{m} {_metric(m, before[m])} -> {_metric(m, after[m])}" for m in after if m in before)


def _with_stored_predictor(args: argparse.Namespace, problem: AllocationProblem,
                           curves: pd.DataFrame) -> tuple[AllocationProblem, str]:  # fmt: skip
    """The problem with its run's stored predictor (`sweep --calibrate`), unless --additive; and how it predicts."""
    from prunecore.allocate import with_predictor
    from prunecore.predict import Predictor
    from prunecore.store import RunStore

    additive = "by adding up each group's own curve (optimistic where plans cut deep)"
    run_id = curves.attrs.get("run_id")
    if args.additive or args.curves is not None or not run_id:
        return problem, additive
    stored = RunStore(args.store).get_predictor(run_id)
    if stored is None:
        return problem, additive + "; `sweep --calibrate N` fits a better predictor"
    predictor = Predictor.from_dict(stored)
    return with_predictor(problem, predictor), f"by the predictor fitted on {predictor.plans} measured plans"


def _curves(args: argparse.Namespace, model: torch.nn.Module, graph: ChannelGraph) -> tuple[pd.DataFrame, str]:
    """The sweep curves --curves or --run names (default: the newest complete sweep of every group of --model)."""
    from prunecore.allocate import AllocationError
    from prunecore.store import RunStore, StoreError, fingerprint_model

    if args.curves is not None:
        return _read_curves(args.curves), f"file {args.curves}"
    store = RunStore(args.store)
    if args.run_id is None:
        runs = [r for r in store.runs() if r.complete and r.model_name == args.model]
        prunable = {g.name for g in graph.prunable}
        full = [r for r in runs if prunable <= set(r.config.get("groups", []))]
        if not full:
            newest = (f"; the newest complete one ({runs[0].run_id}) swept {len(runs[0].config.get('groups', []))} "
                      f"of its {len(prunable)} prunable groups, pass --run {runs[0].run_id} to use it anyway"
                      if runs else "")  # fmt: skip
            raise StoreError(f"no complete sweep of every prunable group of {args.model} in run store {store.path}"
                             f"{newest}; or run `prunecore sweep --model {args.model} --data ...`, or pass "
                             "--curves")  # fmt: skip
        info = full[0]
    else:
        info = store.get(args.run_id)
        if info.model_name != args.model:
            raise AllocationError(f"run {info.run_id} is a sweep of {info.model_name}, not of {args.model}")
    if not info.complete:
        _warn(f"run {info.run_id} is incomplete ({info.points}/{info.expected} points): unswept groups stay dense")
    unswept = [g.name for g in graph.prunable if g.name not in set(info.config.get("groups", []))]
    if unswept:
        _warn(f"run {info.run_id} did not sweep {len(unswept)} prunable group(s) ({', '.join(unswept[:5])}"
              f"{', ...' if len(unswept) > 5 else ''}): they stay dense")  # fmt: skip
    if info.model_fp != fingerprint_model(model):
        _warn(f"run {info.run_id} measured other weights than these; its predictions may not hold for this model")
    groups, levels = len(info.config.get("groups", [])), len(info.config.get("levels", []))
    detail = f"{groups} groups x {levels} levels, {info.config.get('criterion')}"
    return store.points(info.run_id), f"run {info.run_id} in {store.path} ({detail})"


def _read_curves(path: Path) -> pd.DataFrame:
    import pandas as pd

    readers = {".csv": pd.read_csv, ".parquet": pd.read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ArgumentError(f"curves file {path.name!r} must be .csv or .parquet")
    if not path.is_file():
        raise ArgumentError(f"curves file {str(path)!r} does not exist")
    try:
        return reader(path)
    except Exception as exc:  # pandas and pyarrow raise many kinds for a bad file
        raise ArgumentError(f"cannot read curves file {str(path)!r}: {_first_line(exc)}") from None


def _locks(text: str) -> dict[str, float]:
    """`"stem.0=0.25,fc=0"` -> {"stem.0": 0.25, "fc": 0.0}; the range is checked by `solve`."""
    locked = {}
    for item in _names(text):
        name, sep, value = item.partition("=")
        try:
            sparsity = float(value)
        except ValueError:
            sparsity = None
        if not sep or not name.strip() or sparsity is None:
            raise ArgumentError(f"--lock must look like group=sparsity[,group=sparsity...], got {item!r}")
        locked[name.strip()] = sparsity
    return locked


def _apply(args: argparse.Namespace) -> int:
    from prunecore.graph import trace
    from prunecore.models import load_model, save_pruned
    from prunecore.plan import PlanError
    from prunecore.surgery import apply_plan

    if args.onnx is None and args.int8 is not None:
        raise ArgumentError("--int8 goes with --onnx: apply PLAN --out P.pt --onnx P.onnx --int8 P.int8.onnx")
    if args.bn_recalibration and args.data is None:
        raise ArgumentError("--bn-recalibration needs --data (its calibration images)")
    plan = _read_plan(args.plan)
    model = load_model(args.model, args.weights)
    example = tuple(spec.example() for spec in plan.inputs)
    graph = trace(model, example)
    try:
        plan.check(graph, force=args.force)
    except PlanError as exc:
        raise PlanError(str(exc).replace("force=True", "--force")) from None
    if plan.fingerprint and plan.fingerprint != graph.fingerprint:  # forced: record what it is applied to
        meta = {**plan.meta, "forced_from_fingerprint": plan.fingerprint}
        plan = dataclasses.replace(plan, fingerprint=graph.fingerprint, meta=meta)
    pruned = raw = apply_plan(model, plan, graph=graph)  # `raw`: what --check compares with the masked twin
    if args.bn_recalibration:
        from prunecore.datasets import load_data
        from prunecore.evaluate import recalibrate_bn_

        data = load_data(args.data, input_shape=tuple(example[0].shape), limit=args.limit, model=args.model)
        pruned = recalibrate_bn_(copy.deepcopy(raw), data.calibration, batches=args.bn_recalibration)
    shapes = ", ".join("x".join(map(str, spec.shape)) for spec in plan.inputs)
    pruned_groups = sum(len(g.keep) < g.size for g in plan.groups.values())
    print(f"model      {args.model} ({graph.model_type}), input {shapes}")
    print(f"plan       {args.plan}: {pruned_groups} of {len(plan.groups)} groups pruned"
          + (f"; {_bn_note(args.bn_recalibration, model)}" if args.bn_recalibration else ""))
    after = _report_costs(model, pruned, example)
    _check_totals(plan, after, args.force)
    status = _check(model, raw, plan, graph) if args.check else 0
    save_pruned(args.out, pruned, plan, args.model)
    print(f"saved      {args.out} (pruned model; prunecore.models.load_pruned reads it)")
    if args.save_pretrained is not None:
        from prunecore.hf import save_pretrained

        save_pretrained(pruned, args.save_pretrained)
        print(f"saved      {args.save_pretrained} (transformers: from_pretrained reads it)")
    if args.export is not None:
        _export(pruned, example, args.export)
    if args.onnx is not None:
        _deploy(args, model, pruned, example)
    return status


def _check_totals(plan: Plan, after: Cost, forced: bool) -> None:
    """The applied model must cost what the plan says it does; with --force a mismatch only warns."""
    from prunecore.plan import PlanError

    t = plan.totals
    if t is None or (after.params, after.flops) == (t.params_after, t.flops_after):
        return
    message = (f"the pruned model has {after.params} params and {after.flops} MACs, "
               f"the plan's totals say {t.params_after} and {t.flops_after}")  # fmt: skip
    if not forced:
        raise PlanError(f"{message}; was the plan made for another model or input shape?")
    _warn(message)


def _export(pruned: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
    """Save a torch.export program whose batch size (dim 0 of every input) is dynamic.

    A model that fixes its batch size (a `view(1, ...)`) is exported for the example's shapes, with a
    warning; a model export cannot capture at all is a warning too, not a failure.
    """
    import torch

    pruned = pruned.eval()
    from prunecore.deploy import dynamic_batch

    inputs, dynamic_shapes = dynamic_batch(example)
    shapes = ", ".join("x".join(["B", *map(str, x.shape[1:])]) for x in example)
    try:
        program = torch.export.export(pruned, inputs, dynamic_shapes=dynamic_shapes)
        batch = "any batch size B"
    except Exception as dynamic_error:  # export fails in many ways on dynamic models
        try:
            program = torch.export.export(pruned, example)
        except Exception as exc:
            _warn(f"torch.export could not export the pruned model, so {path} was not written: {_first_line(exc)}")
            return
        _warn(f"{path} is fixed to the example's batch size: a dynamic batch did not export: "
              f"{_first_line(dynamic_error)}")  # fmt: skip
        shapes = ", ".join("x".join(map(str, x.shape)) for x in example)
        batch = "this batch size only"
    try:
        write_atomic(path, lambda f: torch.export.save(program, f))
    except Exception as exc:  # a program torch cannot serialise
        _warn(f"torch.export could not save the program, so {path} was not written: {_first_line(exc)}")
        return
    print(f"exported   {path} (torch.export program for input {shapes}, {batch}; torch.export.load reads it)")


def _deploy(args: argparse.Namespace, model: torch.nn.Module, pruned: torch.nn.Module,
            example: tuple[torch.Tensor, ...]) -> None:  # fmt: skip
    """apply --onnx [--int8] [--data]: export and check, quantise, and measure dense / pruned / INT8 side by side."""
    from prunecore.cost import format_latency, measure_latencies
    from prunecore.datasets import load_data
    from prunecore.deploy import OnnxModule, deploy_onnx
    from prunecore.evaluate import evaluate

    shape = tuple(example[0].shape)
    data = None if args.data is None else load_data(args.data, input_shape=shape, limit=args.limit, model=args.model)
    deployed = deploy_onnx(pruned, example, args.onnx, args.int8, data)  # static INT8 on images, dynamic on tokens
    onnx = deployed.onnx
    batch = "any batch size B" if onnx.dynamic_batch else "this batch size only"
    sizes = " and ".join(map(str, onnx.batch_sizes))
    print(f"onnx       {onnx.path} (opset {onnx.opset}, {batch}; checked in ONNX Runtime at batch {sizes}: "
          f"max |onnx - torch| = {onnx.max_abs_diff:.1e})")  # fmt: skip
    models = {"dense": model, "pruned": pruned, "pruned, ONNX Runtime": OnnxModule(onnx.path)}
    if deployed.int8 is not None:
        print(f"int8       {deployed.int8} ({deployed.mode}; ONNX Runtime)")
        models["pruned + INT8, ONNX Runtime"] = OnnxModule(deployed.int8)
    if data is None:
        return
    metrics = ["accuracy", "loss"] if data.labelled else []
    timed = measure_latencies(list(models.values()), example)
    print(f"measured   on {data.description}; latency at batch {timed[0].batch}, {timed[0].threads} thread(s)")
    print(f"{'':28} {'accuracy':>9} {'loss':>8} {'latency':>16}")
    for (name, m), t in zip(models.items(), timed):
        values = evaluate(m, data.evaluation, metrics) if metrics else {}
        acc = f"{values['accuracy']:.2%}" if values else "-"
        loss = f"{values['loss']:.4f}" if values else "-"
        print(f"{name:28} {acc:>9} {loss:>8} {format_latency(t):>16}")


def _evaluate(args: argparse.Namespace) -> int:
    from prunecore.datasets import load_data
    from prunecore.evaluate import evaluate, get_metric
    from prunecore.graph import trace
    from prunecore.measure import default_metrics, measure_plan
    from prunecore.models import load_model, load_pruned

    if args.update and args.plan is None:
        raise ArgumentError("--update writes the measured metrics into a plan file: pass --plan PLAN.json")
    model = load_model(args.model, args.weights)
    pruned, plan = (None, None)
    if args.pruned is not None:  # a factory the file names runs only if --model names it too, or when trusted
        pruned, plan = load_pruned(args.pruned, trust_code=args.trust_model_code, model=args.model)
    plan = _read_plan(args.plan) if args.plan is not None else plan
    example = tuple(spec.example() for spec in plan.inputs) if plan is not None else (_example(args),)
    data = load_data(args.data, input_shape=tuple(example[0].shape), limit=args.limit, model=args.model)
    metrics = args.metric or default_metrics(plan, data)
    what = " (dense only)" if plan is None else f", pruned by {args.plan or args.pruned}"
    print(f"model      {args.model}{what}")
    print(f"data       {data.description}")
    if plan is None:
        reference = model if any(get_metric(m).needs_reference for m in metrics) else None
        dense = evaluate(model, data.evaluation, metrics, reference=reference, device=_device(args))
        print(_metric_table({"dense": dense}))
        return 0
    print(f"pruned     {_bn_note(args.bn_recalibration, model)}")
    # the dense model must be the one the plan (or the pruned file) was made from: measure_plan checks
    measurement = measure_plan(model, plan, data, metrics, args.bn_recalibration, trace(model, example),
                               latency=args.latency, pruned=pruned, device=_device(args))  # fmt: skip
    print(_metric_table({"dense": measurement.dense, "predicted": plan.predicted, "measured": measurement.metrics}))
    if args.latency:
        print(f"latency    {measurement.speedup_text()}")
    if args.update:
        write_atomic(args.plan, measurement.record(plan).to_json())
        print(f"updated    {args.plan} (metrics.measured and metrics.measured_on)")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from prunecore.datasets import load_data, load_train
    from prunecore.graph import trace
    from prunecore.models import load_model, load_pruned, save_pruned
    from prunecore.plan import MeasuredOn
    from prunecore.recover import finetune

    pruned, plan = load_pruned(args.pruned, trust_code=args.trust_model_code, model=args.model)
    dense = load_model(args.model, args.weights)
    example = tuple(spec.example() for spec in plan.inputs)
    plan.check(trace(dense, example))  # the teacher must be the model the plan pruned
    shape = tuple(example[0].shape)
    data = load_data(args.data, input_shape=shape, limit=args.limit, model=args.model)
    train = load_train(args.train or args.data, input_shape=shape, model=args.model)
    checkpoint = args.checkpoint or args.out.with_suffix(".finetune.pt")
    print(f"model      {args.model}, pruned by {args.pruned}")
    print(f"train      {train.description}; held-out {data.description}")
    print(f"recipe     {args.epochs} epoch(s), lr {args.lr:g} cosine, distill {args.distill:g} "
          f"(T={args.temperature:g})")  # fmt: skip
    print(f"checkpoint {checkpoint}{' (resuming)' if args.resume else ''}")
    result = finetune(pruned, train.loader, teacher=dense, epochs=args.epochs, lr=args.lr, distill=args.distill,
                      temperature=args.temperature, eval_data=data.evaluation, device=args.device,
                      checkpoint=checkpoint, resume=args.resume, progress=True,
                      on_epoch=lambda e: print(_epoch_line(e), flush=True))  # fmt: skip
    last = result.history[-1].metrics
    tuned = dataclasses.replace(plan, measured=dict(last), measured_on=MeasuredOn(data.description, 0))
    save_pruned(args.out, result.model.cpu(), tuned, args.model)
    print(f"saved      {args.out} (fine-tuned; load_pruned reads it)")
    return 0


def _prune_iterative(args: argparse.Namespace) -> int:
    from prunecore.allocate import get_method
    from prunecore.datasets import load_data, load_train
    from prunecore.iterate import prune_iteratively, step_budgets
    from prunecore.models import save_pruned
    from prunecore.plan import Budget
    from prunecore.sensitivity import DEFAULT_LEVELS

    get_method(args.method)
    budget = Budget.parse(args.budget)
    step_budgets(budget, args.steps)  # a bad budget fails before the model loads
    model, example, _ = _load(args)
    shape = tuple(example.shape)
    data = load_data(args.data, input_shape=shape, limit=args.limit, model=args.model)
    train = load_train(args.train or args.data, input_shape=shape, model=args.model)
    workdir = args.workdir or args.out.with_suffix(".steps")
    print(f"model      {args.model}, to {budget} in {args.steps} step(s), {args.epochs} epoch(s) each")
    print(f"data       sweeps and held-out: {data.description}; training: {train.description}")
    print(f"workdir    {workdir}{' (resuming)' if args.resume else ''}")
    result = prune_iteratively(
        model, example, budget, data=data.evaluation, train=train.loader, calibration=data.calibration,
        steps=args.steps, epochs=args.epochs, method=args.method, mode=args.mode, levels=args.levels or DEFAULT_LEVELS,
        bn_recalibration=args.bn_recalibration, distill=args.distill, lr=args.lr, device=args.device,
        workdir=workdir, resume=args.resume, progress=lambda line: print(line, flush=True), statable=args.statable,
    )  # fmt: skip
    save_pruned(args.out, result.model.cpu(), result.plan, args.model)
    plan_path = write_atomic(args.out.with_suffix(".plan.json"), result.plan.to_json())
    print(f"saved      {args.out} (final model) and {plan_path} (its plan from the dense model)")
    return 0


def _epoch_line(e: Any) -> str:
    metrics = "  ".join(f"{k} {_metric(k, v)}" for k, v in e.metrics.items())
    return f"epoch {e.epoch:<4} loss {e.loss:.4f}  lr {e.lr:.4g}  {e.seconds:.1f} s  {metrics}"


def _read_plan(path: Path) -> Plan:
    from prunecore.plan import Plan, PlanError

    if not path.is_file():
        raise PlanError(f"plan file {str(path)!r} does not exist")
    try:
        return Plan.from_json(path.read_bytes())
    except PlanError as exc:
        raise PlanError(f"plan file {str(path)!r}: {exc}") from None


# -- report helpers ---------------------------------------------------------------------------------
def _bn_note(batches: int, model: torch.nn.Module | None = None) -> str:
    """What the BatchNorm setting does; a model without BatchNorm has nothing to re-estimate."""
    import torch

    if model is not None and not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return "no BatchNorm layers to re-estimate"
    return f"BatchNorm re-estimated on up to {batches} calibration batches" if batches else "no BatchNorm re-estimation"


def _group_table(plan: Plan, metric: str) -> str:
    """One row per group: units before -> after, sparsity, the curve's predicted change."""
    change = f"{metric} change" if metric else "change"
    lines = [f"{'group':<32} {'units':^14} {'sparsity':>9} {change:>16}"]
    for name, g in plan.groups.items():
        delta = "-" if g.predicted_change is None else f"{g.predicted_change:+.4f}"
        lines.append(f"{name:<32} {g.size:>5} -> {len(g.keep):<5} {g.sparsity:>9.1%} {delta:>16}")
    return "\n".join(lines)


def _cost_lines(params_before: int, params_after: int, flops_before: int, flops_after: int) -> str:
    return (
        f"{'':10} {'dense':>10} {'pruned':>10}   kept\n"
        f"{'params':10} {_num(params_before):>10} {_num(params_after):>10}   {params_after / params_before:6.1%}\n"
        f"{'MACs':10} {_num(flops_before):>10} {_num(flops_after):>10}   {flops_after / flops_before:6.1%}"
    )


def _metric_table(columns: Mapping[str, Mapping[str, float]]) -> str:
    """Metrics as rows, the given columns (dense, predicted, measured) side by side; '-' where absent."""
    names = list(dict.fromkeys(m for values in columns.values() for m in values))
    lines = [f"{'metric':10} " + " ".join(f"{c:>10}" for c in columns)]
    for m in names:
        cells = [_metric(m, values[m]) if m in values else "-" for values in columns.values()]
        lines.append(f"{m:10} " + " ".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def _metric(name: str, value: float) -> str:
    from prunecore.evaluate import get_metric

    return f"{value:.2%}" if get_metric(name).bounds == (0.0, 1.0) else f"{value:.4f}"


def _warn(message: str) -> None:
    print(f"prunecore: warning: {message}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    """The message on one line: multi-line reasons (a trace summary) are joined."""
    return " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip()) or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _duration(seconds: float) -> str:
    return f"{seconds:.3g}s" if seconds >= 1 else f"{seconds * 1e3:.3g}ms"


def _num(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


if __name__ == "__main__":
    raise SystemExit(command())
