"""`sweep`: sensitivity curves, each channel group pruned alone at rising sparsity.

    >>> curves = sweep(model, heldout, example, levels=[0.1, 0.3, 0.5], metric=["accuracy", "loss"])
    >>> curves.head()      # one row per (group, sparsity), plus the dense baseline row
         group  sparsity  kept  size  accuracy    loss  params   flops
    0  (dense)       0.0   NaN   NaN     0.985  0.0612  272186  31021952
    1     stem       0.1  14.0  16.0     0.981  0.0703  271898  29442816

**Exact.** A point is the metric of the model with that one group pruned (physically pruned and
masked models compute the same outputs: the invariant `apply_plan` is tested on), optionally
after re-estimating BatchNorm statistics exactly as `recalibrate_bn_` does on the pruned copy.

**Fast.** One private working copy of the model serves every point: a point swaps its pruned
(smaller) tensors in, runs, and swaps the originals back, so there is no per-point copy or
re-trace, and each point computes no more than the pruned model would. For each group the dense graph
runs once per batch up to the first node the group touches; every level then runs only the rest of
the graph from those cached activations (the "suffix"). Data streams in batches, so memory stays
at about one forward pass. BatchNorm re-estimation reuses the same split: layers before the group
get the dense model's re-estimated statistics (their inputs do not change), layers after it carry
one set of statistics per point.

**Persisted.** Given a `store`, each group's points are saved the moment the group finishes;
re-running the same sweep (same model weights, data and settings) skips what is stored, so a
sweep killed mid-way resumes where it stopped.
"""

from __future__ import annotations

import copy
import operator
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pandas as pd
import torch
from torch import fx, nn
from tqdm.auto import tqdm

from prunecore._concurrency import forward_pass, fx_tracing
from prunecore.errors import ArgumentError
from prunecore._modes import eval_mode
from prunecore import ops
from prunecore.cost import count, plan_costs
from prunecore.evaluate import as_rows, evaluate, get_metric, output_logits, recalibrate_bn_, split_batch
from prunecore.graph import ChannelGraph, TraceError, failing_frame, trace
from prunecore.importance import score
from prunecore.plan import GroupPlan, Plan
from prunecore.prune import select_units
from prunecore.store import RunStore, fingerprint_data, fingerprint_model
from prunecore.store import run_id as make_run_id
from prunecore.surgery import kept_positions, sliced_tensors, swap_tensors_, with_ancestors

__all__ = ["DEFAULT_LEVELS", "DENSE", "sweep"]

DENSE = "(dense)"
"""The `group` value of the dense baseline row."""
DEFAULT_LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10))

Progress = bool | Callable[[int, int], None]


