"""Sensitivity-sweep benchmark: is `sweep` exact, how fast is it, and how well does it spread over workers?

0. Workers: the same sweeps on 1 worker (the sequential sweep), 2 local worker processes and 2
   Ray actors, each with 1 thread: speed-up over 1 worker (aim on 2 cores >= 1.6x), whether every
   point is identical, peak RSS per worker. Wall time includes starting the workers and, in the
   "cluster start" column, the local Ray cluster that a sweep without `address` starts. "Cluster
   up" sweeps with `address=` on a cluster started before the clock with `ray start --head` as the
   README says, and already used by one other driver; it also times 1 actor there, so Ray's scaling
   shows apart from its fixed start. Interleaved rounds, median round; the sample MobileNetV2 (225
   points, one round) shows how the start amortises over a longer sweep. `--parallel-only` runs
   this part alone, `--no-parallel` skips it.
1. Exact sweep vs the naive loop (trace once, then per point copy -> `make_plan({group: s})` ->
   `apply_plan` -> `evaluate`), levels 0.1..0.9, metrics accuracy and loss, same points and data, on
   the sample ResNet-20 (1,000 held-out digits, batches of 250) and torchvision resnet18 (random
   init, 512 seeded random 3x32x32 images, batches of 128). Reported: speed-up (aim >= 2x), the
   largest |difference| of any point (the sweep claims identical values), peak RSS, and the share
   of the sweep's time spent in the per-point suffix passes (the sweep's own `suffix_seconds`).
   The same comparison runs with BatchNorm re-estimation on 4 calibration batches
   (`bn_recalibration=4` vs `recalibrate_bn_`).
2. `mode="estimate"` (a Taylor prediction of the loss curve) vs the exact sweep on the three sample
   models: speed-up (aim >= 20x) and Spearman rank correlation of the predicted loss with the exact
   loss and with the exact accuracy drop, over all points: how far users may trust the estimate.
3. Memory layout: the exact sweep with `channels_last=True` against the default, on the sample
   ResNet-20 and MobileNetV2 and resnet18, in interleaved rounds: speed-up and how far the points
   move (`--layout-only` runs this part alone).

Each measurement runs in a fresh subprocess, so its peak RSS (`ru_maxrss`) is its own; `load` is a
subprocess that only loads the model and data and evaluates once, the baseline of the others. On a
shared 2-core CPU only ratios from one run mean anything, and even those drift by 15 %: naive and
sweep (with and without BN re-estimation) are timed in 3 interleaved rounds and each keeps its
median round; the estimate, which takes seconds, is the median of 3 calls.
Run: `.venv/bin/python bench/bench_sweep.py [--quick] [--rounds N] [--json PATH] [--layout-only]` (`--quick`: smoke
test). `--device cuda [--autocast bf16]` runs every sweep and naive point on the GPU (GPU figures; the
workers section is skipped there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd
import torch
import torchvision
from scipy.stats import spearmanr
from torch import nn

import prunecore
from prunecore.devices import resolve_device
from prunecore.sensitivity import DENSE
from prunecore.workers import preload_modules

LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10))
METRICS = ["accuracy", "loss"]
EXACT_MODELS = ("resnet20", "resnet18")  # sweep vs naive
SAMPLES = ("resnet20", "mobilenet_v2", "vit")  # estimate vs exact
BN_BATCHES = 4
# 1 worker, 2 local workers, 2 Ray actors with their cluster's start, 1 and 2 Ray actors on a cluster already up
PARALLEL = ("seq1", "local2", "ray2", "ray1up", "ray2up")
LONG_SWEEP = "mobilenet_v2"  # 225 points, minutes per way: one round
ESTIMATE_REPS = 3


@dataclass(frozen=True)
class Run:
    """Where every job of one benchmark run evaluates: the device, and the mixed-precision mode (or None)."""

    device: str = "cpu"
    autocast: str | None = None


Setup = tuple[nn.Module, list[Any] | Iterable[Any], torch.Tensor, Iterable[Any], list[str] | None, tuple[float, ...]]


def setup(name: str, quick: bool) -> Setup:
    """(model, data, example, calibration, groups or None for all, levels) of one benchmark model."""
    torch.manual_seed(0)
    if name == "resnet18":
        model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
        gen = torch.Generator().manual_seed(1)
        n, batch = (64, 32) if quick else (512, 128)
        x, y = torch.randn(n + BN_BATCHES * batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
        data = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]  # (B, 3, 32, 32), (B,)
        calibration = [(x[i : i + batch],) for i in range(n, len(x), batch)]  # 4 batches of other images
        example = x[:1]
    else:
        s = prunecore.load_sample(name)
        model, data, calibration, example = s.model, s.heldout, s.calibration, s.example
        if quick:
            data, calibration = [(x[:50], y[:50]) for x, y in list(data)[:1]], list(calibration)[:1]
    groups = [g.name for g in prunecore.trace(model, example).prunable][:2] if quick else None
    return model, data, example, calibration, groups, (0.3, 0.6) if quick else LEVELS


def naive(model: nn.Module, data: Iterable[Any], example: torch.Tensor, groups: list[str] | None,
          levels: tuple[float, ...], calibration: Iterable[Any] | None, run: Run) -> list[dict[str, Any]]:  # fmt: skip
    """The reference loop: per point a pruned copy (on the run's device), optionally BN-recalibrated, evaluated."""
    graph = prunecore.trace(model, example)
    device = resolve_device(run.device)
    rows = []
    for g in groups or [g.name for g in graph.prunable]:
        for s in levels:
            plan = prunecore.make_plan(model, graph, {g: s})
            pruned = prunecore.apply_plan(model, plan, graph=graph).to(device)
            if calibration is not None:  # in full precision, as `evaluate_plan` re-estimates before it evaluates
                prunecore.recalibrate_bn_(pruned, calibration, batches=BN_BATCHES)
            measured = prunecore.evaluate(pruned, data, METRICS, device=device, autocast=run.autocast)
            rows.append({"group": g, "sparsity": s, **measured})
    return rows


def job(name: str, kind: str, quick: bool, run: Run) -> dict[str, Any]:
    """One measurement, run in this (fresh) process: seconds, and the points where there are any."""
    model, data, example, calibration, groups, levels = setup(name, quick)
    bn = kind.endswith("_bn")
    on = dict(device=run.device, autocast=run.autocast)  # every sweep and evaluation runs there
    began = time.perf_counter()
    if kind == "load":
        return {"evaluate": prunecore.evaluate(model, data, METRICS, **on), "seconds": time.perf_counter() - began}
    if kind.startswith("naive"):
        rows = naive(model, data, example, groups, levels, calibration if bn else None, run)
        return {"seconds": time.perf_counter() - began, "rows": rows}
    if kind == "estimate":
        times, frame = [], None
        for _ in range(1 if quick else ESTIMATE_REPS):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            frame = prunecore.sweep(model, data, example, levels=levels, metric="loss", groups=groups,
                                    progress=False, mode="estimate", device=run.device)  # fmt: skip
            times.append(time.perf_counter() - t0)
        return {"seconds": statistics.median(times), "rounds_s": times, "rows": frame.to_dict("records")}
    if kind.removesuffix("_bn") in PARALLEL:  # 1 thread per worker: 1 process, 2 local processes, Ray actors
        torch.set_num_threads(1)
        base = kind.removesuffix("_bn")
        execution = {"seq1": {}, "local2": dict(workers=2, threads=1)}.get(base) or dict(
            workers=int(base[3]), threads=1, executor="ray")  # ray2, ray1up, ray2up
        if bn:
            execution.update(bn_recalibration=BN_BATCHES, calibration=calibration)
        with ray_cluster(model) if base.endswith("up") else contextlib.nullcontext() as address:
            began = time.perf_counter()
            frame = prunecore.sweep(model, data, example, levels=levels, metric=METRICS, groups=groups,
                                    progress=False, address=address, **execution, **on)  # fmt: skip
            seconds = time.perf_counter() - began
        return {"seconds": seconds, "rows": frame.to_dict("records"), "workers": frame.attrs.get("workers") or []}
    extra = dict(bn_recalibration=BN_BATCHES, calibration=calibration) if bn else {}  # sweep, sweep_bn
    if kind == "sweep_cl":
        extra = dict(channels_last=True)
    frame = prunecore.sweep(model, data, example, levels=levels, metric=METRICS, groups=groups, progress=False, **extra,
                            **on)  # fmt: skip
    return {"seconds": time.perf_counter() - began, "rows": frame.to_dict("records"),
            "suffix_s": frame.attrs.get("suffix_seconds")}  # the sweep's own suffix time, if it reports it


@contextlib.contextmanager
def ray_cluster(model: nn.Module) -> Iterator[str]:
    """A 2-CPU Ray cluster of its own processes, started as the README says (`ray start --head` with the
    model's preload list), already used by one driver; yields the address to sweep on, and stops it afterwards.

    Ray prestarts worker processes for the first driver that connects only. The throwaway driver
    takes them, so the timed sweep meets the cluster as every later sweep on a running cluster does.
    """
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_preload_python_modules": ",".join(preload_modules(model))}
    linux_tmp = os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None
    temp = os.environ.get("RAY_TMPDIR") or linux_tmp or "/tmp"  # Ray's own rule for its temp dir
    record = Path(temp) / "ray" / "ray_current_cluster"  # where `ray start` notes the machine's cluster
    before = record.read_text() if record.exists() else None
    with socket.socket() as free:  # a port nothing listens on: the cluster is this job's own
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
                             "--include-dashboard=false", "--disable-usage-stats"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (record.exists() and record.read_text().strip().endswith(f":{port}")):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head --port {port} did not come up")
            time.sleep(0.2)
        subprocess.run([sys.executable, "-c", "import ray; ray.init(address='auto')"], check=True, capture_output=True)
        yield "auto"  # the cluster this machine runs, as on a cluster's head node (it finds its auth token too)
    finally:
        head.terminate()  # --block: stopping the command stops this cluster, and no other
        head.wait(60)
        if before is None:  # a record of the stopped cluster would send a plain ray.init() to it (it waits minutes)
            record.unlink(missing_ok=True)
        else:
            record.write_text(before)


def spawn(name: str, kind: str, quick: bool, run: Run) -> dict[str, Any]:
    """Run `job` in a fresh interpreter; its result plus its peak RSS in MiB."""
    print(f"  {name}: {kind} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "job.json"
        cmd = [sys.executable, __file__, "--job", f"{name}:{kind}", "--out", str(out)] + ["--quick"] * quick
        cmd += ["--device", run.device] + (["--autocast", run.autocast] if run.autocast else [])
        subprocess.run(cmd, check=True, stdout=sys.stderr)  # Ray's shutdown chatter stays off the table
        return json.loads(out.read_text())


def median_round(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One job's rounds as one result: the median round's seconds, the peak RSS of any round."""
    by_time = sorted(results, key=lambda r: r["seconds"])
    mid = by_time[(len(by_time) - 1) // 2]
    return {**mid, "rounds_s": [r["seconds"] for r in results], "rss_mib": max(r["rss_mib"] for r in results)}


def points(result: dict[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame(result["rows"])
    return frame[frame.group != DENSE].set_index(["group", "sparsity"]).sort_index()


def exact_row(name: str, r: dict[str, dict[str, Any]], suffix: str = "") -> dict[str, Any]:
    """Sweep vs naive of one model, from the jobs' results."""
    fast, slow = points(r[f"sweep{suffix}"]), points(r[f"naive{suffix}"])
    assert fast.index.equals(slow.index), "sweep and naive loop computed different points"
    sweep_s, naive_s = r[f"sweep{suffix}"]["seconds"], r[f"naive{suffix}"]["seconds"]
    inside = r[f"sweep{suffix}"].get("suffix_s")  # suffix time the sweep itself recorded, same process
    return dict(
        model=name + (f" + BN recalibration ({BN_BATCHES})" if suffix else ""),
        groups=fast.index.get_level_values(0).nunique(), points=len(fast), naive_s=naive_s, sweep_s=sweep_s,
        speedup=naive_s / sweep_s, suffix_share=inside / sweep_s if inside else None,
        **{f"max_diff_{m}": float((fast[m] - slow[m]).abs().max()) for m in METRICS},
        rss_naive_mib=r[f"naive{suffix}"]["rss_mib"], rss_sweep_mib=r[f"sweep{suffix}"]["rss_mib"],
        rss_load_mib=r["load"]["rss_mib"],
    )  # fmt: skip


def estimate_row(name: str, exact: dict[str, Any], est: dict[str, Any]) -> dict[str, Any]:
    """Estimate vs exact sweep: speed-up and rank agreement over all points."""
    full = pd.DataFrame(exact["rows"])
    dense_acc = float(full.loc[full.group == DENSE, "accuracy"].iloc[0])
    both = points(exact).assign(loss_est=points(est)["loss"]).dropna(subset=["loss_est"])
    rho = lambda a, b: float(spearmanr(a, b)[0])  # noqa: E731
    return dict(model=name, points=len(both), exact_s=exact["seconds"], estimate_s=est["seconds"],
                speedup=exact["seconds"] / est["seconds"], rho_loss=rho(both.loss_est, both.loss),
                rho_acc_drop=rho(both.loss_est, dense_acc - both.accuracy))  # fmt: skip


def parallel_row(name: str, r: dict[str, dict[str, Any]], bn: bool) -> dict[str, Any]:
    """Speed-up of 2 local workers and of 2 Ray actors over 1 worker (1 thread each), and whether points agree."""
    r = {kind.removesuffix("_bn"): result for kind, result in r.items()}
    one = points(r["seq1"])
    row: dict[str, Any] = dict(model=name + (f" + BN recalibration ({BN_BATCHES})" if bn else ""), points=len(one),
                               seq1_s=r["seq1"]["seconds"])  # fmt: skip
    for kind in PARALLEL[1:]:
        other = points(r[kind])
        assert other.index.equals(one.index), f"{kind} computed other points"
        row[f"{kind}_s"] = r[kind]["seconds"]
        row[f"{kind}_speedup"] = r["seq1"]["seconds"] / r[kind]["seconds"]
        row[f"{kind}_identical"] = bool(all(other[m].equals(one[m]) for m in METRICS))
        row[f"{kind}_worker_rss_mib"] = [w["peak_rss_mib"] for w in r[kind]["workers"]]
    row["ray_scaling"] = r["ray1up"]["seconds"] / r["ray2up"]["seconds"]  # 2 actors over 1, same kind of cluster
    row["driver_rss_mib"] = {kind: r[kind]["rss_mib"] for kind in PARALLEL}
    row["rounds_s"] = {kind: r[kind]["rounds_s"] for kind in PARALLEL}
    return row


def parallel_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | points | 1 worker s | 2 local workers s | speed-up | 2 Ray actors, cluster start s | speed-up "
             "| cluster up: 1 Ray actor s | 2 Ray actors s | speed-up | over 1 actor | identical "
             "| peak RSS per worker, local / Ray MiB |", "|---|" + "---:|" * 10 + "---|---:|"]  # fmt: skip
    rss = lambda v: " + ".join(f"{x:.0f}" for x in v)  # noqa: E731
    same = lambda r: "yes" if all(r[f"{k}_identical"] for k in PARALLEL[1:]) else "NO"  # noqa: E731
    lines += [f"| {r['model']} | {r['points']} | {r['seq1_s']:.1f} | {r['local2_s']:.1f} | "
              f"{r['local2_speedup']:.2f}x | {r['ray2_s']:.1f} | {r['ray2_speedup']:.2f}x | {r['ray1up_s']:.1f} | "
              f"{r['ray2up_s']:.1f} | {r['ray2up_speedup']:.2f}x | {r['ray_scaling']:.2f}x | {same(r)} | "
              f"{rss(r['local2_worker_rss_mib'])} / {rss(r['ray2_worker_rss_mib'])} |" for r in rows]  # fmt: skip
    return "\n".join(lines)


LAYOUT_MODELS = ("resnet20", "mobilenet_v2", "resnet18")


def layout_rows(rounds: int, quick: bool, run: Run) -> list[dict[str, Any]]:
    """The exact sweep with contiguous and with channels-last images and weights, interleaved rounds: median
    seconds of each, speed-up, and how far the points move (the kernels sum in another order)."""
    out = []
    for name in LAYOUT_MODELS:
        timed: dict[str, list[dict[str, Any]]] = {}
        for _ in range(1 if quick else rounds):
            for kind in ("sweep", "sweep_cl"):
                timed.setdefault(kind, []).append(spawn(name, kind, quick, run))
        plain, last = median_round(timed["sweep"]), median_round(timed["sweep_cl"])
        a, b = points(plain), points(last)
        out.append(dict(model=name, points=len(a), contiguous_s=plain["seconds"], channels_last_s=last["seconds"],
                        speedup=plain["seconds"] / last["seconds"],
                        max_diff_accuracy=float((a.accuracy - b.accuracy).abs().max()),
                        max_diff_loss=float((a.loss - b.loss).abs().max())))  # fmt: skip
    return out


def layout_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | points | contiguous s | channels_last s | speed-up | max abs diff accuracy "
             "| max abs diff loss |", "|---|" + "---:|" * 6]  # fmt: skip
    lines += [f"| {r['model']} | {r['points']} | {r['contiguous_s']:.1f} | {r['channels_last_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['max_diff_accuracy']:.1e} | {r['max_diff_loss']:.1e} |" for r in rows]
    return "\n".join(lines)


def markdown(info: dict[str, Any], exact: list[dict[str, Any]], est: list[dict[str, Any]]) -> str:
    opt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    quick = " (quick smoke run: the numbers mean nothing)" if info["quick"] else ""
    where = f"{info['gpu'] or info['device']}" + (f", {info['autocast']} autocast" if info["autocast"] else "")
    lines = [f"torch {info['torch']}, torchvision {info['torchvision']}, {where}, {info['threads']} threads, "
             f"{info['rounds']} round(s) of naive / sweep{quick}", "",
             "| model | groups | points | naive s | sweep s | speed-up | suffix share "
             "| max abs diff accuracy | max abs diff loss |", "|---|" + "---:|" * 8]  # fmt: skip
    lines += [f"| {r['model']} | {r['groups']} | {r['points']} | {r['naive_s']:.1f} | {r['sweep_s']:.1f} | "
              f"{r['speedup']:.2f}x | "
              f"{opt(r['suffix_share'], '.0%')} | {r['max_diff_accuracy']:.1e} | {r['max_diff_loss']:.1e} |"
              for r in exact]  # fmt: skip
    lines += ["", "| model | peak RSS naive MiB | peak RSS sweep MiB | load + evaluate MiB |", "|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['rss_naive_mib']:.0f} | {r['rss_sweep_mib']:.0f} | {r['rss_load_mib']:.0f} |"
              for r in exact]  # fmt: skip
    lines += ["", "| model | points | exact s | estimate s | speed-up | Spearman(est. loss, exact loss) "
              "| Spearman(est. loss, exact accuracy drop) |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['model']} | {r['points']} | {r['exact_s']:.1f} | {r['estimate_s']:.2f} | {r['speedup']:.1f}x | "
              f"{r['rho_loss']:.2f} | {r['rho_acc_drop']:.2f} |" for r in est]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="prunecore sensitivity-sweep benchmark")
    parser.add_argument("--quick", action="store_true", help="2 groups, 2 levels, 50 images: only checks it runs")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of naive and sweep")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    parser.add_argument("--parallel-only", action="store_true",
                        help="only the workers section: 1 worker vs 2 local workers vs 2 Ray actors, 1 thread each")
    parser.add_argument("--no-parallel", action="store_true", help="skip the workers section")
    parser.add_argument("--layout-only", action="store_true",
                        help="only the memory-layout section: the exact sweep with and without channels_last")
    parser.add_argument("--device", default="cpu", help="where every sweep and naive-loop point runs (default cpu; "
                        "cuda: GPU figures, without the workers section)")  # fmt: skip
    parser.add_argument("--autocast", choices=("bf16", "fp16"), help="mixed-precision evaluation, sweep and naive")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: MODEL:KIND, run in a subprocess
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    run = Run(str(resolve_device(args.device)), args.autocast)
    if args.job:
        result = job(*args.job.split(":"), quick=args.quick, run=run)
        result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        args.out.write_text(json.dumps(result, default=str))
        return
    if args.layout_only:
        rows = layout_rows(args.rounds, args.quick, run)
        print("Memory layout:\n\n" + layout_markdown(rows))
        if args.json:
            args.json.write_text(json.dumps({"layout": rows}, indent=2, default=str))
        return
    cases = [(n, bn) for n in EXACT_MODELS for bn in ("", "_bn")] + [(LONG_SWEEP, "")]
    cases = [] if args.no_parallel or run.device != "cpu" else cases  # workers are CPU processes here
    parallel = []
    for n, bn in cases:  # the five ways in interleaved rounds, each keeping its median round
        timed_ways: dict[str, list[dict[str, Any]]] = {}
        for _ in range(1 if args.quick or n == LONG_SWEEP else args.rounds):
            for k in PARALLEL:
                timed_ways.setdefault(k, []).append(spawn(n, k + bn, args.quick, run))
        parallel.append(parallel_row(n, {k: median_round(v) for k, v in timed_ways.items()}, bool(bn)))
    if parallel:
        print("Workers (1 thread each):\n\n" + parallel_markdown(parallel) + "\n")
    if args.parallel_only:
        if args.json:
            args.json.write_text(json.dumps({"parallel": parallel}, indent=2, default=str))
        return
    timed: dict[tuple[str, str], list[dict[str, Any]]] = {}
    paired = ("naive", "sweep", "naive_bn", "sweep_bn")
    for _ in range(1 if args.quick else args.rounds):  # interleaved, so drift spoils no single ratio
        for name in EXACT_MODELS:
            for kind in paired:
                timed.setdefault((name, kind), []).append(spawn(name, kind, args.quick, run))
    runs = {n: {k: median_round(timed[n, k]) for k in paired} for n in EXACT_MODELS}
    for name in dict.fromkeys(EXACT_MODELS + SAMPLES):
        kinds = ["load"] if name in EXACT_MODELS else ["sweep"]
        kinds += ["estimate"] if name in SAMPLES else []
        runs.setdefault(name, {}).update({kind: spawn(name, kind, args.quick, run) for kind in kinds})
    exact = [exact_row(n, runs[n], s) for n in EXACT_MODELS for s in ("", "_bn")]
    est = [estimate_row(n, runs[n]["sweep"], runs[n]["estimate"]) for n in SAMPLES]
    info = dict(torch=torch.__version__, torchvision=torchvision.__version__, threads=torch.get_num_threads(),
                device=run.device, gpu=torch.cuda.get_device_name(run.device) if run.device != "cpu" else None,
                autocast=run.autocast,
                quick=args.quick, rounds=1 if args.quick else args.rounds, levels=list(LEVELS), metrics=METRICS,
                bn_batches=BN_BATCHES)  # fmt: skip
    layout = layout_rows(args.rounds, args.quick, run)
    print(markdown(info, exact, est) + "\n\nMemory layout:\n\n" + layout_markdown(layout))
    if args.json:
        args.json.write_text(json.dumps({**info, "exact": exact, "estimate": est, "parallel": parallel, "runs": runs,
                                         "layout": layout}, indent=2, default=str))  # fmt: skip
        print(f"\nJSON written to {args.json}")


if __name__ == "__main__":
    main()
