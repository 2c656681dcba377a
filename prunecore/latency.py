"""Latency in milliseconds as a function of kept widths: measured layer tables, calibrated on whole models.

FLOPs mislead as a latency budget: depthwise convs and memory-bound layers convert MACs into time
at very different rates, and so do odd channel counts. `latency_model` measures instead, on this
machine and runtime (PyTorch eager on the CPU or a CUDA GPU, or ONNX Runtime's CPU provider):

1. **Layer tables** (NetAdapt's lookup tables). Every conv and Linear whose width a plan can change
   is built alone (`ops.layer`: a fresh layer of the pruned weight shape, fed the input shape it
   sees in the model) and timed at a grid of kept (out, in) widths. Between grid points a table is
   bilinear in (out, in), which is exact where a layer's time is affine in its MACs; outside the
   grid it holds its edge value, so a prediction never drops below a measured time.
2. **Calibration.** The tables miss what no table times, and they time layers out of context. The
   dense model and a few uniform and random plans are applied and timed whole, and

       ms(kept) = a + b * Σ tables(kept) + c * Σ layer outputs(kept) + d * other MACs(kept)
                  + e * Σ misaligned inputs(kept)

   is fitted to them by least squares on relative error (b to e non-negative): `a` is the fixed
   cost (the head, pooling, the runtime's dispatch, less the per-call overhead the tables count
   once per layer), `c` the memory-bound ops that follow each layer (BatchNorm, activations,
   adds; their time grows with the layer's output), `d` the MACs of ops without a stand-alone
   layer (attention's matmuls, transposed convs), `e` the layout conversions around layers whose
   input width breaks the runtime's alignment (ONNX Runtime's blocked convs need multiples of 4).

Tables are kept in the run store keyed by machine, runtime, thread count, the layer's shapes and
the batch, so a model sharing layers with one measured before, or the same model tomorrow, reuses
them; a model's calibration is kept by its fingerprint too. Predicting is a few numpy gathers per
layer, so allocation can honour `Budget(latency=ms)` and the dashboard can price every slider move.

    >>> lm = latency_model(model, x, graph, runtime="onnxruntime", batch=32)
    >>> lm.dense_ms, lm.price({"layer1.0.conv1": 32})
    (41.2, 39.8)
    >>> problem = allocation_problem(curves, graph, model, latency=lm)
    >>> plan = allocate(curves, Budget(latency=25.0), "greedy", problem=problem)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunecore import ops
from prunecore._modes import eval_mode, working_copy
from prunecore.cost import CostModel, cost_model, measure_latencies
from prunecore.devices import on_device, synchronizer
from prunecore.errors import ArgumentError, UserError, running_model
from prunecore.graph import ChannelGraph
from prunecore.plan import Plan, kept_units
from prunecore.prune import make_plan
from prunecore.store import RunStore, fingerprint_model
from prunecore.surgery import apply_plan

__all__ = [
    "FRACTIONS", "LatencyError", "LatencyModel", "LayerTable", "Runtime", "get_runtime", "latency_model",
    "list_runtimes", "measure_plans_ms", "register_runtime",
]  # fmt: skip

FORMAT = "prunecore.latency/1"
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
"""Kept fractions of a layer's width at which its table is timed (per axis: 25 points for a conv)."""
CALIBRATION = (0.3, 0.5, 0.7, 0.85)
"""Uniform sparsities of the calibration plans, timed whole beside the dense model and random plans."""
GROUP_LEVELS = (0.25, 0.5, 0.75)
"""Sparsities at which each group alone is applied and timed whole, where that is affordable (in context)."""
CHUNK = 8  # plans timed beside the dense model at once (each a pruned copy in memory)
IN_CONTEXT_SECONDS = 120.0
"""`in_context=None` times every group alone when that should take at most this long."""


class LatencyError(UserError, ValueError):
    """A latency model cannot be built or used as asked; the message names the problem."""


# -- runtimes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Runtime:
    """How one runtime runs a layer and times whole models.

    `layer_call(layer, x)` returns a no-argument callable running the stand-alone layer on `x`
    (what a table times); `time_models(models, inputs)` returns each model's seconds per forward
    pass, timed in alternating rounds; `version()` goes into every store key. `block`: the runtime
    pads channels up to a multiple of it (tables are timed on multiples and read at padded widths);
    `align`: a width that is not a multiple of it may take a slower path, whose ratio each table
    measures. `device`: where it runs ("cpu" or "cuda"); a CUDA runtime is listed everywhere but
    usable only where torch sees a GPU (`usable`).
    """

    name: str
    description: str
    layer_call: Callable[[nn.Module, torch.Tensor], Callable[[], Any]]
    time_models: Callable[[Sequence[nn.Module], tuple[torch.Tensor, ...]], list[float]]
    version: Callable[[], str]
    block: int = 1
    align: int = 1
    device: str = "cpu"

    @property
    def usable(self) -> bool:
        return self.device == "cpu" or torch.cuda.is_available()

    def check(self) -> None:
        """A `LatencyError` when this runtime cannot run here (a CUDA runtime on a machine without a GPU)."""
        if not self.usable:
            raise LatencyError(f"latency runtime {self.name!r} times on a CUDA GPU, and torch sees none on this "
                               f"machine; choose one of {', '.join(list_runtimes(usable=True))}")  # fmt: skip


