"""One lock between torch.fx tracing and every forward pass prunecore makes.

`torch.fx` traces by patching `nn.Module.__call__` for the whole process while it runs. Any other
thread calling a module in that window lands in the fx tracer and fails ("module is not installed
as a submodule"), which is what two dashboard sessions did to each other: one traced for a sweep
while the other ran its model. Forward passes take the shared side (many at once, re-entrant per
thread), fx tracing the exclusive side (alone). A forward holds it for one call, so a trace waits
for at most the forward passes already running; a waiting trace holds back new ones so that it
cannot starve.

prunecore's fx tracer also lets module calls of other threads through unrecorded
(`suffix._Tracer`), which covers forward passes that do not go through prunecore (your own
code running a model while a sweep starts); the lock keeps the rest of fx's process-wide patching
(wrapped functions, `__getattr__`) out of prunecore's own passes.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["fx_tracing", "forward_pass"]

_cond = threading.Condition()
_readers = 0  # forward passes running, over all threads
_writer: int | None = None  # ident of the thread tracing with fx
_waiting_writers = 0
_local = threading.local()  # .depth: this thread's nested forward passes


@contextlib.contextmanager
def forward_pass() -> Iterator[None]:
    """Hold while running a model: no fx trace patches modules meanwhile."""
    global _readers
    depth = getattr(_local, "depth", 0)
    me = threading.get_ident()
    if depth == 0 and _writer != me:
        with _cond:
            while _writer is not None or _waiting_writers:
                _cond.wait()
            _readers += 1
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth
        if depth == 0 and _writer != me:
            with _cond:
                _readers -= 1
                if _readers == 0:
                    _cond.notify_all()


@contextlib.contextmanager
def fx_tracing() -> Iterator[None]:
    """Hold while torch.fx traces: alone, with no forward pass of another thread running."""
    global _writer, _waiting_writers
    me = threading.get_ident()
    if getattr(_local, "depth", 0) or _writer == me:
        raise RuntimeError("torch.fx tracing from inside a forward pass or another trace would deadlock")
    with _cond:
        _waiting_writers += 1
        try:
            while _writer is not None or _readers:
                _cond.wait()
        finally:
            _waiting_writers -= 1
        _writer = me
    try:
        yield
    finally:
        with _cond:
            _writer = None
            _cond.notify_all()
