"""Where prunecore runs a model: the device choice and optional mixed-precision evaluation.

One resolution rule everywhere (`sweep`, `evaluate`, `evaluate_plan`, `recalibrate_bn_`,
`allocate`, `finetune`, the CLI's `--device`, the dashboard): the device asked for, else CUDA
when present, else the CPU. Asking for CUDA where there is none is an error, never a silent
fallback, because a user who asked for the GPU would otherwise wait hours on the CPU unaware.

Autocast (`"bf16"` / `"fp16"`) trades exactness for speed in evaluation passes only. It changes
the numbers, so a sweep records it in its config and its run id. So does `channels_last`: convolutions
on (N, H, W, C)-ordered images and weights take other kernels, which on the 2-core CPU of
`bench/bench_sweep.py --layout-only` swept the sample MobileNetV2 1.35x and ResNet-20 1.14x faster,
and torchvision's resnet18 at 32 px 0.84x (slower); the sums come out in another order, so the last
bits can differ.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from prunecore.errors import ArgumentError

__all__ = ["AUTOCAST", "autocast", "channels_last_batch", "channels_last_copy", "check_autocast", "model_device",
           "on_device", "resolve_device", "synchronizer"]

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The mixed-precision modes evaluation accepts (`autocast=` / `--autocast`)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or CUDA when present else the CPU; an `ArgumentError` for CUDA where there is none."""
    try:
        local = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise ArgumentError(f"device {device!r} is not a device torch knows ({exc}); use cpu, cuda or cuda:N") from None
    if local.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"device {str(device)!r}: no CUDA device is available here; use cpu")
    if local.type == "cuda" and local.index is not None and local.index >= torch.cuda.device_count():
        raise ArgumentError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return local


def model_device(model: nn.Module) -> torch.device:
    """Where `model` lives: its first parameter's device, else its first buffer's, else the CPU."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` if it is on `device`, else a copy there: the caller's model never moves."""
    return model if model_device(model) == device else copy.deepcopy(model).to(device)


def synchronizer(tensors: Iterable[Any]) -> Callable[[], None]:
    """A call that waits until the CUDA devices of `tensors` have finished their queued work; a no-op on the CPU.

    CUDA kernels launch asynchronously, so a clock read after a forward pass times the launches,
    not the work: every timer stops the clock after this call.
    """
    devices = sorted({x.device for x in tensors if isinstance(x, torch.Tensor) and x.device.type == "cuda"}, key=str)

    def sync() -> None:
        for device in devices:
            torch.cuda.synchronize(device)

    return sync


def check_autocast(mode: str | None, device: torch.device | None = None) -> str | None:
    """`mode` if it names a mixed-precision mode (or is None) that runs on `device` (when given); else an
    `ArgumentError` naming the valid ones."""
    if mode is not None and mode not in AUTOCAST:
        raise ArgumentError(f"autocast must be one of {sorted(AUTOCAST)} or None, got {mode!r}")
    if mode == "fp16" and device is not None and device.type == "cpu":
        raise ArgumentError("autocast 'fp16' runs on CUDA only; on the CPU use 'bf16'")
    return mode


@contextlib.contextmanager
def autocast(device: torch.device, mode: str | None) -> Iterator[None]:
    """Mixed precision for the forward passes inside, or nothing when `mode` is None."""
    if check_autocast(mode, device) is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=AUTOCAST[mode]):
        yield


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor, or a tuple/list of tensors) on `device`; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(part, device) for part in batch)
    return batch


def channels_last_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose 4-D weights (convolutions) are in channels-last order; `model` is not changed."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def channels_last_batch(batch: Any) -> Any:
    """A batch with its 4-D tensors (N, C, H, W images) in channels-last order; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(channels_last_batch(part) for part in batch)
    return batch
