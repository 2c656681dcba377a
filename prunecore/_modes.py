"""Temporarily set modules' training flags: how non-mutating calls run a model in a chosen mode."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn


@contextmanager
def training_flags(model: nn.Module, flag: Callable[[nn.Module], bool]) -> Iterator[None]:
    """Set every module's `training` to `flag(module)`; restore each exact flag afterwards."""
    saved = {m: m.training for m in model.modules()}
    try:
        for m in saved:
            m.training = flag(m)
        yield
    finally:
        for m, training in saved.items():
            m.training = training


def eval_mode(model: nn.Module):
    """Every module in eval mode for the duration of a `with` block."""
    return training_flags(model, lambda m: False)
