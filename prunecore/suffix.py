"""The suffix engine: a group's sweep points run only the part of the model that pruning the group changes.

One private working copy of the model, as a torch.fx graph, serves every point. For each batch,
one dense pass advances through the graph; at the first node a group touches (its *start*),
each of the group's levels swaps its pruned (smaller) tensors into the copy, runs the rest of the
graph from the dense activations there (the *suffix*), and swaps the originals back. No per-point
copy or re-trace, and each point computes no more than the pruned model would. Where the group's
first layer only loses output channels, points start after it (and the channel-wise ops that
follow it) from a slice of its dense output (`_sliced_chain`). BatchNorm re-estimation reuses the
split: layers before the start keep the dense model's re-estimated statistics (their inputs do
not change), layers after it carry one set of statistics per point.

`sensitivity.sweep` drives it, in one process or in each worker of `prunecore.workers`.
"""

from __future__ import annotations

import copy
import operator
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from prunecore import ops
from prunecore._concurrency import forward_pass, fx_tracing
from prunecore.devices import autocast, channels_last_batch, model_device, resolve_device, to_device
from prunecore.errors import ArgumentError
from prunecore.evaluate import _tracked_bn, as_rows, get_metric, output_logits, recalibrate_bn_, split_batch
from prunecore.graph import ChannelGraph, TraceError, failing_frame
from prunecore.plan import GroupPlan, Plan
from prunecore.surgery import kept_positions, sliced_tensors, swap_tensors_, with_ancestors

__all__ = ["WHOLE", "Point", "SuffixEngine", "Variants", "symbolic_trace"]

WHOLE = -1
"""A start "node" meaning: run the working copy's own forward instead of a suffix of the graph."""

Tick = Callable[[int], None]
"""Called with a number of batches just processed (progress)."""


@dataclass
class Point:
    """One (group, sparsity) measurement: which units stay, and the metric sums so far."""

    group: str
    sparsity: float
    keep: GroupPlan
    sums: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    row: dict[str, Any] = field(default_factory=dict)  # extra columns (params, flops) set by the driver

    def plan(self, graph: ChannelGraph) -> Plan:
        return Plan({self.group: self.keep}, graph.inputs, graph.model_type)

    def finished_row(self) -> dict[str, Any]:
        values = {name: get_metric(name).value(total, self.samples) for name, total in self.sums.items()}
        return {"group": self.group, "sparsity": self.sparsity, "kept": len(self.keep.keep),
                "size": self.keep.size, **values, **self.row}  # fmt: skip


# -- fx graph of the working copy -------------------------------------------------------------------
class _Tracer(fx.Tracer):
    """fx's tracer, blind to other threads.

    While it traces, fx patches `nn.Module.__call__` and `__getattr__` for the whole process; a
    module called by another thread would be recorded into this graph (or fail with "module is
    not installed as a submodule"). Calls from other threads run their module as usual instead.
    """

    def __init__(self, leaf_modules: tuple[type, ...]):
        super().__init__()
        self.extra_leaves = leaf_modules
        self.thread = threading.get_ident()

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)  # the original Module.__call__: hooks and all
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # modules that `trace` follows whole (norms, Swin attention) stay single calls here too; so does every
        # BatchNorm (timm's BatchNormAct2d too): traced through, its `self.training` test would be frozen at
        # eval, and BatchNorm re-estimation, which runs it in train mode, would never update its statistics
        leaf = isinstance(m, self.extra_leaves + ops.whole_types() + (nn.modules.batchnorm._BatchNorm,))
        return leaf or super().is_leaf_module(m, qualname)


