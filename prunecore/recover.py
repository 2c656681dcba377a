"""`finetune`: train a pruned model back towards the dense model's accuracy, with distillation.

One-shot pruning loses accuracy that a few epochs of training win back; the dense model is the best
teacher there is, since the pruned model starts as a slice of it. `finetune` trains a copy of the
model (the one passed in is never changed) with cross-entropy on labels, knowledge distillation
from a teacher (KL on temperature-softened logits, Hinton et al. 2015), or a mix of both; without
labels distillation alone still works. The learning rate follows one cosine over all steps.

Every finished epoch is written atomically to `checkpoint` (weights, optimiser, schedule, history),
so a run killed at any moment (SIGKILL included) resumes from its last finished epoch with
`resume=True` and ends with the same weights as a run never stopped: each epoch's shuffling and
dropout draw from a generator seeded by (seed, epoch), not from what ran before.

    >>> s = pc.load_sample("resnet20")
    >>> result = finetune(pruned, s.train, teacher=s.model, epochs=2, eval_data=s.heldout)
    >>> [e.metrics["accuracy"] for e in result.history]
    [0.962, 0.971]
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from prunecore.devices import resolve_device
from prunecore.errors import ArgumentError, UserError, running_model
from prunecore.evaluate import evaluate, get_metric, metrics_for, output_logits, split_batch
from prunecore.files import write_atomic

__all__ = [
    "FORMAT", "EpochRecord", "FinetuneConfig", "FinetuneError", "FinetuneResult", "default_metrics",
    "distillation_loss", "finetune", "read_checkpoint", "resolve_device",
]  # fmt: skip

FORMAT = "prunecore.finetune/1"


class FinetuneError(UserError, ValueError):
    """Fine-tuning cannot run as asked: nothing to learn from, or a checkpoint of another run."""


@dataclass(frozen=True)
class FinetuneConfig:
    """The settings of a fine-tuning run; a checkpoint resumes only under the same ones.

    `distill` weighs distillation against cross-entropy when there is a teacher (1.0: distillation
    only, labels unused); `temperature` softens both distributions. SGD with Nesterov momentum,
    `lr` decayed by one cosine to 0 over all steps.
    """

    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    distill: float = 0.5
    temperature: float = 4.0
    seed: int = 0
    amp: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ArgumentError(f"epochs must be a positive integer, got {self.epochs!r}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ArgumentError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0.0 <= self.distill <= 1.0:
            raise ArgumentError(f"distill must be in [0, 1], got {self.distill!r}")
        if not (0.0 <= self.momentum < 1.0 and self.weight_decay >= 0.0):
            raise ArgumentError("momentum must be in [0, 1) and weight_decay non-negative")


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch: mean training loss, the learning rate it started at, its time, held-out metrics."""

    epoch: int  # 1-based
    loss: float
    lr: float
    seconds: float
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what checkpoints, job records and step files hold)."""
        return {**dataclasses.asdict(self), "metrics": dict(self.metrics)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpochRecord:
        return cls(**{**data, "metrics": dict(data["metrics"])})


@dataclass
class FinetuneResult:
    """The fine-tuned model (a new module, in eval mode) and one record per epoch, resumed ones included."""

    model: nn.Module
    history: list[EpochRecord]
    config: FinetuneConfig


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened logits, times T**2, averaged over the examples.

    Logits are (..., classes): every leading position is an example (a token of a language model
    too). The T**2 keeps its gradient on the scale of cross-entropy's as T changes; use it in your
    own training loop as `loss = (1 - a) * ce + a * distillation_loss(s, t.detach(), T)`.
    """
    classes = student.shape[-1]
    log_s = F.log_softmax(student.reshape(-1, classes).float() / temperature, dim=-1)  # (N, C)
    log_t = F.log_softmax(teacher.reshape(-1, classes).float() / temperature, dim=-1)  # (N, C)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