def sweep(
    model: nn.Module,
    data: Iterable[Any],
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    levels: Sequence[float] = DEFAULT_LEVELS,
    criterion: str = "l1",
    metric: str | Sequence[str] = "accuracy",
    groups: Sequence[str] | None = None,
    bn_recalibration: int = 0,
    calibration: Iterable[Any] | None = None,
    round_to: int = 1,
    progress: Progress = True,
    store: Any = None,
    graph: ChannelGraph | None = None,
    model_name: str = "",
    mode: str = "exact",
    leaf_modules: Sequence[type] = (),
    on_group: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Sensitivity curves of every prunable group (or of `groups`), as a tidy DataFrame.

    `data` yields `(inputs, targets)` batches, or bare inputs for the label-free metrics (`kl`,
    `agreement`, measured against the dense model); it must iterate in the same order each time.
    `bn_recalibration=N` re-estimates BatchNorm statistics on N batches of `calibration` (default:
    `data`) for every point. `store` (a `RunStore` or a path) persists points and resumes.
    `progress` is True for a progress bar, or a callable `(done, total)`. `on_group(name)` is called as
    each group's measurement starts (exact mode; groups already stored are skipped).

    `mode="estimate"` predicts the `loss` curve from a few backward passes instead of measuring it
    (see `prunecore.estimate`): a first look for large models, many times faster, less faithful.
    """
    if mode not in ("exact", "estimate"):
        raise ArgumentError(f"mode must be 'exact' or 'estimate', got {mode!r}")
    levels = _check_levels(levels)
    metrics = [metric] if isinstance(metric, str) else list(metric)
    for name in metrics:
        get_metric(name)
    if mode == "estimate":
        metrics = ["loss"]  # the one curve a Taylor expansion predicts
    graph = graph if graph is not None else trace(model, example_inputs, leaf_modules)
    names = _check_groups(graph, groups)
    calibration = data if calibration is None else calibration
    config = _config(levels, criterion, metrics, names, bn_recalibration, round_to, mode)
    run = _Run.open(store, model, data, calibration if config["bn_recalibration"] else None, config, model_name)
    pending = [(g, s) for g in names for s in levels if (g, s) not in run.done]
    began = time.perf_counter()
    if (DENSE, 0.0) not in run.done:
        run.add([_dense_row(model, data, example_inputs, metrics)])
    floor = 0.0
    if pending and mode == "estimate":
        _estimate(model, graph, data, example_inputs, pending, criterion, round_to, run)
    elif pending:
        scores = score(model, graph, criterion, data=data)
        points = {
            (g, s): _Point(g, s, select_units(scores[g], graph[g].size, s, round_to)) for g, s in pending
        }
        costs = plan_costs(model, example_inputs, [_plan(graph, p) for p in points.values()], graph)
        for p, cost in zip(points.values(), costs):
            p.row.update(params=cost.params, flops=cost.flops)
        engine = _Engine(model, graph, metrics, data, calibration, bn_recalibration, progress, tuple(leaf_modules))
        engine.run(points, on_group_done=run.add, on_group=on_group)
        floor = engine.floor_seconds
    run.complete()
    frame = run.frame()
    frame.attrs.update(seconds=time.perf_counter() - began, suffix_seconds=floor, mode=mode, config=config)
    return frame


def _estimate(model, graph, data, example, pending, criterion, round_to, run) -> None:
    """Estimate mode: predicted loss per point, with the exact params and FLOPs of each point."""
    from prunecore.estimate import estimate_loss

    scores = score(model, graph, criterion, data=data)
    keeps = {(g, s): select_units(scores[g], graph[g].size, s, round_to) for g, s in pending}
    predicted, _ = estimate_loss(model, graph, data, keeps)
    points = [_Point(g, s, keep) for (g, s), keep in keeps.items()]
    costs = plan_costs(model, example, [_plan(graph, p) for p in points], graph)
    run.add([{"group": p.group, "sparsity": p.sparsity, "kept": len(p.keep.keep), "size": p.keep.size,
              "loss": predicted[(p.group, p.sparsity)], "params": c.params, "flops": c.flops}
             for p, c in zip(points, costs)])  # fmt: skip


def sweep_run_id(
    model: nn.Module,
    data: Iterable[Any],
    graph: ChannelGraph,
    levels: Sequence[float] = DEFAULT_LEVELS,
    criterion: str = "l1",
    metric: str | Sequence[str] = "accuracy",
    groups: Sequence[str] | None = None,
    bn_recalibration: int = 0,
    calibration: Iterable[Any] | None = None,
    round_to: int = 1,
    mode: str = "exact",
) -> str:
    """The run id `sweep` would store these arguments under, without sweeping: where to look for its curves.

    The dashboard uses it to find a run swept elsewhere (the CLI, a script) with the same model
    weights, data and settings. It reads the data once (its fingerprint).
    """
    levels = _check_levels(levels)
    metrics = ["loss"] if mode == "estimate" else ([metric] if isinstance(metric, str) else list(metric))
    config = _config(levels, criterion, metrics, _check_groups(graph, groups), bn_recalibration, round_to, mode)
    calibration = data if calibration is None else calibration
    return _fingerprints(model, data, calibration if config["bn_recalibration"] else None, config)[0]


def _fingerprints(model: nn.Module, data: Iterable[Any], calibration: Iterable[Any] | None,
                  config: dict[str, Any]) -> tuple[str, str, str]:  # fmt: skip
    """(run id, model fingerprint, data fingerprint) of a sweep: the one derivation `sweep` and `sweep_run_id` share."""
    data_fp = fingerprint_data(data)
    if calibration is not None:
        data_fp += ":" + fingerprint_data(calibration)
    model_fp = fingerprint_model(model)
    return make_run_id(model_fp, data_fp, config), model_fp, data_fp


def _config(levels: list[float], criterion: str, metrics: list[str], names: list[str], bn_recalibration: int,
            round_to: int, mode: str) -> dict[str, Any]:  # fmt: skip
    """The settings a run id digests (and the store records), built one way for `sweep` and `sweep_run_id`."""
    return {
        "levels": levels, "criterion": criterion, "metrics": metrics, "groups": names,
        "bn_recalibration": bn_recalibration if mode == "exact" else 0, "round_to": round_to, "mode": mode,
    }  # fmt: skip


# -- points and their storage ---------------------------------------------------------------------
@dataclass
class _Point:
    group: str
    sparsity: float
    keep: GroupPlan
    sums: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    row: dict[str, Any] = field(default_factory=dict)

    def finished_row(self) -> dict[str, Any]:
        values = {name: get_metric(name).value(total, self.samples) for name, total in self.sums.items()}
        return {"group": self.group, "sparsity": self.sparsity, "kept": len(self.keep.keep),
                "size": self.keep.size, **values, **self.row}  # fmt: skip


@dataclass
class _Run:
    """Rows of one sweep, kept in memory or in a `RunStore`."""

    store: Any
    run_id: str
    rows: list[dict[str, Any]]
    done: set[tuple[str, float]]

    @classmethod
    def open(cls, store: Any, model: nn.Module, data: Iterable, calibration: Iterable | None,
             config: dict, model_name: str) -> _Run:  # fmt: skip
        if store is None:
            return cls(None, "", [], set())
        if isinstance(store, (str, Path)):
            store = RunStore(store)
        run_id, model_fp, data_fp = _fingerprints(model, data, calibration, config)
        expected = len(config["groups"]) * len(config["levels"]) + 1
        store.open_run(run_id, model_name or type(model).__name__, model_fp, data_fp, config, expected)
        return cls(store, run_id, [], store.done(run_id))

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if self.store is not None:
                self.store.add_point(self.run_id, row)
            else:
                self.rows.append(row)

    def complete(self) -> None:
        if self.store is not None:
            self.store.mark_complete(self.run_id)

    def frame(self) -> pd.DataFrame:
        frame = self.store.points(self.run_id) if self.store is not None else pd.DataFrame(self.rows)
        frame.attrs["run_id"] = self.run_id  # sweep() adds timings, mode and the config
        return frame


def _dense_row(model: nn.Module, data: Iterable, example: Any, metrics: list[str]) -> dict[str, Any]:
    needs_ref = any(get_metric(m).needs_reference for m in metrics)
    values = evaluate(model, data, metrics, reference=model if needs_ref else None)
    cost = count(model, example)
    return {"group": DENSE, "sparsity": 0.0, "kept": None, "size": None, **values,
            "params": cost.params, "flops": cost.flops}  # fmt: skip


def _plan(graph: ChannelGraph, p: _Point) -> Plan:
    return Plan({p.group: p.keep}, graph.inputs, graph.model_type)


def _check_levels(levels: Sequence[float]) -> list[float]:
    out = sorted({round(float(s), 6) for s in levels})
    if not out or any(not 0.0 <= s < 1.0 for s in out):
        raise ArgumentError(f"levels must be sparsities in [0, 1), got {list(levels)}")
    return out


def _check_groups(graph: ChannelGraph, groups: Sequence[str] | None) -> list[str]:
    if groups is None:
        return [g.name for g in graph.prunable]
    if not groups:
        raise ArgumentError("groups is empty: name at least one group to sweep, or pass None for every prunable one")
    for name in groups:
        if name not in graph:
            raise ArgumentError(f"no channel group named {name!r} in {graph.model_type}")
        if not graph[name].prunable:
            raise ArgumentError(f"group {name!r} cannot be pruned: it {graph[name].reason}")
    return list(dict.fromkeys(groups))


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
        # modules that `trace` follows whole (norms, Swin attention) stay single calls here too
        leaf = isinstance(m, self.extra_leaves + ops.whole_types())
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



# -- the engine -------------------------------------------------------------------------------------
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv}  # fmt: skip


class _Engine:
    """A private copy of the model as an fx graph that can resume from any node.

    Where fx cannot trace the model (shape-dependent control flow), every point runs the copy's own
    forward instead (`WHOLE`): slower, never different.
    """

    def __init__(self, model, graph, metrics, data, calibration, bn_batches, progress, leaf_modules=()):
        self.original = model  # only ever run, for the reference outputs of label-free metrics
        self.model = copy.deepcopy(model).eval()
        try:
            self.gm: fx.GraphModule | None = symbolic_trace(self.model, leaf_modules)
        except TraceError:
            self.gm = None  # fx cannot follow this model: every point runs the copy's own forward
        if self.gm is not None:
            _out_of_place_(self.gm)
        self.nodes = list(self.gm.graph.nodes) if self.gm is not None else []
        index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((index[u] for u in n.users), default=len(self.nodes)) for n in self.nodes}
        self.modules = dict(self.gm.named_modules()) if self.gm is not None else {}
        self.graph, self.metrics = graph, [get_metric(m) for m in metrics]
        self.data, self.calibration, self.bn_batches = data, calibration, bn_batches
        self.progress = progress
        self.reference: list[torch.Tensor] = []
        self.batch_keys: list[float] = []  # a checksum per batch: the data must come in the same order
        self.floor_seconds = 0.0  # time spent running suffixes: the work no reuse can avoid

    # running the graph ------------------------------------------------------------------------
    def start(self, inputs: torch.Tensor) -> dict[fx.Node, Any]:
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        return {placeholders[0] if placeholders else None: inputs}

    def advance(self, env: dict, start: int, stop: int) -> Any:
        """Run nodes [start, stop) in `env`, freeing values after their last use."""
        with forward_pass():
            return self._advance(env, start, stop)

    def _advance(self, env: dict, start: int, stop: int) -> Any:
        for i in range(start, stop):
            node = self.nodes[i]
            if node.op == "placeholder":
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node.op == "output":
                return args[0]
            env[node] = self._call(node, args, kwargs)
            for inp in node.all_input_nodes:
                if self.last_use[inp] == i:
                    del env[inp]
        return None

    def _call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return _fetch(self.gm, node.target)  # get_attr

    def suffix(self, env: dict, start: int) -> torch.Tensor:
        began = time.perf_counter()
        if start == WHOLE:
            with forward_pass():
                out = self.model(*env.values())
        else:
            out = self.advance(dict(env), start, len(self.nodes))
        self.floor_seconds += time.perf_counter() - began
        return out

    # the sweep --------------------------------------------------------------------------------
    def run(self, points: dict[tuple[str, float], _Point], on_group_done: Callable[[list[dict]], None],
            on_group: Callable[[str], None] | None = None) -> None:  # fmt: skip
        by_group: dict[str, list[_Point]] = {}
        for p in points.values():
            by_group.setdefault(p.group, []).append(p)
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats]  # fmt: skip
        if self.bn_batches and bns:
            recalibrate_bn_(self.model, self.calibration, batches=self.bn_batches)
        dense_bn = _bn_state(bns)
        n_batches = _length(self.data)
        per_group = (n_batches or 0) + (self.bn_batches if bns else 0)
        bar = _bar(self.progress, len(by_group) * per_group if n_batches else None)
        try:
            with torch.no_grad():
                self._reference_outputs()
                for group, pts in by_group.items():
                    if on_group is not None:
                        on_group(group)
                    start = WHOLE if self._changes_constants(group) else self._first_node(group)
                    target = self.model if start == WHOLE else self.gm
                    masks = _Variants(target, self.graph, [_plan(self.graph, p) for p in pts])
                    after = [m for m in bns if m in self._modules_from(max(start, 0))]
                    states = None
                    if self.bn_batches and bns:
                        states = self._calibrate(start, pts, masks, after, dense_bn, bar)
                    self._evaluate(start, pts, masks, after, states, dense_bn, bar)
                    on_group_done([p.finished_row() for p in pts])
        finally:
            bar.close()

    def _reference_outputs(self) -> None:
        """The dense model's outputs per batch, for the label-free metrics (kl, agreement)."""
        if not any(m.needs_reference for m in self.metrics):
            return
        with eval_mode(self.original):
            for batch in self.data:
                inputs = split_batch(batch)[0]
                with forward_pass():
                    self.reference.append(as_rows(output_logits(self.original(inputs)))[0])  # (N, C)
                self.batch_keys.append(float(inputs.double().sum()))

    def _calibrate(self, start, pts, masks, after, dense_bn, bar):
        """Per point: BatchNorm statistics of the layers after `start`, re-estimated as on the pruned copy."""
        before = [m for m in dense_bn if m not in after]
        states: dict[int, dict] = {}
        momenta = {m: m.momentum for m in dense_bn}
        try:
            for m in dense_bn:
                m.train()
                m.momentum = 0.0 if m in before else None  # layers before keep their statistics
            for b, batch in enumerate(self.calibration):
                if b >= self.bn_batches:
                    break
                env = self.start(split_batch(batch)[0])
                self.advance(env, 0, start)
                for i, p in enumerate(pts):
                    with masks.applied(i):  # the point's BatchNorms have the pruned shapes here
                        _load_state(after, states[id(p)] if id(p) in states else _fresh_state(after))
                        self.suffix(env, start)
                        states[id(p)] = _bn_state(after)
                bar.update(1)
        finally:
            for m, momentum in momenta.items():
                m.momentum = momentum
                m.eval()
            _load_state(list(dense_bn), dense_bn)
        return states

    def _evaluate(self, start, pts, masks, after, states, dense_bn, bar) -> None:
        for b, batch in enumerate(self.data):
            inputs, targets = split_batch(batch)
            env = self.start(inputs)
            self.advance(env, 0, start)
            reference = None
            if self.reference:
                if b >= len(self.batch_keys) or float(inputs.double().sum()) != self.batch_keys[b]:
                    raise ArgumentError(
                        f"batch {b} differs between passes over the data: a sweep needs data that comes in the "
                        "same order every time (e.g. a DataLoader without shuffle=True)"
                    )
                reference = self.reference[b]
            for i, p in enumerate(pts):
                with masks.applied(i):
                    if states is not None:
                        _load_state(after, states[id(p)])
                    out, rows_targets = as_rows(output_logits(self.suffix(env, start)), targets)  # (N, C)
                for metric in self.metrics:
                    total = float(metric.batch_sum(out, reference, rows_targets))
                    p.sums[metric.name] = p.sums.get(metric.name, 0.0) + total
                p.samples += out.shape[0]
            if states is not None:
                _load_state(after, {m: dense_bn[m] for m in after})
            bar.update(1)

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
        return {self.modules[n.target] for n in self.nodes[start:] if n.op == "call_module"}


WHOLE = -1
"""A start "node" meaning: run the working copy's own forward instead of a suffix of the graph."""


def _fetch(root: nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _out_of_place_(gm: fx.GraphModule) -> None:
    """In-place ops would overwrite activations that other points reuse: make them out of place."""
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


class _Variants:
    """Each point's pruned tensors, swapped into the working copy for the length of a `with` block.

    The suffix of the graph then runs on physically smaller layers, exactly as in the pruned
    copy; no tensor that a point does not touch is copied. Swaps happen on the GraphModule, whose
    submodules are the working copy's and which holds its own references to loose parameters.
    """

    def __init__(self, gm: fx.GraphModule, graph: ChannelGraph, plans: list[Plan]):
        self.gm = gm
        self.tensors = [sliced_tensors(gm, kept_positions(graph, plan)) for plan in plans]

    @contextmanager
    def applied(self, i: int) -> Iterator[None]:
        old = swap_tensors_(self.gm, self.tensors[i])
        try:
            yield
        finally:
            swap_tensors_(self.gm, old)


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


def _length(data: Iterable) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _CallbackBar:
    def __init__(self, fn: Callable[[int, int], None], total: int | None):
        self.fn, self.total, self.done = fn, total or 0, 0

    def update(self, n: int) -> None:
        self.done += n
        self.fn(self.done, self.total)

    def close(self) -> None:
        pass


def _bar(progress: Progress, total: int | None):
    if callable(progress):
        return _CallbackBar(progress, total)
    if progress:
        return tqdm(total=total, desc="sensitivity sweep", unit="batch")
    return _NoBar()