def symbolic_trace(model: nn.Module, leaf_modules: tuple[type, ...] = ()) -> fx.GraphModule:
    """torch.fx graph of `model` sharing its modules, for the suffix engine; `TraceError` when fx cannot.

    Only sweeps use fx (to resume a forward from any op); `trace` itself runs the model eagerly.
    """
    tracer = _Tracer(leaf_modules)
    try:
        with fx_tracing():  # fx patches nn.Module.__call__ process-wide while it traces
            graph = tracer.trace(model)
    except Exception as exc:
        where = failing_frame(exc)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}{where}: {type(exc).__name__}: {exc}. "
            "Data-dependent control flow and some Python constructs cannot be traced; pass the "
            "offending submodule types as `leaf_modules=(...)` so prunecore treats them as opaque "
            "(their channels are then kept), or rewrite that code path."
        ) from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv}  # fmt: skip


@dataclass(frozen=True)
class _InPlace:
    """How `SuffixEngine` may run a node in place: on a value no one else holds, the values do not change.

    `kind` is "module" (an activation module with an `inplace` flag), "kwarg" (a function with an
    `inplace` argument), or "call" (`target` is the in-place form: `operator.iadd` for `+`,
    `Tensor.relu_` for `relu`). `binary` ops take a second operand, which must leave the first one's
    shape and dtype as they are.
    """

    kind: str
    target: Any = None
    binary: bool = False


_IN_PLACE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish,
                     nn.ELU, nn.CELU, nn.SELU)  # fmt: skip
_INPLACE_ARG = {F.relu: 1, F.relu6: 1, F.silu: 1, F.hardswish: 1, F.hardsigmoid: 1, F.mish: 1, F.selu: 1, F.elu: 2,
                F.leaky_relu: 2, F.celu: 2, F.hardtanh: 3}  # fmt: skip  # function -> position of `inplace`
_IN_PLACE_FUNCTIONS = {operator.add: operator.iadd, operator.sub: operator.isub, operator.mul: operator.imul,
                       operator.truediv: operator.itruediv, torch.add: torch.Tensor.add_,
                       torch.sub: torch.Tensor.sub_, torch.mul: torch.Tensor.mul_, torch.relu: torch.relu_,
                       torch.sigmoid: torch.sigmoid_, torch.tanh: torch.tanh_}  # fmt: skip
_UNARY_FUNCTIONS = {torch.relu, torch.sigmoid, torch.tanh}
_IN_PLACE_METHODS = {"relu": False, "sigmoid": False, "tanh": False, "add": True, "sub": True, "mul": True,
                     "div": True}  # fmt: skip  # method -> binary


def _out_of_place_(gm: fx.GraphModule) -> dict[fx.Node, _InPlace]:
    """In-place ops would overwrite activations that other points reuse: make them out of place.

    Returns the elementwise nodes that a pass may still run in place on values it made itself
    (`SuffixEngine._overwritable`): an out-of-place ReLU or add allocates and fills a fresh tensor,
    which costs about twice the in-place op on a CPU, and in place the values are the same.
    """
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _OUT_OF_PLACE:
            node.target = _OUT_OF_PLACE[node.target]
        elif node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
            node.target = node.target[:-1]
        if node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
    for module in gm.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    gm.recompile()
    modules = dict(gm.named_modules())
    in_place: dict[fx.Node, _InPlace] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(modules[node.target]) in _IN_PLACE_MODULES:
            in_place[node] = _InPlace("module")
        elif node.op == "call_function" and node.target in _INPLACE_ARG:
            if len(node.args) <= _INPLACE_ARG[node.target]:  # `inplace` is not passed by position
                in_place[node] = _InPlace("kwarg")
        elif node.op == "call_function" and node.target in _IN_PLACE_FUNCTIONS:
            in_place[node] = _InPlace("call", _IN_PLACE_FUNCTIONS[node.target], node.target not in _UNARY_FUNCTIONS)
        elif node.op == "call_method" and node.target in _IN_PLACE_METHODS:
            target = getattr(torch.Tensor, node.target + "_")
            in_place[node] = _InPlace("call", target, _IN_PLACE_METHODS[node.target])
    return in_place


