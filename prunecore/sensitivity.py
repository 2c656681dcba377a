"""`sweep`: sensitivity curves, each channel group pruned alone at rising sparsity.

    >>> curves = sweep(model, heldout, example, levels=[0.1, 0.3, 0.5], metric=["accuracy", "loss"])
    >>> curves.head()      # one row per (group, sparsity), plus the dense baseline row
         group  sparsity  kept  size  accuracy    loss  params   flops
    0  (dense)       0.0   NaN   NaN     0.985  0.0612  272186  31021952
    1     stem       0.1  14.0  16.0     0.981  0.0703  271898  29442816

**Exact.** A point is the metric of the model with that one group pruned (physically pruned and
masked models compute the same outputs: the invariant `apply_plan` is tested on), optionally
after re-estimating BatchNorm statistics exactly as `recalibrate_bn_` does on the pruned copy.

**Fast.** The suffix engine (`prunecore.suffix`) runs each point on physically smaller tensors
and only from the first node its group touches, and the groups of a chunk share one dense forward
per batch; data streams in batches, so memory stays at about one forward pass. The pass that
evaluates the dense model also fingerprints the data.

**Settings vs execution.** Everything that decides the numbers is one frozen `SweepConfig`, which
is also what the run id digests. How the work runs (`device`, `workers`, `executor`, `address`,
`threads`) is not part of it: the same sweep on 1 process or on a Ray cluster finds the same run.
`workers=N` spreads the groups over N local processes, `executor="ray"` over a Ray cluster
(`prunecore.workers`); every point equals the sequential sweep's.

**Persisted.** Given a `store`, each group's points are saved the moment the group finishes (on
whichever worker); re-running the same sweep skips what is stored, so a sweep killed mid-way
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from prunecore.cost import count, plan_costs
from prunecore.devices import autocast, check_autocast, resolve_device
from prunecore.errors import ArgumentError
from prunecore.evaluate import evaluate, get_metric
from prunecore.graph import ChannelGraph, trace
from prunecore.importance import score
from prunecore.prune import select_units
from prunecore.store import DataHasher, RunStore, fingerprint_data, fingerprint_model
from prunecore.store import run_id as make_run_id
from prunecore.suffix import Point, SuffixEngine

__all__ = ["DEFAULT_LEVELS", "DENSE", "SweepConfig", "sweep", "sweep_run_id"]

DENSE = "(dense)"
"""The `group` value of the dense baseline row."""
DEFAULT_LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10))

Progress = bool | Callable[[int, int], None]


@dataclass(frozen=True)
class SweepConfig:
    """Every setting that decides a sweep's numbers; the run id digests it (`key`), so equal configs find one run.

    `levels` are sparsities in [0, 1); `metric` one name or several; `groups` None for every
    prunable group; `bn_recalibration=N` re-estimates BatchNorm on N calibration batches per
    point; `round_to` rounds kept units to a multiple; `mode` "exact" (measured) or "estimate"
    (a Taylor prediction of the loss); `autocast` "bf16"/"fp16" evaluates in mixed precision;
    `channels_last` evaluates on channels-last images and weights (exact mode; faster for some CNNs).
    Values are normalised on construction (levels sorted and de-duplicated, one metric made a
    tuple), and invalid ones raise `ArgumentError` at once, before any model work.
    """

    levels: tuple[float, ...] = DEFAULT_LEVELS
    criterion: str = "l1"
    metric: tuple[str, ...] = ("accuracy",)
    groups: tuple[str, ...] | None = None
    bn_recalibration: int = 0
    round_to: int = 1
    mode: str = "exact"
    autocast: str | None = None
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "estimate"):
            raise ArgumentError(f"mode must be 'exact' or 'estimate', got {self.mode!r}")
        metrics = (self.metric,) if isinstance(self.metric, str) else tuple(self.metric)
        if not metrics:
            raise ArgumentError("metric is empty: name at least one metric")
        for name in metrics:
            get_metric(name)
        if self.mode == "estimate":
            metrics = ("loss",)  # the one curve a Taylor expansion predicts
        if self.groups is not None and not self.groups:
            raise ArgumentError("groups is empty: name at least one group to sweep, or None for every prunable one")
        if int(self.bn_recalibration) < 0 or int(self.round_to) < 1:
            raise ArgumentError(f"bn_recalibration must be >= 0 and round_to >= 1, got {self.bn_recalibration} "
                                f"and {self.round_to}")  # fmt: skip
        fields = {"levels": tuple(_check_levels(self.levels)), "metric": metrics,
                  "groups": None if self.groups is None else tuple(dict.fromkeys(self.groups)),
                  "bn_recalibration": int(self.bn_recalibration) if self.mode == "exact" else 0,
                  "round_to": int(self.round_to), "autocast": check_autocast(self.autocast),
                  "channels_last": bool(self.channels_last) and self.mode == "exact"}  # fmt: skip
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def metrics(self) -> list[str]:
        return list(self.metric)

    def key(self, groups: Sequence[str]) -> dict[str, Any]:
        """The dict a run id digests (and the store records), with the group names resolved on the graph.

        It has the same shape as before this class existed, so runs stored then are still found;
        `autocast` and `channels_last` join it only when set.
        """
        key = {"levels": list(self.levels), "criterion": self.criterion, "metrics": self.metrics,
               "groups": list(groups), "bn_recalibration": self.bn_recalibration, "round_to": self.round_to,
               "mode": self.mode}  # fmt: skip
        if self.autocast is not None:
            key["autocast"] = self.autocast
        if self.channels_last:
            key["channels_last"] = True
        return key


_SETTINGS = tuple(f.name for f in dataclasses.fields(SweepConfig))


def sweep_config(config: SweepConfig | None = None, **settings: Any) -> SweepConfig:
    """`config` with `settings` (SweepConfig field names) replacing its values; a clear error for unknown ones."""
    if config is not None and not isinstance(config, SweepConfig):
        raise ArgumentError(f"config must be a SweepConfig, got {type(config).__name__}: pass sweep settings by "
                            "keyword (levels=..., metric=...)")  # fmt: skip
    unknown = sorted(set(settings) - set(_SETTINGS))
    if unknown:
        raise ArgumentError(f"unknown sweep setting(s) {unknown}; the settings are {list(_SETTINGS)}")
    if "levels" in settings and settings["levels"] is None:
        settings["levels"] = DEFAULT_LEVELS
    return dataclasses.replace(config or SweepConfig(), **settings)


def sweep(
    model: nn.Module,
    data: Iterable[Any],
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    config: SweepConfig | None = None,
    *,
    calibration: Iterable[Any] | None = None,
    store: Any = None,
    graph: ChannelGraph | None = None,
    model_name: str = "",
    leaf_modules: Sequence[type] = (),
    progress: Progress = True,
    on_group: Callable[[str], None] | None = None,
    on_worker: Callable[[Any], None] | None = None,
    device: str | torch.device | None = None,
    workers: int = 1,
    executor: str = "local",
    address: str | None = None,
    threads: int | None = None,
    **settings: Any,
) -> pd.DataFrame:
    """Sensitivity curves of every prunable group (or of `groups`), as a tidy DataFrame.

    The settings are a `SweepConfig` (`config=`) or its fields by keyword (`levels=`, `metric=`,
    `criterion=`, `groups=`, `bn_recalibration=`, `round_to=`, `mode=`, `autocast=`, `channels_last=`).

    `data` yields `(inputs, targets)` batches, or bare inputs for the label-free metrics (`kl`,
    `agreement`, measured against the dense model); it must iterate in the same order each time.
    `bn_recalibration=N` re-estimates BatchNorm statistics on N batches of `calibration` (default:
    `data`) for every point. `store` (a `RunStore` or a path) persists points and resumes.
    `progress` is True for a progress bar, or a callable `(done, total)`. `on_group(name)` is called as
    each group's measurement starts (exact mode; groups already stored are skipped), and with
    workers `on_worker(status)` with a `prunecore.workers.WorkerStatus` whenever one progresses.

    Execution: `device` (default CUDA when present, else the CPU) is where points run; the dense
    row and the curves of one sweep always come from the same device. `workers=N` measures groups
    in N local processes, `executor="ray"` in N Ray actors (`address` of an existing cluster, "auto"
    for the one `ray start` runs on this machine; else this process's own local cluster, started by
    the first such sweep and up until this process exits); `threads` per
    worker (default: this process's threads divided among them). Per-worker peak memory is in
    `frame.attrs["workers"]`.

    `mode="estimate"` predicts the `loss` curve from a few backward passes instead of measuring it
    (see `prunecore.estimate`): a first look for large models, many times faster, less faithful.
    """
    config = sweep_config(config, **settings)
    device = resolve_device(device)
    with autocast(device, config.autocast):  # a mode this device cannot run fails here, before any work
        pass
    _check_execution(workers, executor, address, threads)
    graph = graph if graph is not None else trace(model, example_inputs, leaf_modules)
    names = _check_groups(graph, config.groups)
    calibration = data if calibration is None else calibration
    key = config.key(names)
    began = time.perf_counter()
    engine_args = dict(metrics=config.metrics, data=data, calibration=calibration,
                       bn_batches=config.bn_recalibration, leaf_modules=tuple(leaf_modules), device=device,
                       autocast=config.autocast, channels_last=config.channels_last)  # fmt: skip
    spec, pool = None, None
    if config.mode == "exact" and (workers > 1 or executor != "local"):
        from prunecore.workers import EngineSpec, start_ray

        spec = EngineSpec(model=model, graph=graph, **engine_args)
        # Ray actors start (seconds: torch imports, dense passes) while this process evaluates and scores
        pool = start_ray(spec, workers, threads, address) if executor == "ray" else None
    try:
        dense, run = _open(store, model, data, calibration if config.bn_recalibration else None, key, model_name,
                           example_inputs, config, device)  # fmt: skip
        pending = [(g, s) for g in names for s in config.levels if (g, s) not in run.done]
        if (DENSE, 0.0) not in run.done:
            run.add([dense])
        floor, worker_stats = 0.0, []
        if pending and config.mode == "estimate":
            _estimate(model, graph, data, example_inputs, pending, config, run)
        elif pending:
            scores = score(model, graph, config.criterion, data=data, device=device)
            points = [Point(g, s, select_units(scores[g], graph[g].size, s, config.round_to)) for g, s in pending]
            costs = plan_costs(model, example_inputs, [p.plan(graph) for p in points], graph)
            by_group: dict[str, list[Point]] = {}
            for p, cost in zip(points, costs):
                p.row.update(params=cost.params, flops=cost.flops)
                by_group.setdefault(p.group, []).append(p)
            if spec is None:
                floor = _measure_here(model, graph, engine_args, by_group, run, progress, on_group)
            else:
                from prunecore.workers import measure_groups

                worker_stats = measure_groups(spec, by_group, on_rows=run.add, workers=workers, executor=executor,
                                              address=address, threads=threads, progress=progress,
                                              on_group=on_group, on_worker=on_worker, pool=pool)  # fmt: skip
    finally:
        if pool is not None:
            pool.close()
    run.complete()
    frame = _in_order(run.frame(), names)
    frame.attrs.update(seconds=time.perf_counter() - began, suffix_seconds=floor, mode=config.mode, config=key,
                       device=str(device), workers=worker_stats)  # fmt: skip
    return frame


def _measure_here(model: nn.Module, graph: ChannelGraph, engine_args: dict[str, Any],
                  by_group: dict[str, list[Point]], run: _Run, progress: Progress,
                  on_group: Callable[[str], None] | None) -> float:  # fmt: skip
    """Measure every group in this process, committing each chunk as it finishes; the seconds spent in suffixes.

    The groups go in chunks of floor(sqrt(groups)): a chunk shares one dense forward per batch
    (`SuffixEngine.measure`), and each finished chunk is stored, so a killed sweep loses at most
    one chunk. Sqrt balances the two: 12 groups run 4 dense passes per batch instead of 12, and
    a sweep of 1 to 3 groups still stores each group as it finishes.
    """
    engine = SuffixEngine(model, graph, **engine_args)
    per_group = engine.work_per_group
    bar = progress_bar(progress, len(by_group) * per_group if per_group is not None else None)
    names = list(by_group)
    size = max(1, math.isqrt(len(names)))
    try:
        for first in range(0, len(names), size):
            chunk = names[first : first + size]
            for group in chunk:
                if on_group is not None:
                    on_group(group)
            run.add(engine.measure([p for g in chunk for p in by_group[g]], bar.update))
    finally:
        bar.close()
    return engine.floor_seconds


def _check_execution(workers: int, executor: str, address: str | None, threads: int | None) -> None:
    if not isinstance(workers, int) or workers < 1:
        raise ArgumentError(f"workers must be a positive int, got {workers!r}")
    if executor not in ("local", "ray"):
        raise ArgumentError(f"executor must be 'local' (processes on this machine) or 'ray', got {executor!r}")
    if address is not None and executor != "ray":
        raise ArgumentError("address= names a Ray cluster: use it with executor='ray'")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ArgumentError(f"threads must be a positive int, got {threads!r}")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ArgumentError("executor='ray' needs Ray: pip install 'prunecore[ray]'") from None


def _estimate(model, graph, data, example, pending, config: SweepConfig, run) -> None:
    """Estimate mode: predicted loss per point, with the exact params and FLOPs of each point."""
    from prunecore.estimate import estimate_loss

    scores = score(model, graph, config.criterion, data=data)
    keeps = {(g, s): select_units(scores[g], graph[g].size, s, config.round_to) for g, s in pending}
    predicted, _ = estimate_loss(model, graph, data, keeps)
    points = [Point(g, s, keep) for (g, s), keep in keeps.items()]
    costs = plan_costs(model, example, [p.plan(graph) for p in points], graph)
    run.add([{"group": p.group, "sparsity": p.sparsity, "kept": len(p.keep.keep), "size": p.keep.size,
              "loss": predicted[(p.group, p.sparsity)], "params": c.params, "flops": c.flops}
             for p, c in zip(points, costs)])  # fmt: skip


def sweep_run_id(
    model: nn.Module,
    data: Iterable[Any],
    graph: ChannelGraph,
    config: SweepConfig | None = None,
    *,
    calibration: Iterable[Any] | None = None,
    **settings: Any,
) -> str:
    """The run id `sweep` would store these arguments under, without sweeping: where to look for its curves.

    The dashboard uses it to find a run swept elsewhere (the CLI, a script) with the same model
    weights, data and settings. It reads the data once (its fingerprint).
    """
    config = sweep_config(config, **settings)
    key = config.key(_check_groups(graph, config.groups))
    calibration = data if calibration is None else calibration
    data_fp = fingerprint_data(data) + _calibration_fp(calibration if config.bn_recalibration else None)
    return make_run_id(fingerprint_model(model), data_fp, key)


def _calibration_fp(calibration: Iterable[Any] | None) -> str:
    return "" if calibration is None else ":" + fingerprint_data(calibration)


# -- points and their storage ---------------------------------------------------------------------
@dataclass
class _Run:
    """Rows of one sweep, kept in memory or in a `RunStore`."""

    store: Any
    run_id: str
    rows: list[dict[str, Any]]
    done: set[tuple[str, float]]

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


def _in_order(frame: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """The dense row, then groups in graph order and levels rising, however workers or a resume interleaved them."""
    rank = {DENSE: -1, **{name: i for i, name in enumerate(names)}}
    order = sorted(range(len(frame)), key=lambda i: (rank.get(frame.group.iat[i], len(rank)), frame.sparsity.iat[i]))
    out = frame.iloc[order].reset_index(drop=True)
    out.attrs.update(frame.attrs)
    return out


def _open(store: Any, model: nn.Module, data: Iterable, calibration: Iterable | None, key: dict[str, Any],
          model_name: str, example: Any, config: SweepConfig, device: torch.device) -> tuple[dict[str, Any], _Run]:
    """The dense row, and the run it belongs to; one read of `data` both evaluates and fingerprints it."""
    hasher = DataHasher()
    dense = _dense_row(model, hasher.hashing(data) if store is not None else data, example, config, device)
    if store is None:
        return dense, _Run(None, "", [], set())
    if isinstance(store, (str, Path)):
        store = RunStore(store)
    model_fp, data_fp = fingerprint_model(model), hasher.hexdigest() + _calibration_fp(calibration)
    run_id = make_run_id(model_fp, data_fp, key)
    expected = len(key["groups"]) * len(key["levels"]) + 1
    store.open_run(run_id, model_name or type(model).__name__, model_fp, data_fp, key, expected)
    return dense, _Run(store, run_id, [], store.done(run_id))


def _dense_row(model: nn.Module, data: Iterable, example: Any, config: SweepConfig,
               device: torch.device) -> dict[str, Any]:  # fmt: skip
    needs_ref = any(get_metric(m).needs_reference for m in config.metrics)
    values = evaluate(model, data, config.metrics, reference=model if needs_ref else None, device=device,
                      autocast=config.autocast, channels_last=config.channels_last)  # fmt: skip
    cost = count(model, example)
    return {"group": DENSE, "sparsity": 0.0, "kept": None, "size": None, **values,
            "params": cost.params, "flops": cost.flops}  # fmt: skip


def _check_levels(levels: Sequence[float]) -> list[float]:
    try:
        out = sorted({round(float(s), 6) for s in levels})
    except (TypeError, ValueError):
        raise ArgumentError(f"levels must be sparsities in [0, 1), got {levels!r}") from None
    if not out or any(not 0.0 <= s < 1.0 for s in out):
        raise ArgumentError(f"levels must be sparsities in [0, 1), got {list(levels)}")
    return out


def _check_groups(graph: ChannelGraph, groups: Sequence[str] | None) -> list[str]:
    if groups is None:
        return [g.name for g in graph.prunable]
    for name in groups:
        if name not in graph:
            raise ArgumentError(f"no channel group named {name!r} in {graph.model_type}")
        if not graph[name].prunable:
            raise ArgumentError(f"group {name!r} cannot be pruned: it {graph[name].reason}")
    return list(dict.fromkeys(groups))


# -- progress ---------------------------------------------------------------------------------------
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


def progress_bar(progress: Progress, total: int | None, desc: str = "sensitivity sweep"):
    """A tqdm bar (True), a `(done, total)` callback wrapped as one, or nothing (False); counts batches."""
    if callable(progress):
        return _CallbackBar(progress, total)
    if progress:
        return tqdm(total=total, desc=desc, unit="batch")
    return _NoBar()
