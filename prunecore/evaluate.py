"""Metrics for a (pruned) model, and BatchNorm re-estimation after pruning.

Every metric is a per-sample sum divided by the sample count at the end, so results are exact
over the data whatever the batch sizes. Label-free metrics compare the model with a `reference`
(the dense model) on the same inputs, so pruning can be judged without labelled data.

Example:
    >>> evaluate(pruned, loader, metric=["accuracy", "kl"], reference=dense)
    {'accuracy': 0.71, 'kl': 0.042}
    >>> recalibrate_bn_(pruned, loader, batches=50)  # EagleEye's adaptive BN
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunecore.datasets import DataSpecError
from prunecore.devices import autocast as autocast_ctx
from prunecore.devices import channels_last_batch, channels_last_copy, model_device, on_device, resolve_device
from prunecore.errors import ArgumentError, ModelRunError, running_model
from prunecore._modes import training_flags
from prunecore.graph import ChannelGraph
from prunecore.plan import Plan
from prunecore.surgery import apply_plan

__all__ = [
    "Metric", "as_rows", "evaluate", "evaluate_plan", "get_metric", "list_metrics", "metrics_for", "output_logits",
    "recalibrate_bn_", "split_batch",
]  # fmt: skip

# (logits, reference logits or None, targets or None) -> float64 sum over the batch's samples
_SumFn = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    """A registered metric: what it needs, and how to sum it over a batch."""

    name: str
    needs_labels: bool
    needs_reference: bool
    batch_sum: _SumFn
    doc: str
    higher_is_better: bool
    bounds: tuple[float, float] = (0.0, math.inf)  # the values it can take; predictions are clipped to them
    finish: Callable[[float], float] | None = None  # applied to the mean (perplexity: exp of the mean loss)

    def value(self, total: float, samples: int) -> float:
        """The metric from its sum over `samples` samples."""
        mean = total / samples
        return self.finish(mean) if self.finish is not None else mean


def _kl_sum(logits: torch.Tensor, ref: torch.Tensor | None, _t: torch.Tensor | None) -> torch.Tensor:
    # KL(p_ref || p_model) = sum p_ref * (log p_ref - log p_model); kl_div takes (log q, log p).
    log_q, log_p = F.log_softmax(logits.double(), dim=1), F.log_softmax(ref.double(), dim=1)
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True)


_METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("accuracy", True, False, lambda lg, _r, t: (lg.argmax(1) == t).sum().double(),
               "top-1 accuracy, 0..1", True, (0.0, 1.0)),
        Metric("agreement", False, True, lambda lg, r, _t: (lg.argmax(1) == r.argmax(1)).sum().double(),
               "fraction of samples whose top-1 equals the reference's", True, (0.0, 1.0)),
        Metric("kl", False, True, _kl_sum, "mean KL(p_reference || p_model) in nats", False),
        Metric("loss", True, False, lambda lg, _r, t: F.cross_entropy(lg.double(), t, reduction="sum"),
               "mean cross-entropy per sample (per token for a language model)", False),
        Metric("perplexity", True, False, lambda lg, _r, t: F.cross_entropy(lg.double(), t, reduction="sum"),
               "exp of the mean cross-entropy: a language model's next-token perplexity", False, (1.0, math.inf),
               finish=lambda mean: math.exp(min(mean, 700.0))),
    )
}


def get_metric(name: str) -> Metric:
    if name not in _METRICS:
        raise ArgumentError(f"unknown metric {name!r}; valid metrics: {', '.join(list_metrics())}")
    return _METRICS[name]


def list_metrics() -> list[str]:
    """Names of the registered metrics, sorted (feeds the CLI choices and the dashboard)."""
    return sorted(_METRICS)


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(inputs, targets)`, `(inputs,)` or bare `inputs` -> (inputs, targets or None)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        return batch[0], (torch.as_tensor(batch[1]) if len(batch) == 2 else None)
    raise ArgumentError(f"a batch must be a tensor, (inputs,) or (inputs, targets); got {type(batch).__name__}")


def output_logits(out: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, or `.logits` of a HuggingFace `ModelOutput`."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


def as_rows(logits: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One row of logits per scored sample: (B, C) as is, a sequence model's (B, T, C) as B*T tokens.

    A language model is scored per token: its targets are (B, T) next-token ids (`text:` data).
    """
    if logits.dim() == 3:  # (B, T, C) -> (B*T, C)
        rows = logits.reshape(-1, logits.shape[-1])
        if targets is not None and targets.dim() == 2 and not targets.dtype.is_floating_point:
            targets = targets.reshape(-1)  # (B*T,) token ids
        return rows, targets
    return logits, targets