def _fetch(root: nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# -- the engine -------------------------------------------------------------------------------------
class SuffixEngine:
    """A private copy of the model that measures one group's points at a time (`measure`).

    Where fx cannot trace the model (shape-dependent control flow), every point runs the copy's own
    forward instead (`WHOLE`): slower, never different. `device` is where the copy runs (default:
    the model's own); `autocast` ("bf16"/"fp16") runs every pass in mixed precision, `channels_last` on
    channels-last images and weights (sliced weights and activations too, so each point runs the
    kernels that the pruned model, run that way, would). `copy_model=False` lets a worker process that owns
    its model use it in place.
    """

    def __init__(
        self,
        model: nn.Module,
        graph: ChannelGraph,
        metrics: Sequence[str],
        data: Iterable[Any],
        *,
        calibration: Iterable[Any] | None = None,
        bn_batches: int = 0,
        leaf_modules: Sequence[type] = (),
        device: str | torch.device | None = None,
        autocast: str | None = None,
        channels_last: bool = False,
        copy_model: bool = True,
    ) -> None:
        self.device = resolve_device(device) if device is not None else model_device(model)
        self.model = (copy.deepcopy(model) if copy_model else model).to(self.device).eval()
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        try:
            self.gm: fx.GraphModule | None = symbolic_trace(self.model, tuple(leaf_modules))
        except TraceError:
            self.gm = None  # fx cannot follow this model: every point runs the copy's own forward
        self.in_place = _out_of_place_(self.gm) if self.gm is not None else {}
        self.nodes = list(self.gm.graph.nodes) if self.gm is not None else []
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((self.index[u] for u in n.users), default=len(self.nodes)) for n in self.nodes}
        self.modules = dict(self.gm.named_modules()) if self.gm is not None else {}
        self.graph, self.metrics = graph, [get_metric(m) for m in metrics]
        # once: BatchNorm statistics change in place (copy_), other tensors only by `Variants.applied` swaps
        self.state_storages = self._state_storages() if self.in_place else set()
        self.data, self.calibration = data, data if calibration is None else calibration
        self.autocast = autocast
        self.bns = _tracked_bn(self.model)
        tracked = {id(m) for m in self.bns}
        # calibration passes stop after the last BatchNorm: nothing later changes a statistic
        at_bn = [i for i, n in enumerate(self.nodes)
                 if n.op == "call_module" and any(id(m) in tracked for m in self.modules[n.target].modules())]
        self.bn_end = 1 + max(at_bn, default=-1)  # a module called whole may hold BatchNorms of its own
        self.bn_batches = bn_batches if self.bns else 0
        self.reference: list[torch.Tensor] = []
        self.batch_keys: list[float] = []  # a checksum per batch: the data must come in the same order
        self.dense_bn: dict[nn.Module, tuple[torch.Tensor, ...]] | None = None  # set by `prepare`
        self.floor_seconds = 0.0  # time spent in per-point suffix passes (`suffix_seconds` of a sweep)

    @property
    def work_per_group(self) -> int | None:
        """Batches one group's `measure` processes (for progress totals); None when the data has no length."""
        return batches_per_group(self.model, self.data, self.bn_batches)

    # running the graph ------------------------------------------------------------------------
    def start_of(self, group: str) -> int:
        """The node index a group's suffix starts at, or `WHOLE` when its points run the whole forward."""
        return WHOLE if self._changes_constants(group) else self._first_node(group)

    def inputs_env(self, inputs: torch.Tensor) -> dict[fx.Node | None, Any]:
        """The activations before the first node: the batch's inputs, on the engine's device.

        Further forward arguments with defaults (timm's `attn_mask=None`) take their defaults, as
        they do when `evaluate` calls the model with the inputs alone.
        """
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        inputs = to_device(inputs, self.device)
        inputs = channels_last_batch(inputs) if self.channels_last else inputs
        env: dict[fx.Node | None, Any] = {placeholders[0] if placeholders else None: inputs}
        env.update({p: p.args[0] for p in placeholders[1:] if p.args})
        return env

    def suffix(self, env: dict[fx.Node | None, Any], start: int, stop: int | None = None,
               swapped: AbstractSet[int] = frozenset()) -> Any:  # fmt: skip
        """The model's output from the activations in `env` (left unchanged), with the tensors now swapped in.

        `stop` ends the pass before that node instead (returning None); a `WHOLE` pass always runs to the end.
        `swapped` is the storages of those tensors (`Variants.applied`), which no op may overwrite.
        """
        began = time.perf_counter()
        with forward_pass(), autocast(self.device, self.autocast):
            if start == WHOLE:
                out = self.model(next(iter(env.values())))  # the inputs; other arguments keep their defaults
            else:
                out = self._advance(dict(env), start, len(self.nodes) if stop is None else stop, swapped)
        self.floor_seconds += time.perf_counter() - began
        return out

    def variants(self, group: str, plans: Sequence[Plan]) -> Variants:
        """Each plan's pruned tensors, ready to swap into the part of the copy a group's suffix runs."""
        target = self.model if self.start_of(group) == WHOLE else self.gm
        return Variants(target, self.graph, plans, self.channels_last)

    def _advance(self, env: dict, start: int, stop: int, swapped: AbstractSet[int] = frozenset()) -> Any:
        """Run nodes [start, stop) in `env`, freeing values after their last use.

        An elementwise op runs in place when its input is a tensor this call made and nothing live
        shares its memory (`_overwritable`); the values `env` came with (other points and groups
        reuse them) and the model's own tensors (`state_storages`, and the `swapped` ones) are never
        written.
        """
        track = bool(self.in_place)
        kept = _storages(env.values()) | self.state_storages | swapped if track else set()
        made: set[int] = set()  # storages first produced by this call: its own to overwrite
        for i in range(start, stop):
            node = self.nodes[i]
            if node.op == "placeholder":
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node.op == "output":
                return args[0]
            how = self.in_place.get(node)
            if how is not None and self._overwritable(node, i, how, args, kwargs, env, made):
                env[node] = self._call_in_place(node, how, args, kwargs)
            else:
                env[node] = self._call(node, args, kwargs)
                if track:
                    made |= _storages([env[node]]) - kept
            for inp in node.all_input_nodes:
                if self.last_use[inp] == i:
                    del env[inp]
        return None

    def _state_storages(self) -> set[int]:
        """The storages of the working copy's parameters, buffers and other tensor attributes."""
        tensors: list[Any] = []
        for module in self.modules.values():
            tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
            tensors += list(module._parameters.values()) + list(module._buffers.values())
        return _storages(tensors)

    def _overwritable(self, node: fx.Node, i: int, how: _InPlace, args: tuple, kwargs: dict, env: dict,
                      made: set[int]) -> bool:  # fmt: skip
        """Whether running `node` in place writes only a value this pass made, used nowhere after `node`."""
        src = node.args[0] if node.args else None
        x = args[0] if args else None
        if not isinstance(src, fx.Node) or self.last_use[src] != i or not isinstance(x, torch.Tensor):
            return False
        if x.requires_grad or x.numel() == 0 or _storage(x) not in made:
            return False
        if sum(a is src for a in _leaves((node.args, node.kwargs))) != 1:
            return False  # `x += x` and the like: the operand would change under the op
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            return False  # an expanded or strided view: not worth the care
        live = (t for key, value in env.items() if key is not src for t in _tensor_leaves(value))
        if any(_storage(t) == _storage(x) for t in live):
            return False  # a live view of the same memory
        if "out" in kwargs:
            return False
        if how.binary:  # in place keeps x's shape and dtype: only where out of place would give them too
            if not x.is_floating_point():
                return False  # int / int is a float out of place
            other = args[1] if len(args) > 1 else None
            if isinstance(other, torch.Tensor):
                return (other.dtype == x.dtype and other.device == x.device and _storage(other) != _storage(x)
                        and torch.broadcast_shapes(x.shape, other.shape) == x.shape)  # fmt: skip
            return isinstance(other, (int, float)) and not isinstance(other, bool)
        return True

    def _call_in_place(self, node: fx.Node, how: _InPlace, args: tuple, kwargs: dict) -> Any:
        if how.kind == "module":
            module = self.modules[node.target]
            module.inplace = True
            try:
                return module(*args, **kwargs)
            finally:
                module.inplace = False
        if how.kind == "kwarg":
            return node.target(*args, **{**kwargs, "inplace": True})
        return how.target(*args, **kwargs)

    def _call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return _fetch(self.gm, node.target)  # get_attr

    # measuring --------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Once, before the first group: dense outputs for label-free metrics, then dense BatchNorm re-estimation."""
        if self.dense_bn is not None:
            return
        with torch.no_grad():
            self._reference_outputs()  # the working copy is still the dense model, statistics and all
            if self.bn_batches:
                recalibrate_bn_(self.model, self.calibration, batches=self.bn_batches)
        self.dense_bn = _bn_state(self.bns)

    def measure(self, points: Sequence[Point], tick: Tick | None = None) -> list[dict[str, Any]]:
        """The finished rows of `points` (of one group or several), in their order, measured on the data.

        Several groups share each batch's dense forward: groups run in the order their suffixes
        start, and one dense pass per batch advances from one group's start to the next, instead
        of one prefix per group. `tick(1)` follows each group's share of each batch.
        """
        self.prepare()
        tick = tick or (lambda n: None)
        by_group: dict[str, list[Point]] = {}
        for p in points:
            by_group.setdefault(p.group, []).append(p)
        runs = sorted((self._group_run(g, pts) for g, pts in by_group.items()), key=lambda r: r.start)
        with torch.no_grad():
            if self.bn_batches:
                self._calibrate(runs, tick)
            self._evaluate(runs, tick)
        return [p.finished_row() for p in points]

    def _group_run(self, group: str, points: list[Point]) -> _GroupRun:
        start = self.start_of(group)
        masks = self.variants(group, [p.plan(self.graph) for p in points])
        chain = self._sliced_chain(group, start)
        picks: list[torch.Tensor] = []
        if chain is not None:  # each point starts after the chain, from the dense chain output's kept channels
            producer = self.nodes[start].target
            width = self.modules[producer].weight.shape[0]
            # a point rounded to the whole group (round_to) prunes nothing: its plan names no positions
            picks = [keep.get((producer, "weight", 0), torch.ones(width, dtype=torch.bool)).nonzero().flatten()
                     .to(self.device) for keep in masks.keeps]  # fmt: skip
            start = chain[0] + 1
        after = [m for m in self.bns if m in self._modules_from(max(start, 0))]
        return _GroupRun(group, points, start, masks, after, chain, picks, nodes=self.nodes,
                         channels_last=self.channels_last)  # fmt: skip

    def _sliced_chain(self, group: str, start: int) -> tuple[int, int] | None:
        """(index of the last node, channel dim) of the chain whose pruned outputs are dense outputs' kept channels.

        When a group's first node is a plain convolution or linear layer that loses only output
        channels, its input is dense, so its pruned output equals its dense output's kept channels
        (bit for bit: each output channel is the same reduction). So do the outputs of the
        channel-wise ops that follow it alone (a BatchNorm, an activation). Points then start after
        that chain from a slice of the dense activation, instead of re-running it. That holds with
        BatchNorm re-estimation too: a chain BatchNorm sees the dense channels, so its batch
        statistics, and the statistics re-estimated from them, are the dense model's kept channels
        (per-channel reductions; the tests and the benchmark compare every point with the naive loop).
        """
        if start == WHOLE or self.nodes[start].op != "call_module":
            return None
        first = self.nodes[start]
        module = self.modules[first.target]
        if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and module.groups == 1:
            dim = 1
        elif type(module) is nn.Linear:
            dim = -1
        else:
            return None
        members = self.graph[group].members
        own = {(m.tensor, m.dim) for m in members if m.module == first.target}
        if ("weight", 0) not in own or own - {("weight", 0), ("bias", 0)}:
            return None  # it loses input channels too: its output is not a slice of the dense one
        touched = {m.module for m in members}
        end = start
        while True:
            users = list(self.nodes[end].users)
            if len(users) != 1:
                break
            j = self.index[users[0]]
            if not self._channelwise(users[0], dim) or any(_touches(self.nodes[i], touched) for i in range(end + 1, j)):
                break
            end = j
        return end, dim

    def _channelwise(self, node: fx.Node, dim: int) -> bool:
        """Whether `node` maps each channel of its one input to the same channel alone (so slicing commutes)."""
        if len(node.all_input_nodes) != 1 or node.args[:1] != (node.all_input_nodes[0],):
            return False
        if node.op == "call_module":
            module = self.modules[node.target]
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                return type(module) in _BATCHNORMS and dim == 1
            return type(module) in _ELEMENTWISE_MODULES
        if node.op == "call_function":
            return node.target in _ELEMENTWISE_FUNCTIONS
        return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS

    def _walk(self, inputs: torch.Tensor, runs: list[_GroupRun]) -> Iterator[tuple[_GroupRun, dict]]:
        """Each run with the dense activations at its start, from one dense pass that advances run by run."""
        env = self.inputs_env(inputs)
        at = 0
        for run in runs:
            if run.start > at:  # a WHOLE run (start -1) sorts first and needs only the inputs
                with forward_pass(), autocast(self.device, self.autocast):
                    self._advance(env, at, run.start)
                at = run.start
            yield run, env

    def _reference_outputs(self) -> None:
        """The dense model's outputs per batch, for the label-free metrics (kl, agreement)."""
        if not any(m.needs_reference for m in self.metrics):
            return
        for batch in self.data:
            inputs = split_batch(batch)[0]
            with forward_pass(), autocast(self.device, self.autocast):
                out = self.model(to_device(inputs, self.device))
            self.reference.append(as_rows(output_logits(out))[0])  # (N, C)
            self.batch_keys.append(float(inputs.double().sum()))

    def _calibrate(self, runs: list[_GroupRun], tick: Tick) -> None:
        """Per point: BatchNorm statistics of the layers after its group's start, re-estimated as on the pruned copy.

        Every BatchNorm runs in train mode (batch statistics), as `recalibrate_bn_` runs them; only
        those after a group's start accumulate, one set of statistics per point (`run.states`).
        """
        dense_bn = self.dense_bn
        momenta = {m: m.momentum for m in dense_bn}
        try:
            for m in dense_bn:
                m.train()
                m.momentum = 0.0  # the dense pass and the layers before a group keep their statistics
            for b, batch in enumerate(self.calibration):
                if b >= self.bn_batches:
                    break
                for run, env in self._walk(split_batch(batch)[0], runs):
                    for m in run.after:
                        m.momentum = None  # a cumulative average over the batches, as recalibrate_bn_
                    for i, p in enumerate(run.points):
                        with run.masks.applied(i) as swapped:  # the point's BatchNorms have the pruned shapes here
                            state = run.states.get(id(p))
                            _load_state(run.after, state if state is not None else _fresh_state(run.after))
                            self.suffix(run.env(env, i), run.start, stop=self.bn_end, swapped=swapped)
                            run.states[id(p)] = _bn_state(run.after)
                    for m in run.after:
                        m.momentum = 0.0
                    _load_state(run.after, dense_bn)  # what the dense pass to the next group's start sees
                    tick(1)
        finally:
            for m, momentum in momenta.items():
                m.momentum = momentum
                m.eval()
            _load_state(list(dense_bn), dense_bn)

    def _evaluate(self, runs: list[_GroupRun], tick: Tick) -> None:
        for b, batch in enumerate(self.data):
            inputs, targets = split_batch(batch)
            reference = None
            if self.reference:
                if b >= len(self.batch_keys) or float(inputs.double().sum()) != self.batch_keys[b]:
                    raise ArgumentError(
                        f"batch {b} differs between passes over the data: a sweep needs data that comes in the "
                        "same order every time (e.g. a DataLoader without shuffle=True)"
                    )
                reference = self.reference[b]
            targets = None if targets is None else targets.to(self.device)
            for run, env in self._walk(inputs, runs):
                for i, p in enumerate(run.points):
                    with run.masks.applied(i) as swapped:
                        if run.states:
                            _load_state(run.after, run.states[id(p)])
                        out = self.suffix(run.env(env, i), run.start, swapped=swapped)
                        out, rows_targets = as_rows(output_logits(out), targets)  # (N, C)
                    if self.autocast is not None:
                        out = out.float()  # half-precision logits: the metrics sum in full precision
                    for metric in self.metrics:
                        total = float(metric.batch_sum(out, reference, rows_targets))
                        p.sums[metric.name] = p.sums.get(metric.name, 0.0) + total
                    p.samples += out.shape[0]
                if run.states:
                    _load_state(run.after, self.dense_bn)  # the dense pass on to the next group needs them
                tick(1)

    def _changes_constants(self, group: str) -> bool:
        """Whether pruning `group` changes a shape constant that the fx graph has baked in.

        `VisionTransformer.hidden_dim` or a window attention's head count are plain ints that
        tracing froze into the graph; such groups run the model's own forward, which re-reads the
        attributes that `swap_tensors_` re-derives.
        """
        if self.gm is None:
            return True
        owners = ops.constants_types()
        touched = with_ancestors({m.module for m in self.graph[group].members})
        return any(isinstance(self.model.get_submodule(name), owners) for name in touched)

    def _first_node(self, group: str) -> int:
        touched = {m.module for m in self.graph[group].members}
        for i, node in enumerate(self.nodes):
            if node.op == "call_module" and node.target in touched:
                return i
            if node.op == "get_attr" and node.target.rpartition(".")[0] in touched:
                return i
        return len(self.nodes) - 1

    def _modules_from(self, start: int) -> set[nn.Module]:
        if self.gm is None:
            return set(self.model.modules())
        # with their submodules: a module called whole (a leaf) may hold BatchNorms of its own
        return {m for n in self.nodes[start:] if n.op == "call_module" for m in self.modules[n.target].modules()}