def finetune(
    model: nn.Module,
    train: Iterable[Any],
    *,
    teacher: nn.Module | None = None,
    epochs: int = 1,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    distill: float = 0.5,
    temperature: float = 4.0,
    seed: int = 0,
    amp: bool = False,
    eval_data: Iterable[Any] | None = None,
    metrics: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool | Callable[[int, int, int], None] = False,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    accelerator: Any = "auto",
) -> FinetuneResult:
    """Train a copy of `model` on `train` for `epochs`, from `teacher` and/or labels; `model` is not changed.

    `train` yields `(inputs, targets)`, `(inputs,)` or bare inputs; a `DataLoader` that shuffles is
    re-seeded every epoch from (seed, epoch). Without labels a `teacher` is needed. After each epoch
    the copy is evaluated on `eval_data` (default metrics: accuracy and loss, or kl and agreement
    against the teacher without labels) and, with `checkpoint`, the epoch is written there
    atomically; `resume=True` continues from it. `device` defaults to CUDA when present; `amp`
    trains under bfloat16 autocast on CUDA. `progress`: True for a bar, or a function called with
    (epoch, batch, batches) after each batch; `on_epoch(record)` after each epoch is saved.

    Launched on several processes (`accelerate launch`, `torchrun`: WORLD_SIZE > 1), the same call
    trains data-parallel through HuggingFace Accelerate (`accelerator="auto"`; or pass your own
    `accelerate.Accelerator`; None: never): each batch of `train` (a DataLoader) is split across the
    processes, gradients are averaged, and the main process alone writes checkpoints, so the run
    equals one process's up to float rounding where the model has no BatchNorm or dropout (those
    see each process's share of the batch).
    """
    config = FinetuneConfig(epochs, lr, momentum, weight_decay, distill, temperature, seed, amp)
    runner = _runner(accelerator, device)
    device = runner.device
    student = copy.deepcopy(model).to(device)
    teacher = _on(teacher, device)
    path = None if checkpoint is None else Path(checkpoint)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise FinetuneError(f"{type(model).__name__} has no trainable parameters")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    steps = _batches(train)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(epochs * steps) if steps else lambda _: 1.0)
    history: list[EpochRecord] = []
    if path is not None and path.exists():
        if not resume:
            raise FinetuneError(f"checkpoint {str(path)!r} exists: pass resume=True (--resume) to continue it, or "
                                "choose another path; it is left as it is")  # fmt: skip
        history = _restore(path, config, student, optimizer, schedule)
    autocast = amp and device.type == "cuda"
    wrapped, optimizer, batches, schedule = runner.prepare(student, optimizer, train, schedule)
    for epoch in range(len(history) + 1, epochs + 1):
        began = time.perf_counter()
        start_lr = optimizer.param_groups[0]["lr"]
        loop = _Loop(wrapped, teacher, optimizer, schedule, config, autocast, runner)
        loss = loop.epoch(batches, train, epoch, progress if runner.is_main else False, steps)
        scores = _scores(student, teacher, eval_data, metrics) if eval_data is not None else {}
        history.append(EpochRecord(epoch, loss, start_lr, time.perf_counter() - began, scores))
        if path is not None and runner.is_main:
            _save(path, config, student, optimizer, schedule, history)
        runner.wait()  # no process starts the next epoch before the checkpoint is whole
        if on_epoch is not None and runner.is_main:
            on_epoch(history[-1])
    return FinetuneResult(student.eval(), history, config)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A fine-tuning checkpoint as plain data (weights only, never unpickled code); `FinetuneError` if it is not one."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FinetuneError(f"checkpoint {str(path)!r} does not exist") from None
    except Exception as exc:  # a truncated or foreign file: say which file, keep the reason
        raise FinetuneError(f"checkpoint {str(path)!r} cannot be read: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FinetuneError(f"{str(path)!r} is not a prunecore fine-tuning checkpoint ({FORMAT})")
    return payload


# -- one epoch ----------------------------------------------------------------------------------------
@dataclass
class _Loop:
    """What one epoch needs: the (possibly data-parallel) student, its optimiser and schedule, the teacher."""

    student: nn.Module
    teacher: nn.Module | None
    optimizer: Any  # torch.optim.Optimizer, or Accelerate's wrapper of it
    schedule: Any
    config: FinetuneConfig
    autocast: bool
    runner: _Runner

    def epoch(self, batches: Iterable[Any], original: Iterable[Any], epoch: int,
              progress: bool | Callable[[int, int, int], None], steps: int) -> float:  # fmt: skip
        """Train one epoch on `batches` (`original`, prepared); the mean training loss per example."""
        device = self.runner.device
        total, seen = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        bar = _bar(progress, epoch, self.config.epochs, steps)
        seed = self.config.seed * 1_000_003 + epoch  # this epoch's shuffle and dropout, however it resumed
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            if isinstance(original, DataLoader) and original.generator is not None:
                original.generator.manual_seed(seed)
            self.student.train()
            for i, batch in enumerate(batches):
                inputs, targets = split_batch(batch)
                inputs = inputs.to(device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    with running_model(self.student, inputs, "fine-tuning"):
                        logits = output_logits(self.student(inputs))  # (B, C) or (B, T, C)
                    loss = _loss(logits, self.teacher, inputs, targets, self.config)
                self.optimizer.zero_grad(set_to_none=True)
                self.runner.backward(loss)
                self.optimizer.step()
                self.schedule.step()
                if not math.isfinite(loss.item()):
                    raise FinetuneError(f"the training loss became {loss.item()} in epoch {epoch} (batch {i + 1}); "
                                        "lower lr")  # fmt: skip
                total += loss.item() * inputs.shape[0]
                seen += inputs.shape[0]
                bar(i + 1)
        bar(None)
        total, seen = self.runner.sum(total), self.runner.sum(seen)  # over every process's share
        if seen.item() == 0:
            raise FinetuneError("the training data is empty")
        return float(total / seen)


def _loss(logits: torch.Tensor, teacher: nn.Module | None, inputs: torch.Tensor, targets: torch.Tensor | None,
          config: FinetuneConfig) -> torch.Tensor:  # fmt: skip
    """Cross-entropy on labels, distillation from the teacher, or their mix by `config.distill`."""
    use_labels = targets is not None and (teacher is None or config.distill < 1.0)
    if teacher is None and targets is None:
        raise FinetuneError("the training data has no labels and there is no teacher: nothing to learn from; "
                            "pass teacher= (the dense model) to distil from it")  # fmt: skip
    parts = []
    if use_labels:
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.to(logits.device).reshape(-1))
        parts.append((1.0 - config.distill if teacher is not None else 1.0) * ce)
    if teacher is not None:
        with torch.no_grad():
            soft = output_logits(teacher(inputs))  # as `logits`
        weight = config.distill if targets is not None else 1.0
        parts.append(weight * distillation_loss(logits, soft, config.temperature))
    return sum(parts)  # type: ignore[return-value]


def default_metrics(data: Iterable[Any]) -> list[str]:
    """Accuracy and loss when the data's first batch has labels (perplexity too for next-token targets), else the
    label-free kl and agreement."""
    _, targets = split_batch(next(iter(data)))
    return metrics_for(targets)


def _scores(student: nn.Module, teacher: nn.Module | None, data: Iterable[Any],
            metrics: Sequence[str] | None) -> dict[str, float]:  # fmt: skip
    names = list(metrics) if metrics else default_metrics(data)
    if teacher is None and any(get_metric(m).needs_reference for m in names):
        raise ArgumentError(f"metric(s) {', '.join(names)} compare with the dense model: pass teacher=")
    reference = teacher if any(get_metric(m).needs_reference for m in names) else None
    return evaluate(student, data, names, reference=reference)


# -- one process, or many through Accelerate --------------------------------------------------------
class _Runner:
    """One process: what `accelerate.Accelerator` does for many, done directly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    is_main = True

    def prepare(self, *objects: Any) -> tuple[Any, ...]:
        return objects

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def wait(self) -> None:
        pass

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return value


class _Accelerated(_Runner):
    """Data-parallel training through an `accelerate.Accelerator` (DDP across its processes)."""

    def __init__(self, accelerator: Any) -> None:
        super().__init__(accelerator.device)
        self.accelerator = accelerator
        self.is_main = bool(accelerator.is_main_process)

    def prepare(self, *objects: Any) -> tuple[Any, ...]:
        return tuple(self.accelerator.prepare(*objects))

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(value.to(self.device), reduction="sum").cpu()


def _runner(accelerator: Any, device: str | torch.device | None) -> _Runner:
    """Accelerate when asked, or when this process is one of several ("auto"); else one process on `device`."""
    local = resolve_device(device)
    if accelerator == "auto":
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if processes <= 1:
            return _Runner(local)
        try:
            from accelerate import Accelerator
            from accelerate.utils import DataLoaderConfiguration
        except ImportError:
            raise FinetuneError(f"this process is one of {processes} (WORLD_SIZE); data-parallel fine-tuning runs "
                                "through HuggingFace Accelerate: pip install 'prunecore[accelerate]'") from None
        split = DataLoaderConfiguration(split_batches=True)  # a batch is split, not one batch per process
        accelerator = Accelerator(cpu=local.type == "cpu", dataloader_config=split)
    if accelerator is None:
        return _Runner(local)
    if device is not None and torch.device(device).type != accelerator.device.type:
        raise ArgumentError(f"device {device!r} differs from the accelerator's {accelerator.device}")
    return _Accelerated(accelerator)


# -- helpers ----------------------------------------------------------------------------------------
def _on(teacher: nn.Module | None, device: torch.device) -> nn.Module | None:
    """The teacher in eval mode on `device`: the caller's module when that changes nothing of it, else a copy."""
    if teacher is None:
        return None
    here = next(teacher.parameters(), torch.empty(0)).device
    if here == device and not teacher.training:
        return teacher  # run under no_grad in eval mode: neither its weights nor its BatchNorm change
    return copy.deepcopy(teacher).to(device).eval()


def _batches(train: Iterable[Any]) -> int:
    try:
        return len(train)  # type: ignore[arg-type]
    except TypeError:
        return 0  # an iterable without a length: the schedule stays constant


def _cosine(total: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _bar(progress: bool | Callable[[int, int, int], None], epoch: int, epochs: int,
         steps: int) -> Callable[[int | None], None]:  # fmt: skip
    """`bar(batch)` after each batch, `bar(None)` at the epoch's end."""
    if callable(progress):
        return lambda i: None if i is None else progress(epoch, i, steps)
    if not progress:
        return lambda i: None
    from tqdm.auto import tqdm

    bar = tqdm(total=steps or None, desc=f"fine-tune epoch {epoch}/{epochs}", unit="batch", leave=False)
    return lambda i: bar.close() if i is None else bar.update(1)


def _save(path: Path, config: FinetuneConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
          schedule: torch.optim.lr_scheduler.LRScheduler, history: list[EpochRecord]) -> None:  # fmt: skip
    payload = {
        "format": FORMAT, "config": dataclasses.asdict(config), "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "history": [e.to_dict() for e in history],
    }  # fmt: skip
    write_atomic(path, lambda f: torch.save(payload, f), "checkpoint")


def _restore(path: Path, config: FinetuneConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
             schedule: torch.optim.lr_scheduler.LRScheduler) -> list[EpochRecord]:  # fmt: skip
    payload = read_checkpoint(path)
    saved = payload.get("config", {})
    if saved != dataclasses.asdict(config):
        other = {k: (saved.get(k), v) for k, v in dataclasses.asdict(config).items() if saved.get(k) != v}
        what = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in other.items())
        raise FinetuneError(f"checkpoint {str(path)!r} was written with other settings: {what}; resume with the same "
                            "settings, or start a new checkpoint")  # fmt: skip
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        raise FinetuneError(f"checkpoint {str(path)!r} holds another model's weights: "
                            f"{str(exc).splitlines()[0]}") from None  # fmt: skip
    optimizer.load_state_dict(payload["optimizer"])
    schedule.load_state_dict(payload["schedule"])
    return [EpochRecord.from_dict(e) for e in payload["history"]]