def metrics_for(targets: torch.Tensor | None) -> list[str]:
    """What to measure when nobody says, from a batch's targets: class labels, next-token ids, or none."""
    if targets is None:
        return ["kl", "agreement"]
    if targets.dim() == 2 and not targets.dtype.is_floating_point:  # (B, T) next tokens: a language model
        return ["perplexity", "loss", "accuracy"]
    return ["accuracy", "loss"]


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The model's logits on `inputs`: (B, C), or (B, T, C) for a sequence model."""
    with running_model(model, inputs, "evaluation"):
        out = output_logits(model(inputs.to(model_device(model))))
    if not isinstance(out, torch.Tensor) or out.dim() not in (2, 3):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelRunError(f"{type(model).__name__} must return logits of shape (batch, classes) or (batch, tokens, "
                            f"vocabulary) to be evaluated; it returned {shape}")  # fmt: skip
    return out


def _check_targets(targets: torch.Tensor, logits: torch.Tensor) -> None:
    """Class labels must index the model's outputs; a folder with more classes than outputs fails here."""
    if targets.dtype.is_floating_point or targets.dim() != 1 or targets.numel() == 0:
        return  # soft targets or an empty batch: the metric checks its own shapes
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= logits.shape[1]:
        raise DataSpecError(
            f"the data has class labels up to {hi} but the model has {logits.shape[1]} outputs (labels 0.."
            f"{logits.shape[1] - 1}); does the data have more classes than the model was built for?"
            if lo >= 0 else f"the data has a negative class label ({lo})"
        )


def _limit(data: Iterable[Any], batches: int | None) -> Iterable[Any]:
    if batches is not None and batches < 0:
        raise ArgumentError(f"batches must be >= 0 or None, got {batches}")
    return data if batches is None else islice(data, batches)