@dataclass
class _GroupRun:
    """One group's points inside `measure`: where its suffix starts, its variants, the BatchNorms after it."""

    group: str
    points: list[Point]
    start: int
    masks: Variants
    after: list[nn.Module]
    chain: tuple[int, int] | None = None  # (last node, channel dim) of the chain that points slice, if any
    picks: list[torch.Tensor] = field(default_factory=list)  # per point: the kept channels of that chain
    states: dict[int, dict] = field(default_factory=dict)  # id(point) -> its re-estimated BatchNorm statistics
    nodes: list[fx.Node] = field(default_factory=list)
    channels_last: bool = False  # slices go back to channels-last order, as the pruned layer would output them

    def env(self, dense: dict, i: int) -> dict:
        """Point i's activations at `start`: the dense ones, with the chain's output cut to its kept channels."""
        if self.chain is None:
            return dense
        node = self.nodes[self.chain[0]]
        cut = dense[node].index_select(self.chain[1], self.picks[i])
        return {**dense, node: channels_last_batch(cut) if self.channels_last else cut}


class Variants:
    """Each point's pruned tensors, swapped into the working copy for the length of a `with` block.

    The suffix of the graph then runs on physically smaller layers, exactly as in the pruned
    copy; no tensor that a point does not touch is copied. Swaps happen on the GraphModule, whose
    submodules are the working copy's and which holds its own references to loose parameters.
    Sliced tensors are kept up to `CACHE_BYTES` over all points and sliced again on each use past
    that, so the points of several groups of a large model never hold many copies of its layers.
    """

    CACHE_BYTES = 512 * 2**20

    def __init__(self, gm: nn.Module, graph: ChannelGraph, plans: Sequence[Plan], channels_last: bool = False):
        self.gm, self.channels_last = gm, channels_last
        self.keeps = [kept_positions(graph, plan) for plan in plans]
        self.cache: dict[int, dict[tuple[str, str], torch.Tensor]] = {}
        self.cached_bytes = 0

    def tensors(self, i: int) -> dict[tuple[str, str], torch.Tensor]:
        """Point i's sliced tensors (call with the originals in place, as `applied` does)."""
        if i in self.cache:
            return self.cache[i]
        tensors = sliced_tensors(self.gm, self.keeps[i])
        if self.channels_last:  # as `.to(memory_format=torch.channels_last)` leaves the pruned model's weights
            tensors = _channels_last_weights(tensors)
        size = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors.values()}.values())
        if self.cached_bytes + size <= self.CACHE_BYTES:
            self.cache[i] = tensors
            self.cached_bytes += size
        return tensors

    @contextmanager
    def applied(self, i: int) -> Iterator[set[int]]:
        """Point i's tensors in place of the originals; yields their storages (passes must not overwrite them)."""
        tensors = self.tensors(i)
        old = swap_tensors_(self.gm, tensors)
        try:
            yield _storages(tensors.values())
        finally:
            swap_tensors_(self.gm, old)


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
                        nn.Tanh, nn.Mish, nn.ELU, nn.Identity)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
                          torch.sigmoid, torch.tanh, F.mish, F.elu}  # fmt: skip
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh"}