_RUNTIMES: dict[str, Runtime] = {}


def register_runtime(runtime: Runtime) -> Runtime:
    """Add a runtime by name (it replaces one of the same name)."""
    _RUNTIMES[runtime.name] = runtime
    return runtime


def list_runtimes(usable: bool = False) -> list[str]:
    """Every registered runtime's name, or only those that can run on this machine."""
    return sorted(n for n, rt in _RUNTIMES.items() if rt.usable or not usable)


def get_runtime(name: str) -> Runtime:
    try:
        return _RUNTIMES[name]
    except KeyError:
        raise ArgumentError(f"unknown latency runtime {name!r}; choose from {', '.join(list_runtimes())}") from None


def _torch_call(device: str) -> Callable[[nn.Module, torch.Tensor], Callable[[], Any]]:
    """Runs a stand-alone layer on `device` in PyTorch eager, waiting for the device before returning."""

    def layer_call(layer: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
        place = torch.device(device)
        layer, x = on_device(layer, place), x.to(place)
        sync = synchronizer((x,))

        def call() -> Any:
            with torch.inference_mode():
                out = layer(x)
            sync()
            return out

        return call

    return layer_call


def _torch_models(device: str) -> Callable[[Sequence[nn.Module], tuple[torch.Tensor, ...]], list[float]]:
    """Times whole models on `device` (copies there where they live elsewhere; the callers' models never move)."""

    def time_models(models: Sequence[nn.Module], inputs: tuple[torch.Tensor, ...]) -> list[float]:
        place = torch.device(device)
        placed = [on_device(m, place) for m in models]
        xs = tuple(x.to(place) for x in inputs)
        return [t.median_s for t in measure_latencies(placed, xs, rounds=5, warmup=1, min_seconds=0.05)]

    return time_models


def _torch_version(device: str) -> Callable[[], str]:
    def version() -> str:
        if device == "cpu":
            return f"torch {torch.__version__}"
        return f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"

    return version


def _onnx_call(layer: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """The layer exported alone (TorchScript exporter: milliseconds, where the dynamo one takes seconds)."""
    from prunecore.deploy import onnx_session

    buffer = io.BytesIO()
    with _quiet_export():
        torch.onnx.export(layer.eval(), (x,), buffer, dynamo=False, input_names=["x"])
    session = onnx_session(buffer.getvalue())
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def _onnx_models(models: Sequence[nn.Module], inputs: tuple[torch.Tensor, ...]) -> list[float]:
    """Each model exported (TorchScript's exporter, else `deploy.export_onnx`'s), then timed in ONNX Runtime."""
    from prunecore.deploy import DeployError, OnnxModule, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, m in enumerate(models):
            path = Path(tmp) / f"{i}.onnx"
            try:
                with _quiet_export(), eval_mode(m), torch.no_grad():  # it prints the graph when it fails
                    torch.onnx.export(m, inputs, str(path), dynamo=False)
            except Exception as exc:  # noqa: BLE001  # any failure of the old exporter: the deployment one
                if isinstance(exc, DeployError):
                    raise
                with eval_mode(m):
                    export_onnx(m, inputs, path, check=False)
            files.append(OnnxModule(path))
        return [t.median_s for t in measure_latencies(files, inputs, rounds=5, warmup=1, min_seconds=0.05)]


_STDOUT_SWAP = threading.Lock()


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """TorchScript's ONNX exporter warns that it is deprecated, and prints the whole graph when it fails.

    The graph is written by C++ straight to file descriptor 1 (its exporter leaves ONNX logging on), so
    `sys.stdout` alone cannot catch it: the descriptor points at /dev/null for the export. One export
    at a time: two threads interleaving the swap could leave the process's stdout at /dev/null.
    """
    with _STDOUT_SWAP:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as null, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                os.dup2(null.fileno(), 1)
                yield
        finally:
            _flush_c_stdio()  # what C++ buffered goes to /dev/null too, not to the restored descriptor later
            os.dup2(saved, 1)
            os.close(saved)


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to ask (Windows): nothing buffered there to lose
        pass


def _nchwc_block() -> int:
    """Channels per block of ONNX Runtime's blocked (NCHWc) CPU convs: 16 with AVX-512, else 8."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


def _onnx_version() -> str:
    from prunecore.deploy import onnxruntime

    return f"onnxruntime {onnxruntime().__version__}"


register_runtime(Runtime("torch", "PyTorch eager, CPU", _torch_call("cpu"), _torch_models("cpu"),
                         _torch_version("cpu")))  # fmt: skip
register_runtime(Runtime("torch-cuda", "PyTorch eager, CUDA GPU", _torch_call("cuda"), _torch_models("cuda"),
                         _torch_version("cuda"), device="cuda"))  # fmt: skip
# ONNX Runtime's CPU convs pad channels to a block and need input widths divisible by 4 for it
register_runtime(Runtime("onnxruntime", "ONNX Runtime, CPU execution provider", _onnx_call, _onnx_models,
                         _onnx_version, block=_nchwc_block(), align=4))  # fmt: skip


# -- the model ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LayerTable:
    """One layer call's measured milliseconds over a grid of kept (out, in) weight widths.

    `dims` are the layer's (out, in) weight dims in the cost model (-1: the width never changes,
    `out[0]` / `in_[0]` is then its size). `positions` is where the whole weight is applied per
    forward pass (over the batch), which is also its output elements per output channel, and
    `kernel` the product of the other weight dims: its MACs and output size at any kept widths.
    Widths are read padded up to a multiple of `block`; a width that is not a multiple of `align`
    costs `penalty` times more (out, in), as timed one unit below the dense widths.
    """

    name: str
    dims: tuple[int, int]
    out: np.ndarray  # (O,) kept output widths of the grid, ascending
    in_: np.ndarray  # (I,) kept input widths (per conv group)
    ms: np.ndarray  # (O, I) milliseconds, non-decreasing along both axes
    positions: float
    kernel: float
    block: int = 1
    align: int = 1
    penalty: tuple[float, float] = (1.0, 1.0)
    cross: bool = False  # its out and in widths are set by different groups (they interact here)

    def interaction(self, o: np.ndarray, i: np.ndarray) -> np.ndarray:
        """What pruning out and in together costs beyond pruning each alone (0 unless `cross`)."""
        if not self.cross:
            return np.zeros(len(o))
        od, id_ = np.full(len(o), self.out[-1]), np.full(len(i), self.in_[-1])
        return self.at(o, i) - self.at(o, id_) - self.at(od, i) + self.at(od, id_)

    def widths(self, dim_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Kept (out, in) widths, each `(N,)`, from the cost model's kept dim sizes `(D, N)`."""
        n = dim_sizes.shape[1]
        o = dim_sizes[self.dims[0]] if self.dims[0] >= 0 else np.full(n, float(self.out[0]))
        i = dim_sizes[self.dims[1]] if self.dims[1] >= 0 else np.full(n, float(self.in_[0]))
        return o, i

    def at(self, o: np.ndarray, i: np.ndarray) -> np.ndarray:
        """Milliseconds at kept widths `(N,)`: bilinear between grid points, clamped to the grid's edges."""
        jo, wo = _axis(self.out, np.minimum(np.ceil(o / self.block) * self.block, self.out[-1]))
        ji, wi = _axis(self.in_, np.minimum(np.ceil(i / self.block) * self.block, self.in_[-1]))
        t = self.ms
        low = t[jo[0], ji[0]] * (1 - wi) + t[jo[0], ji[1]] * wi
        high = t[jo[1], ji[0]] * (1 - wi) + t[jo[1], ji[1]] * wi
        slow_o = np.where((self.dims[0] >= 0) & (o % self.align != 0), self.penalty[0], 1.0)
        slow_i = np.where((self.dims[1] >= 0) & (i % self.align != 0), self.penalty[1], 1.0)
        return (low * (1 - wo) + high * wo) * slow_o * slow_i


def _axis(grid: np.ndarray, q: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Neighbouring grid indices of each query and the weight of the upper one (0 outside the grid)."""
    if len(grid) == 1:
        zero = np.zeros(len(q), dtype=np.int64)
        return (zero, zero), np.zeros(len(q))
    j = np.clip(np.searchsorted(grid, q, side="right") - 1, 0, len(grid) - 2)
    w = np.clip((q - grid[j]) / (grid[j + 1] - grid[j]), 0.0, 1.0)
    return (j, j + 1), w


@dataclass(frozen=True, eq=False)
class GroupEffect:
    """One group pruned alone, timed in the whole model: milliseconds against dense at some kept counts.

    `kept` ascends to the group's size, where `change` is 0; linear in between and, below the lowest
    timed count, along the first segment's slope (holding the value there would make the narrowest
    widths look no faster than it while the tables' interactions still grow: not monotone).
    """

    group: int  # index in the cost model's groups
    kept: np.ndarray  # (K,) kept units, ascending, the last the group's size
    change: np.ndarray  # (K,) measured ms minus dense ms, non-decreasing in kept

    def at(self, k: np.ndarray) -> np.ndarray:
        inside = np.interp(k, self.kept, self.change)
        if len(self.kept) < 2:
            return inside
        slope = (self.change[1] - self.change[0]) / (self.kept[1] - self.kept[0])
        return np.where(k < self.kept[0], self.change[0] + slope * (k - self.kept[0]), inside)


FEATURES = ("fixed", "tables", "outputs", "other MACs", "misaligned inputs", "in-context changes", "interactions")
"""What the calibration weighs: 1, Σ tables (ms), Σ layer outputs (millions), other MACs (billions), and the
inputs (millions of elements) of layers whose input width breaks the runtime's alignment: a runtime that
keeps activations in a blocked layout converts them in and out around such a layer. In context, instead:
1, the sum of every group's change timed alone in the whole model (ms), and the tables' interactions (ms)
between groups that meet in one layer."""


@dataclass(frozen=True, eq=False)
class LatencyModel:
    """Milliseconds of one forward pass (at `batch`, on `runtime`) as a function of kept units per group.

    `coef` weighs `FEATURES`; `calibration` lists the whole-model timings it was fitted to, as
    (what, measured ms, predicted ms), the dense model first. `evaluate` takes kept vectors in the
    cost model's group order, like `CostModel.evaluate`.
    """

    runtime: str
    batch: int
    machine: str
    cost: CostModel
    layers: tuple[LayerTable, ...]
    coef: np.ndarray  # (F,) weights of FEATURES
    calibration: tuple[tuple[str, float, float], ...]
    threads: int = 1  # torch's thread count when it was timed (the runtimes use as many)
    effects: tuple[GroupEffect, ...] = ()  # in context: each group timed alone in the whole model

    @property
    def in_context(self) -> bool:
        """Whether groups' own effects were timed in the whole model (else only layers alone)."""
        return bool(self.effects)

    @property
    def groups(self) -> tuple[str, ...]:
        return self.cost.groups

    @property
    def align(self) -> int:
        """The width multiple this runtime runs on its fast path (1: any width is as fast); a latency budget
        keeps widths to it (ONNX Runtime: 4)."""
        return max((t.align for t in self.layers if t.dims[1] >= 0), default=1)

    @property
    def dense_ms(self) -> float:
        """The dense model's predicted latency (what budgets are fractions of)."""
        return float(self.evaluate(self.cost.sizes)[0])

    @property
    def measured_dense_ms(self) -> float:
        """The dense model's latency as the calibration timed it."""
        return self.calibration[0][1]

    @property
    def error(self) -> float:
        """Median |predicted - measured| / measured over the calibration timings (in-sample: what the fit
        reached on the timings it was fitted to; `measure` checks other plans)."""
        return float(np.median([abs(p - m) / m for _, m, p in self.calibration]))

    def features(self, kept: np.ndarray) -> np.ndarray:
        """`(N, F)` values of `FEATURES` for kept vectors `(G,)` or `(G, N)`."""
        dims = self.cost.dim_sizes(kept)  # (D, N)
        n = dims.shape[1]
        tables, outputs, macs, misaligned, cross = (np.zeros(n) for _ in range(5))
        for layer in self.layers:
            o, i = layer.widths(dims)
            tables += layer.at(o, i)
            if self.effects:
                cross += layer.interaction(o, i)
            outputs += layer.positions * o
            if layer.dims[1] >= 0 and layer.align > 1:
                misaligned += np.where(i % layer.align != 0, layer.positions * i, 0.0)
            macs += layer.positions * layer.kernel * o * i
        _, flops = self.cost.evaluate(np.asarray(kept))
        other = np.maximum(flops * self.batch - macs, 0.0)
        k = np.asarray(kept).reshape(len(self.cost.sizes), -1)  # (G, N)
        changes = sum((e.at(k[e.group]) for e in self.effects), np.zeros(n))
        return np.stack([np.ones(n), tables, outputs / 1e6, other / 1e9, misaligned / 1e6, changes, cross], axis=1)

    def evaluate(self, kept: np.ndarray) -> np.ndarray:
        """Predicted milliseconds `(N,)` for kept vectors `(G,)` or `(G, N)`."""
        return self.features(kept) @ self.coef

    def price(self, kept: Mapping[str, int]) -> float:
        """Milliseconds of the model whose named groups keep `kept[name]` units (others dense)."""
        return float(self.evaluate(self.cost.kept_vector(kept))[0])

    def measure(self, model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
                graph: ChannelGraph, plans: Sequence[Plan | None]) -> list[float]:  # fmt: skip
        """`measure_plans_ms` on this model's runtime and batch: what checks its predictions.

        Refused when torch's thread count changed since the tables were timed.
        """
        if torch.get_num_threads() != self.threads:
            raise LatencyError(f"this latency model was timed with {self.threads} thread(s), torch now runs "
                               f"{torch.get_num_threads()}: set torch.set_num_threads back, or build it again")
        return measure_plans_ms(model, example_inputs, graph, plans, self.runtime, self.batch)

    def predict(self, plan: Plan) -> float:
        """Milliseconds of the model `plan` makes."""
        unknown = sorted(set(plan.groups) - set(self.groups))
        pruned = [n for n in unknown if len(plan.groups[n].keep) < plan.groups[n].size]
        if pruned:
            raise LatencyError(f"the plan prunes group(s) {', '.join(pruned[:5])}, which this latency model "
                               "does not know: it was built for another model")  # fmt: skip
        return self.price({n: len(g.keep) for n, g in plan.groups.items() if n in self.groups})


def latency_model(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    graph: ChannelGraph,
    runtime: str = "torch",
    batch: int | None = None,
    store: RunStore | str | Path | None = None,
    round_to: int = 1,
    random_plans: int = 3,
    seed: int = 0,
    progress: bool = True,
    in_context: bool | None = False,
) -> LatencyModel:
    """Measure (or read from the store) the layer tables of `model` and calibrate them on whole models.

    `batch` replaces the examples' batch size (default: theirs). `store` is the run store that keeps
    tables and calibrations (default: `RunStore()`; a read-only store is read, never written).
    Calibration times the dense model, uniform plans at `CALIBRATION` sparsities and `random_plans`
    plans with random per-group sparsities (below 0.8), kept counts rounded to `round_to`.

    `in_context`: also time every group pruned alone (at `GROUP_LEVELS`) in the whole model, and
    predict from those changes plus the tables' interactions between groups; None does so when the
    tables estimate it takes under `IN_CONTEXT_SECONDS`. Meant for small models at small batches,
    whose layers timed alone are mostly call overhead, so that which group saves how much is
    judged in place. Off by default: in `bench/bench_latency.py` it predicted whole plans no better
    than the tables (worse on resnet50 at batch 1: 20.5 % median error against 7.2 %), and did not
    make latency-guided allocation competitive. The model is not changed (nor moved). Timing runs on
    the runtime's device: the CPU with torch's thread count, or the GPU (`torch-cuda`), where the
    layers and copies of the model are placed and every timed call waits for the device.
    """
    rt = get_runtime(runtime)
    rt.check()
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ArgumentError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ArgumentError(f"round_to must be a positive integer, got {round_to!r}")
    inputs = _batched(example_inputs, batch)
    opened = None if isinstance(store, RunStore) else RunStore(store)
    try:
        return _build(model, inputs, graph, rt, store if opened is None else opened, round_to, random_plans, seed,
                      progress, in_context)
    finally:
        if opened is not None:
            opened.close()


def _build(model: nn.Module, inputs: tuple[torch.Tensor, ...], graph: ChannelGraph, rt: Runtime, store: RunStore,
           round_to: int, random_plans: int, seed: int, progress: bool, in_context: bool | None) -> LatencyModel:
    # fmt: skip
    """`latency_model` once its arguments are checked and the store is open."""
    batch = int(inputs[0].shape[0]) if inputs[0].dim() else 1
    machine = _machine(rt)
    cm = cost_model(model, inputs, graph)
    calls = _layer_calls(model, inputs)
    owners = _owners(model)
    varying = set(cm.pair_dim.tolist())
    owners_of: dict[int, set[int]] = {}
    for d, g in zip(cm.pair_dim.tolist(), cm.pair_group.tolist()):
        owners_of.setdefault(d, set()).add(g)
    layers = []
    todo = []
    for name, module, x_shape, out_shape in calls:
        owner = owners.get(id(module.weight), (name, "weight"))
        dims = cm.weight_dims(*owner, module.weight.dim())
        if dims is None:
            continue
        shape = tuple(module.weight.shape)
        axes = [_grid(shape[k], rt.block) if dims[k] in varying else np.array([shape[k]]) for k in (0, 1)]
        used = tuple(d if d in varying else -1 for d in dims[:2])
        channel = len(out_shape) - max(len(shape) - 2, 0) - 1  # conv: ([B,] C, *spatial); Linear: (*, C)
        positions = math.prod(out_shape) / out_shape[channel]
        key = _key("table", machine, rt.version(), repr(module), x_shape, axes[0].tolist(), axes[1].tolist(),
                   rt.block, rt.align)  # fmt: skip
        entry = store.get_latency(key) or {}
        table = np.array(entry.get("ms", []), dtype=np.float64)
        penalty = tuple(entry.get("penalty", (1.0, 1.0)))
        if table.shape != (len(axes[0]), len(axes[1])) or len(penalty) != 2:
            todo.append((len(layers), module, x_shape, axes, key))
            table, penalty = np.zeros((len(axes[0]), len(axes[1]))), (1.0, 1.0)
        cross = min(used) >= 0 and owners_of[used[0]].isdisjoint(owners_of[used[1]])
        layers.append(LayerTable(name, used, axes[0].astype(np.float64), axes[1].astype(np.float64), table,
                                 positions, float(math.prod(shape[2:])), rt.block, rt.align,
                                 (float(penalty[0]), float(penalty[1])), cross))  # fmt: skip
    layers = _measure_tables(layers, todo, rt, store, progress)
    plans = _calibration_plans(cm, round_to, random_plans, seed)
    if in_context is None:
        dense_s = sum(float(t.ms[-1, -1]) for t in layers) / 1e3  # the tables' estimate of one dense pass
        in_context = len(GROUP_LEVELS) * len(cm.groups) * max(0.3, 7 * dense_s) <= IN_CONTEXT_SECONDS
    alone = _group_plans(cm, round_to) if in_context else []
    points = _time_plans(model, inputs, graph, cm, rt, store, machine, plans + alone, progress)
    effects = _effects(cm, points[len(plans):], points[0][2])
    return _fit(rt.name, batch, machine, cm, tuple(layers), points[: len(plans)], effects, points[len(plans):])


def measure_plans_ms(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    graph: ChannelGraph,
    plans: Sequence[Plan | None],
    runtime: str = "torch",
    batch: int | None = None,
) -> list[float]:
    """Milliseconds of the models `plans` make (None: the dense model), timed whole in alternating rounds."""
    rt = get_runtime(runtime)
    rt.check()
    inputs = _batched(example_inputs, batch)
    models = [model if p is None else apply_plan(model, p, graph=graph) for p in plans]
    return [s * 1e3 for s in rt.time_models(models, inputs)]


# -- building ------------------------------------------------------------------------------------------------
def _batched(example_inputs: torch.Tensor | Sequence[torch.Tensor], batch: int | None) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs:
        raise ArgumentError("latency needs at least one example input")
    if batch is None:
        return inputs
    return tuple(x if x.dim() == 0 else x[:1].expand(batch, *x.shape[1:]).contiguous() for x in inputs)


def _grid(size: int, block: int) -> np.ndarray:
    """Widths at `FRACTIONS` of `size`, rounded up to multiples of `block` (never above `size`)."""
    return np.array(sorted({min(size, math.ceil(max(1, round(size * f)) / block) * block) for f in FRACTIONS}),
                    dtype=np.int64)  # fmt: skip


def _owners(model: nn.Module) -> dict[int, tuple[str, str]]:
    """(module, tensor) under which the cost model knows each parameter: its first name (tied weights)."""
    owners: dict[int, tuple[str, str]] = {}
    for name, module in model.named_modules():
        for p, t in module.named_parameters(recurse=False):
            owners.setdefault(id(t), (name, p))
    return owners


def _layer_calls(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[tuple[str, nn.Module, tuple, tuple]]:
    """(name, module, input shape, output shape) of every call of a module with a stand-alone layer builder."""
    calls: list[tuple[str, nn.Module, tuple, tuple]] = []
    copy = working_copy(model)
    originals = dict(model.named_modules())

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, out: Any) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                calls.append((name, originals[name], tuple(args[0].shape), tuple(out.shape)))

        return record

    for name, m in copy.named_modules():
        if ops.layer(m) is not None and isinstance(getattr(m, "weight", None), torch.Tensor):
            m.register_forward_hook(hook(name))
    with torch.no_grad(), eval_mode(copy), running_model(copy, inputs, "finding the layers to time"):
        copy(*inputs)
    return calls


def _measure_tables(layers: list[LayerTable], todo: list, rt: Runtime, store: RunStore, progress: bool
                    ) -> list[LayerTable]:  # fmt: skip
    """Time the grid of each table not found in the store, keep it there, and make it monotone."""
    same: dict[str, list[int]] = {}  # key -> indices of the layers it times (repeated blocks share a table)
    unique = []
    for index, module, x_shape, axes, key in todo:
        if key not in same:
            unique.append((module, x_shape, axes, key))
        same.setdefault(key, []).append(index)
    extra = 2 if rt.align > 1 else 0  # the two points one unit off the alignment
    total = sum(len(axes[0]) * len(axes[1]) + extra for _, _, axes, _ in unique)
    bar = tqdm(total=total, desc=f"latency tables ({rt.name})", unit="point", disable=not progress or not total)
    for module, x_shape, axes, key in unique:
        builder = ops.layer(module)
        o_max, i_max = int(axes[0][-1]), int(axes[1][-1])
        points = list(itertools.product(axes[0].tolist(), axes[1].tolist()))
        if extra:
            points += [(max(o_max - 1, 1), i_max), (o_max, max(i_max - 1, 1))]
        runs = []
        for o, i in points:
            layer, shape = builder(module, x_shape, (o, i, *module.weight.shape[2:]))
            runs.append(rt.layer_call(layer.eval(), torch.randn(shape, dtype=module.weight.dtype)))
        ms = np.array(_time_calls(runs, on_each=lambda: bar.update(1))) * 1e3
        table = ms[: len(ms) - extra].reshape(len(axes[0]), len(axes[1]))
        # each ratio only where that width can change and its last unit breaks the alignment
        penalty = tuple(max(1.0, float(ms[-2 + k] / table[-1, -1])) if len(axes[k]) > 1 and extra else 1.0
                        for k in (0, 1))  # fmt: skip
        if not store.read_only:
            store.put_latency(key, {"format": FORMAT, "ms": table.tolist(), "penalty": list(penalty)})
        for index in same[key]:
            layers[index] = dataclasses.replace(_replace_table(layers[index], table), penalty=penalty)
    bar.close()
    return [_replace_table(layer, layer.ms) for layer in layers]


def _replace_table(layer: LayerTable, table: np.ndarray) -> LayerTable:
    """`layer` with `table` made non-decreasing along both axes: a narrower layer is never slower."""
    monotone = np.maximum.accumulate(np.maximum.accumulate(np.asarray(table, dtype=np.float64), axis=0), axis=1)
    return dataclasses.replace(layer, ms=monotone)


def _time_calls(calls: Sequence[Callable[[], Any]], rounds: int = 5, min_seconds: float = 0.01,
                on_each: Callable[[], Any] | None = None) -> list[float]:  # fmt: skip
    """Median seconds of each call over `rounds` alternating rounds of enough repetitions to last `min_seconds`."""
    reps = []
    for call in calls:
        call()  # warm-up: first-call allocations and kernel selection
        start = time.perf_counter()
        call()
        reps.append(max(1, min(1000, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-9)))))
    times: list[list[float]] = [[] for _ in calls]
    for r in range(rounds):
        for k in range(len(calls)) if r % 2 == 0 else reversed(range(len(calls))):
            start = time.perf_counter()
            for _ in range(reps[k]):
                calls[k]()
            times[k].append((time.perf_counter() - start) / reps[k])
    if on_each is not None:
        for _ in calls:
            on_each()
    return [statistics.median(t) for t in times]


