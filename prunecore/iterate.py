"""`prune_iteratively`: reach a budget in k steps of sweep → allocate → apply → fine-tune.

Cutting deep in one shot removes units whose loss the rest of the network could have absorbed, had
it been trained in between; gradual pruning lets each step's sensitivity be measured on the model
as it now is. Step i of k targets (budget) ** (i / k) of the original model's FLOPs (or params), an
absolute amount, so the steps cut equal ratios. Each step's plan is made on the current model and
composed (`plan.compose`) into one plan in the original model's numbering: `apply_plan(original,
result.plan)` has the final architecture, and `load_pruned` rebuilds the final model from the saved
file.

Every finished step is written atomically to `workdir/step{i}.pt` (a `save_pruned` file of the
model so far and the composed plan), and fine-tuning checkpoints each epoch, so a run killed at any
point resumes with `resume=True` from the last finished epoch of the step it was in.

    >>> result = prune_iteratively(s.model, s.example, Budget(flops=0.3), data=s.heldout, train=s.train,
    ...                            calibration=s.calibration, steps=3, epochs=1, workdir="runs/iter")
    >>> [st.flops_kept for st in result.steps], result.steps[-1].metrics
    ([0.67, 0.45, 0.30], {'accuracy': 0.981, 'loss': 0.07})
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from prunecore import hf
from prunecore.allocate import allocation_problem, solve
from prunecore.cost import count
from prunecore.devices import model_device, resolve_device
from prunecore.errors import ArgumentError
from prunecore.evaluate import evaluate, get_metric, recalibrate_bn_
from prunecore.graph import ChannelGraph, trace
from prunecore.plan import Budget, Plan, compose
from prunecore.recover import EpochRecord, FinetuneError, default_metrics, finetune
from prunecore.sensitivity import DEFAULT_LEVELS, sweep
from prunecore.surgery import apply_plan

__all__ = ["IterativeResult", "StepRecord", "prune_iteratively", "step_budgets"]

BN_BATCHES = 50  # BatchNorm re-estimation of each step's pruned model before it is fine-tuned


@dataclass(frozen=True)
class StepRecord:
    """One finished step: the fraction of the original model it keeps, and its metrics after fine-tuning."""

    step: int  # 1-based
    target: float  # the step's budget, a fraction of the original model's FLOPs (or params)
    flops_kept: float
    params_kept: float
    pruned_metrics: Mapping[str, float]  # right after pruning (BatchNorm re-estimated), before fine-tuning
    metrics: Mapping[str, float]  # after fine-tuning
    epochs: tuple[EpochRecord, ...] = field(default_factory=tuple)


@dataclass
class IterativeResult:
    """The final model, the composed plan that maps the original model onto its architecture, each step."""

    model: nn.Module
    plan: Plan
    steps: list[StepRecord]


def step_budgets(budget: Budget, steps: int) -> list[float]:
    """Fractions of the original model each step keeps: equal ratios, budget ** (i / steps)."""
    if not budget.is_fraction:
        raise ArgumentError(f"an iterative budget must be a fraction of the dense model, got {budget}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ArgumentError(f"steps must be a positive integer, got {steps!r}")
    return [budget.value ** (i / steps) for i in range(1, steps + 1)]


def prune_iteratively(
    model: nn.Module,
    example_inputs: torch.Tensor,
    budget: Budget,
    *,
    data: Iterable[Any],
    train: Iterable[Any],
    calibration: Iterable[Any] | None = None,
    steps: int = 3,
    epochs: int = 1,
    method: str = "dp",
    mode: str = "exact",
    levels: Sequence[float] = DEFAULT_LEVELS,
    metrics: Sequence[str] | None = None,
    bn_recalibration: int = 4,
    criterion: str = "l1",
    round_to: int = 1,
    distill: float = 0.5,
    lr: float = 0.01,
    device: str | torch.device | None = None,
    workdir: str | Path | None = None,
    resume: bool = False,
    progress: bool | Callable[[str], None] = False,
    statable: bool = False,
) -> IterativeResult:
    """Prune `model` (not changed) to `budget` in `steps` steps, fine-tuning `epochs` after each.

    Each step sweeps the current model on `data` (exact or estimate `mode`, at `levels`), allocates
    the step's budget with `method`, applies it, re-estimates BatchNorm on `calibration` and
    fine-tunes on `train` with the dense model as teacher (`distill` as in `finetune`). `metrics`
    default to accuracy and loss, or kl and agreement for unlabelled data. `workdir` keeps each
    step's model and the fine-tuning checkpoints; with `resume=True` a killed run continues there.
    `bn_recalibration` batches re-estimate BatchNorm at every sweep point, and `BN_BATCHES` the
    step's pruned model. `progress` is True for bars, or a function given one line per stage.
    `statable=True` (a transformers model) allocates every step under `prunecore.hf.statable`, so
    each step, and so the final model, keeps one count per layer that `save_pretrained` can state.
    """
    targets = step_budgets(budget, steps)
    say = progress if callable(progress) else (print if progress else (lambda _line: None))
    bars = progress is True
    device = resolve_device(device)
    # the teacher and the start: the caller's module only where that changes nothing of it
    dense = model if model_device(model) == device and not model.training else copy.deepcopy(model).to(device).eval()
    example = example_inputs.to(device)
    names = list(metrics) if metrics else default_metrics(data)
    reference = dense if any(get_metric(m).needs_reference for m in names) else None
    calibration = data if calibration is None else calibration
    kind = budget.kind
    dense_cost = _cost(dense, example)
    work = None if workdir is None else Path(workdir)
    if work is not None and not resume and any(work.glob("step*.pt")):
        raise FinetuneError(f"{str(work)!r} holds a previous run's steps: pass resume=True (--resume) to continue "
                            "it, or choose another folder; nothing there was changed")  # fmt: skip
    current, plan, done = _resume(dense, example, work) if work is not None and resume else (dense, None, [])
    records = list(done)
    for step in range(len(records) + 1, steps + 1):
        target = targets[step - 1]
        graph = trace(current, example)
        say(f"step {step}/{steps}: sweeping {len(graph.prunable)} groups ({mode})")
        curves = sweep(current, data, example, levels=levels, criterion=criterion,
                       metric=names if mode == "exact" else ["loss"], bn_recalibration=bn_recalibration,
                       calibration=calibration, round_to=round_to, progress=bars, graph=graph, mode=mode)  # fmt: skip
        problem = allocation_problem(curves, graph, current, criterion=criterion, round_to=round_to)
        exclude: list[str] = []
        if statable:
            limits = hf.statable(current, graph)
            problem, exclude = limits.constrain(problem)
        absolute = Budget(**{kind: max(target * dense_cost[kind], 1.0 + 1e-9)})  # of the original model
        renumbered = _renumbered(plan, graph)
        if renumbered:
            say(f"step {step}/{steps}: {len(renumbered)} group(s) keep their channels from here on: traced again, "
                f"their units are not the ones the earlier steps kept ({', '.join(renumbered[:3])})")  # fmt: skip
        step_plan = solve(problem, absolute, method, exclude=exclude + renumbered)
        step_plan = dataclasses.replace(step_plan, groups={n: g for n, g in step_plan.groups.items()
                                                           if n not in renumbered})  # fmt: skip
        say(f"step {step}/{steps}: {method} to {target:.1%} of the original {kind}")
        pruned = apply_plan(current, step_plan, graph=graph)
        if bn_recalibration:
            recalibrate_bn_(pruned, calibration, batches=BN_BATCHES)
        pruned_metrics = evaluate(pruned, data, names, reference=reference)
        checkpoint = None if work is None else work / f"step{step}.finetune.pt"
        tuned = finetune(pruned, train, teacher=dense, epochs=epochs, lr=lr, distill=distill, eval_data=data,
                         metrics=names, device=device, checkpoint=checkpoint, resume=resume,
                         progress=bars)  # fmt: skip
        current = tuned.model
        plan = step_plan if plan is None else compose(plan, step_plan)
        cost = _cost(current, example)
        record = StepRecord(step, target, cost["flops"] / dense_cost["flops"], cost["params"] / dense_cost["params"],
                            pruned_metrics, dict(tuned.history[-1].metrics), tuple(tuned.history))  # fmt: skip
        records.append(record)
        say(f"step {step}/{steps}: {record.flops_kept:.1%} of the FLOPs, pruned {_fmt(pruned_metrics)}, "
            f"fine-tuned {_fmt(record.metrics)}")  # fmt: skip
        if work is not None:
            _save_step(work, step, current, plan, records)
    assert plan is not None  # steps >= 1
    return IterativeResult(current.eval(), plan, records)


# -- helpers ----------------------------------------------------------------------------------------
def _renumbered(plan: Plan | None, graph: ChannelGraph) -> list[str]:
    """Groups of the current model whose units are not the ones `plan` (the steps so far) kept.

    Tracing a pruned model again can find other units: a Llama layer cut to its last KV group has
    no KV dim left to group its query heads by, so its heads group counts query heads. Such a group
    cannot be numbered in the original model's units, so it stays whole from then on.
    """
    if plan is None:
        return []
    return [g.name for g in graph.prunable if g.name in plan.groups and len(plan.groups[g.name].keep) != g.size]


def _cost(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    c = count(model, example)
    return {"flops": c.flops, "params": c.params}


def _fmt(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _save_step(work: Path, step: int, model: nn.Module, plan: Plan, records: list[StepRecord]) -> None:
    """The model after `step` and the composed plan, as a `save_pruned`-style file (plain data only)."""
    from prunecore.files import write_atomic

    payload = {
        "format": "prunecore.iterative-step/1", "step": step, "plan": plan.to_json(),
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "records": [dataclasses.asdict(r) for r in records],
    }  # fmt: skip
    write_atomic(work / f"step{step}.pt", lambda f: torch.save(payload, f), "step file")


def _resume(dense: nn.Module, example: torch.Tensor, work: Path) -> tuple[nn.Module, Plan | None, list[StepRecord]]:
    """The model, composed plan and records of the last finished step in `work` (the dense model if none)."""
    files = sorted(work.glob("step*.pt"), key=lambda p: p.stem)
    steps = [p for p in files if p.stem[4:].isdigit()]
    if not steps:
        return dense, None, []
    last = max(steps, key=lambda p: int(p.stem[4:]))
    try:
        payload = torch.load(last, map_location="cpu", weights_only=True)
        plan = Plan.from_json(payload["plan"])
    except Exception as exc:  # a file of something else: name it, keep the reason
        raise FinetuneError(f"step file {str(last)!r} cannot be read: {type(exc).__name__}: {exc}") from None
    model = apply_plan(dense, plan, graph=trace(dense, example))  # the composed plan rebuilds the architecture
    model.load_state_dict(payload["state_dict"], strict=True)
    records = [StepRecord(**{**r, "epochs": tuple(map(EpochRecord.from_dict, r["epochs"]))})
               for r in payload["records"]]  # fmt: skip
    return model.to(model_device(dense)), plan, records
