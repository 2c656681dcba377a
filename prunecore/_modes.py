"""How non-mutating calls run a model: in a chosen mode, on a module tree of their own.

`working_copy` gives a call its own modules (hooks, training flags) over the model's own tensors,
so a trace in one thread never changes what another thread is running or copying.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn


def working_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree that shares its parameters and buffers (no tensor is copied).

    Hooks registered and training flags set on the copy leave `model` as it is, for any other
    thread using it; parameters keep their identity, so rules still recognise `self.weight`.
    """
    memo = {id(t): t for _, t in model.named_parameters(remove_duplicate=False)}
    memo.update((id(t), t) for _, t in model.named_buffers(remove_duplicate=False))
    return copy.deepcopy(model, memo)


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