def _time_plans(model: nn.Module, inputs: tuple[torch.Tensor, ...], graph: ChannelGraph, cm: CostModel,
                rt: Runtime, store: RunStore, machine: str, plans: list[tuple[str, np.ndarray]],
                progress: bool) -> list[tuple[str, np.ndarray, float]]:  # fmt: skip
    """(what, kept vector, measured ms) of each plan, applied and timed whole (stored, or timed now).

    Plans are timed `CHUNK` at a time beside the dense model, in alternating rounds, and each chunk's
    times are scaled by the first chunk's dense time over its own: only a few pruned copies are held
    at once, and a slow spell between chunks does not pass for an effect of pruning.
    """
    shapes = [tuple(x.shape) for x in inputs]
    key = _key("calibration", machine, rt.version(), fingerprint_model(model), shapes,
               [(w, k.tolist()) for w, k in plans])  # fmt: skip
    entry = store.get_latency(key)
    if entry is not None and len(entry.get("ms", [])) == len(plans):
        return [(w, k, float(ms)) for (w, k), ms in zip(plans, entry["ms"])]
    bar = tqdm(total=len(plans), desc=f"timing whole models ({rt.name})", unit="model", disable=not progress)
    ms: list[float] = []
    reference = None
    for start in range(0, len(plans), CHUNK):
        models = [model]
        for _, kept in plans[start : start + CHUNK]:
            sparsity = {g: 1.0 - int(k) / int(n) for g, k, n in zip(cm.groups, kept, cm.sizes) if k < n}
            models.append(model if not sparsity else apply_plan(model, make_plan(model, graph, sparsity), graph=graph))
        dense, *seconds = rt.time_models(models, inputs)
        reference = dense if reference is None else reference
        ms += [t * reference / dense * 1e3 for t in seconds]
        bar.update(len(seconds))
    bar.close()
    if not store.read_only:
        store.put_latency(key, {"format": FORMAT, "ms": ms})
    return [(w, k, t) for (w, k), t in zip(plans, ms)]