def _channels_last_weights(tensors: dict[tuple[str, str], torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """Sliced tensors with the 4-D ones in channels-last order: Parameters stay Parameters, tied ones stay one."""
    made: dict[int, torch.Tensor] = {}
    out = {}
    for key, t in tensors.items():
        if t.dim() == 4 and id(t) not in made:
            data = t.data.contiguous(memory_format=torch.channels_last)
            made[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
        out[key] = made.get(id(t), t)
    return out


def _leaves(value: Any) -> list[Any]:
    """The leaves of nested tuples, lists and dicts (fx node arguments, or values)."""
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    return [v for v in _leaves(value) if isinstance(v, torch.Tensor)]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storages(values: Iterable[Any]) -> set[int]:
    return {_storage(t) for v in values for t in _tensor_leaves(v) if t.numel()}


def _touches(node: fx.Node, modules: set[str]) -> bool:
    """Whether `node` calls (or reads a tensor of) one of `modules`."""
    if node.op == "call_module":
        return node.target in modules
    return node.op == "get_attr" and node.target.rpartition(".")[0] in modules


def _bn_state(bns: Iterable[nn.Module]) -> dict[nn.Module, tuple[torch.Tensor, ...]]:
    return {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns}


def _fresh_state(bns: list[nn.Module]) -> dict[nn.Module, tuple[torch.Tensor, ...]]:
    return {m: (torch.zeros_like(m.running_mean), torch.ones_like(m.running_var),
                torch.zeros_like(m.num_batches_tracked)) for m in bns}  # fmt: skip


def _load_state(bns: Iterable[nn.Module], state: dict) -> None:
    for m in bns:
        mean, var, n = state[m]
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(n)


def batches_per_group(model: nn.Module, data: Iterable, bn_batches: int) -> int | None:
    """Batches `measure` processes per group (the progress unit): the data's, plus the BatchNorm
    re-estimation batches when the model has BatchNorms; None when the data has no length."""
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        return None
    return n + (bn_batches if _tracked_bn(model) else 0)