def evaluate(
    model: nn.Module,
    data: Iterable[Any],
    metric: str | Sequence[str] = "accuracy",
    reference: nn.Module | None = None,
    batches: int | None = None,
    device: str | torch.device | None = None,
    autocast: str | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Mean of each requested metric over the samples of `data`, in one pass.

    The model (and reference) run in eval mode under no_grad; their training flags are restored
    afterwards, so evaluating never changes them. `batches` caps the batches used (None = all).
    `device` runs the pass there (on a copy when the model lives elsewhere: evaluating never moves
    your model); default, where the model is. `autocast` ("bf16"/"fp16") runs it in mixed precision;
    `channels_last` runs a channels-last copy on channels-last images (`prunecore.devices`).
    """
    names = list(dict.fromkeys([metric] if isinstance(metric, str) else metric))
    unknown = [n for n in names if n not in _METRICS]
    if unknown or not names:
        what = f"unknown metric(s) {unknown}" if unknown else "no metric requested"
        raise ArgumentError(f"{what}; valid metrics: {', '.join(list_metrics())}")
    specs = [_METRICS[n] for n in names]
    if reference is None and any(s.needs_reference for s in specs):
        needy = [s.name for s in specs if s.needs_reference]
        raise ArgumentError(f"metric(s) {needy} compare with the dense model: pass reference=")
    use_ref = reference is not None and any(s.needs_reference for s in specs)
    same_ref = reference is model  # the model's own outputs: one forward serves both
    if device is not None:
        model = on_device(model, resolve_device(device))
        reference = model if same_ref else on_device(reference, resolve_device(device)) if use_ref else reference
    if channels_last:
        model = channels_last_copy(model)
        reference = model if same_ref else channels_last_copy(reference) if use_ref else reference
    device = model_device(model)
    sums = {n: torch.zeros((), dtype=torch.float64, device=device) for n in names}
    samples = 0
    ref_eval = training_flags(reference, lambda m: False) if use_ref else nullcontext()
    with torch.no_grad(), training_flags(model, lambda m: False), ref_eval:
        for batch in _limit(data, batches):
            inputs, targets = split_batch(batch)
            inputs = channels_last_batch(inputs) if channels_last else inputs
            if targets is None and any(s.needs_labels for s in specs):
                needy = [s.name for s in specs if s.needs_labels]
                raise ArgumentError(f"metric(s) {needy} need labels but the data has no targets; "
                                 "use a label-free metric (kl, agreement) with a reference")
            with autocast_ctx(device, autocast):
                out = _logits(model, inputs)
                ref_out = (out if same_ref else _logits(reference, inputs)) if use_ref else None
            if autocast is not None:  # half-precision logits: the metrics sum in full precision
                out, ref_out = out.float(), ref_out.float() if use_ref else None
            logits, targets = as_rows(out, targets)  # (N, C): N = B, or B*T tokens
            ref = as_rows(ref_out.to(device))[0] if use_ref else None  # (N, C)
            targets = targets.to(device) if targets is not None else None
            if targets is not None:
                _check_targets(targets, logits)
            for s in specs:
                sums[s.name] += s.batch_sum(logits, ref, targets)
            samples += logits.shape[0]
    if samples == 0:
        raise ArgumentError("evaluate got no samples: the data is empty (or batches=0)")
    return {n: _METRICS[n].value(sums[n].item(), samples) for n in names}


def _tracked_bn(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recalibrate_bn_(model: nn.Module, data: Iterable[Any], batches: int | None = 50,
                    device: str | torch.device | None = None) -> nn.Module:
    """Re-estimate BatchNorm running statistics from `data`, in place; returns `model`.

    Pruning changes the features each BatchNorm sees, so its stored statistics go stale; a few
    forward passes re-estimate them (EagleEye, ECCV 2020). Momentum is set to None for the pass,
    so the statistics are the exact average over the batches, independent of their order. Only
    BatchNorm runs in train mode: dropout stays off so the statistics match inference. Labels
    are ignored. Momentum and training flags are restored; on an error the old statistics are too.
    `device` runs the passes there (the model moves for them and moves back); default, where the model is.
    """
    home = model_device(model)
    target = home if device is None else resolve_device(device)
    if target != home:
        try:
            return recalibrate_bn_(model.to(target), data, batches)
        finally:
            model.to(home)
    bns = _tracked_bn(model)
    if not bns:
        return model
    it = iter(_limit(data, batches))
    first = next(it, None)
    if first is None:
        raise ArgumentError("recalibrate_bn_ got no batches: the data is empty (or batches=0)")
    saved = [(bn, bn.momentum, {k: v.clone() for k, v in bn.named_buffers(recurse=False)}) for bn in bns]
    bn_set, device = set(bns), model_device(model)
    try:
        with torch.no_grad(), training_flags(model, lambda m: m in bn_set):
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
            for batch in chain([first], it):
                inputs = split_batch(batch)[0].to(device)
                with running_model(model, inputs, "BatchNorm re-estimation"):
                    model(inputs)
    except BaseException:
        for bn, _, buffers in saved:
            for k, v in buffers.items():
                getattr(bn, k).copy_(v)
        raise
    finally:
        for bn, momentum, _ in saved:
            bn.momentum = momentum
    return model


def evaluate_plan(
    model: nn.Module,
    plan: Plan,
    data: Iterable[Any],
    metric: str | Sequence[str] = "accuracy",
    bn_recalibration: bool | int = True,
    calibration: Iterable[Any] | None = None,
    graph: ChannelGraph | None = None,
    device: str | torch.device | None = None,
    autocast: str | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Measured metrics of `apply_plan(model, plan)`: the numbers a plan's prediction is checked against.

    `bn_recalibration` re-estimates the pruned model's BatchNorm statistics first (True: 50
    batches, an int: that many) on `calibration` (default: `data`), because pruning shifts the
    statistics every following BatchNorm saw. Label-free metrics compare with the dense `model`.
    `model` is not changed. The pruned copy runs on `device` (default CUDA when present, else the
    CPU), in mixed precision with `autocast`, channels-last with `channels_last` (as `evaluate`), so a plan
    can be measured the way a sweep with those settings measured its points.
    """
    names = [metric] if isinstance(metric, str) else list(metric)
    target = resolve_device(device)
    pruned = apply_plan(model, plan, graph=graph).to(target)
    if bn_recalibration:
        batches = 50 if bn_recalibration is True else int(bn_recalibration)
        recalibrate_bn_(pruned, data if calibration is None else calibration, batches=batches)
    needs_reference = any(get_metric(m).needs_reference for m in names)
    return evaluate(pruned, data, names, reference=model if needs_reference else None, device=target,
                    autocast=autocast, channels_last=channels_last)  # fmt: skip