def _group_plans(cm: CostModel, round_to: int) -> list[tuple[str, np.ndarray]]:
    """Kept vectors of each group pruned alone at `GROUP_LEVELS` (levels that prune nothing left out)."""
    out = []
    for g, (name, size) in enumerate(zip(cm.groups, cm.sizes.tolist())):
        for k in sorted({kept_units(size, s, round_to) for s in GROUP_LEVELS} - {size}):
            kept = cm.sizes.copy()
            kept[g] = k
            out.append((f"{name} at {k}", kept))
    return out


def _effects(cm: CostModel, points: list[tuple[str, np.ndarray, float]], dense_ms: float) -> tuple[GroupEffect, ...]:
    """Each group's timed changes against dense, made non-decreasing in kept units (noise never has a
    narrower group run slower)."""
    by_group: dict[int, list[tuple[int, float]]] = {}
    for _, kept, ms in points:
        g = int(np.flatnonzero(kept != cm.sizes)[0])
        by_group.setdefault(g, []).append((int(kept[g]), ms - dense_ms))
    effects = []
    for g, timed in sorted(by_group.items()):
        timed = sorted(timed) + [(int(cm.sizes[g]), 0.0)]
        kept = np.array([k for k, _ in timed], dtype=np.float64)
        change = np.minimum.accumulate(np.array([c for _, c in timed])[::-1])[::-1]  # non-decreasing in kept
        effects.append(GroupEffect(g, kept, np.minimum(change, 0.0)))
    return tuple(effects)


