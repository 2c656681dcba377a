"""`UserError`: the one base of every failure that the user's input causes.

Each concept keeps its own subclass (`PlanError`, `ModelSpecError`, `DataSpecError`, ...), so the
message can say which input is wrong; the CLI turns any `UserError` into a one-line message and
exit status 2, and the dashboard into an `st.error` that leaves the app working. Anything else is
a bug in prunecore and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from prunecore._concurrency import forward_pass

__all__ = ["ArgumentError", "ModelRunError", "UserError", "describe_inputs", "running_model"]


class UserError(Exception):
    """Something the user gave (a spec, a file, a number, a model) cannot be used; the message says what."""


class ArgumentError(UserError, ValueError):
    """An argument out of range or of the wrong kind: a sparsity of 1.5, an unknown metric, no data."""


class ModelRunError(UserError, RuntimeError):
    """The user's model raised while prunecore ran it: the message names the model, the step and the inputs."""


def describe_inputs(inputs: Any) -> str:
    """`(1, 3, 224, 224) float32`-style description of example inputs, for error messages."""
    if isinstance(inputs, (tuple, list)):
        return ", ".join(describe_inputs(x) for x in inputs) or "no inputs"
    shape = getattr(inputs, "shape", None)
    if shape is not None:
        return f"{tuple(shape)} {str(getattr(inputs, 'dtype', '')).removeprefix('torch.')}".strip()
    return type(inputs).__name__


@contextlib.contextmanager
def running_model(model: Any, inputs: Any, step: str) -> Iterator[None]:
    """Wrap what the user's model raises while prunecore runs it in a `ModelRunError`.

    Torch's own message ("mat1 and mat2 shapes cannot be multiplied") says what failed but not
    in which model, at which prunecore step, on which inputs; this adds all three. Errors that are
    already a `UserError`, and interrupts, pass through unchanged. The forward pass also holds
    `_concurrency.forward_pass`, so no torch.fx trace in another thread patches modules meanwhile.
    """
    try:
        with forward_pass():
            yield
    except UserError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelRunError(
            f"{type(model).__name__} failed during {step} on inputs {describe_inputs(inputs)}: "
            f"{type(exc).__name__}: {first}"
        ) from exc