def _calibration_plans(cm: CostModel, round_to: int, random_plans: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """Kept vectors of the dense model, uniform plans and seeded random plans."""
    sizes = cm.sizes.tolist()
    out = [("dense", cm.sizes.copy())]
    if not sizes:
        return out
    for s in CALIBRATION:
        out.append((f"uniform {s:g}", np.array([kept_units(n, s, round_to) for n in sizes], dtype=np.int64)))
    rng = np.random.default_rng([seed, 0x1A7E])  # salted: test plans drawn with default_rng(seed) are others
    for r in range(random_plans):
        drawn = rng.uniform(0.0, 0.8, len(sizes))
        out.append((f"random {r + 1}", np.array([kept_units(n, float(s), round_to) for n, s in zip(sizes, drawn)],
                                                dtype=np.int64)))  # fmt: skip
    return out


def _fit(runtime: str, batch: int, machine: str, cm: CostModel, layers: tuple[LayerTable, ...],
         points: list[tuple[str, np.ndarray, float]], effects: tuple[GroupEffect, ...] = (),
         alone: list[tuple[str, np.ndarray, float]] = ()) -> LatencyModel:  # fmt: skip
    """Least squares on relative error over the timings, every weight but the constant's non-negative:
    the subset of features whose unconstrained fit obeys that and fits best (at most 2^4 solves).

    Layers alone weigh tables, outputs, other MACs and misaligned inputs; in context (`effects`), the
    groups' timed changes and the tables' interactions, fitted to the groups' timings too.
    """
    threads = torch.get_num_threads()
    model = LatencyModel(runtime, batch, machine, cm, layers, np.zeros(len(FEATURES)), (), threads, effects)
    every = list(points) + list(alone)
    x = model.features(np.stack([k for _, k, _ in every], axis=1))  # (P, F)
    y = np.array([ms for _, _, ms in every])  # (P,)
    candidates = (5, 6) if effects else (1, 2, 3, 4)
    usable = [f for f in candidates if np.ptp(x[:, f]) > 0]
    best: tuple[float, np.ndarray] | None = None
    for r in range(len(usable) + 1):
        for chosen in itertools.combinations(usable, r):
            subset = (0, *chosen)  # the constant may be negative: tables include each call's own overhead
            a = x[:, subset] / y[:, None]  # relative error: every timing counts alike
            coef, *_ = np.linalg.lstsq(a, np.ones(len(y)), rcond=None)
            if (coef[1:] < 0).any():
                continue
            full = np.zeros(len(FEATURES))
            full[list(subset)] = coef
            residual = float(np.sum((x @ full / y - 1.0) ** 2))
            if best is None or residual < best[0] - 1e-12:
                best = (residual, full)
    assert best is not None  # the constant alone always fits
    coef = best[1]
    calibration = tuple((w, ms, float(p)) for (w, _, ms), p in zip(points, x[: len(points)] @ coef))
    return LatencyModel(runtime, batch, machine, cm, layers, coef, calibration, threads, effects)


def _machine(rt: Runtime) -> str:
    """What a timing depends on besides the layer: the CPU, its cores, the thread count and the runtime."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if rt.device != "cpu":  # the GPU does the work; the host's CPU and threads still launch it
        cpu = f"{torch.cuda.get_device_name(torch.device(rt.device))} on {cpu}"
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, {rt.name}"


def _key(kind: str, *parts: Any) -> str:
    """A store key: the kind, then a digest of everything the measurement depends on."""
    text = json.dumps([FORMAT, *parts], default=str)
    return f"{kind}/{hashlib.sha256(text.encode()).hexdigest()[:32]}"

