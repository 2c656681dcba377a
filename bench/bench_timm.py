"""timm zoo benchmark: how much of each timm model can prunecore prune, next to Torch-Pruning.

1. Coverage, for every model of `tests/timm_zoo.py` (`MODELS`; random init, `pretrained=False`,
   the smallest input each architecture accepts):
   - prunecore: `trace`, the share of parameters in tensors some prunable group shrinks, the
     fraction of parameters left after a uniform 50 % plan (`make_plan(model, graph, 0.5)` +
     `apply_plan`), and whether the pruned model matches the masked one (`timm_zoo.check`).
   - Torch-Pruning (`torch_pruning` 1.6): `BasePruner` with `MagnitudeImportance(p=1)`,
     `pruning_ratio=0.5`, local pruning, the classifier (`model.get_classifier()`) ignored and, for
     attention modules with a fused `qkv` Linear and a `num_heads` attribute, `num_heads` given
     (their `head_dim` / `attn_dim` are updated after the step). Then `pruner.step()` and one
     forward pass of the pruned model: the fraction of parameters left and ok / crash / timeout.
     Torch-Pruning has no masked reference, so "ok" only means the pruned model runs and gives
     an output of the right shape.
   A model is *pruned meaningfully* when the pruned model is ok and at least 40 % of its
   parameters are gone at 50 % of every group.
2. Engine speed on torchvision `resnet50` (random init, 1x3x224x224), median of 3:
   prunecore `trace` vs `tp.DependencyGraph().build_dependency`, and prunecore's prune of a
   uniform 50 % plan (`make_plan` + `apply_plan`, which returns a new model) vs Torch-Pruning's
   `pruner.step()` (in place, on a fresh copy each time; scoring included in both).

`--levels 0.3,0.5` checks pruned == masked at both sparsities, as the slow test does.

Run:
    .venv/bin/python bench/bench_timm.py                      # the whole zoo (slow: ~100 models)
    .venv/bin/python bench/bench_timm.py --models resnet10t,vit_tiny_patch16_224 --json out.json
    .venv/bin/python bench/bench_timm.py --quick              # a few tiny models, 1 rep: checks that it runs

Each model runs in this process, guarded by try/except and a per-model time limit (SIGALRM).
On a shared CPU only the ratios of one run mean anything. Prints Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import platform
import signal
import statistics
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import timm_zoo  # noqa: E402
from prunecore.graph import trace  # noqa: E402
from prunecore.prune import make_plan  # noqa: E402
from prunecore.surgery import apply_plan  # noqa: E402

QUICK_MODELS = ["test_resnet", "test_efficientnet", "test_vit", "test_convnext", "test_coatnet"]
MEANINGFUL_KEPT = 0.6  # at most 60 % of the parameters left = at least 40 % removed
HIGH_SHARE = 0.8
PRUNECORE_LIMIT_S = 300
TP_LIMIT_S = 120


class Timeout(BaseException):
    """Raised by SIGALRM; a BaseException so that the `except Exception` of a check lets it through."""


@contextlib.contextmanager
def time_limit(seconds: int):
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise Timeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:200]


@contextlib.contextmanager
def quiet():
    """Torch-Pruning prints and warns freely; keep the table readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# -- prunecore ------------------------------------------------------------------------------------
def run_prunecore(name: str, levels: tuple[float, ...] = (0.5,)) -> dict[str, Any]:
    try:
        with time_limit(PRUNECORE_LIMIT_S):
            res = timm_zoo.check(name, levels=levels)
    except Timeout as exc:
        return {"status": "timeout", "detail": str(exc)}
    return asdict(res)


# -- Torch-Pruning --------------------------------------------------------------------------------
def classifier_modules(model: nn.Module) -> list[nn.Module]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = head if isinstance(head, (tuple, list)) else [head]
    return [h for h in heads if isinstance(h, nn.Module)]


def qkv_attention(model: nn.Module) -> list[nn.Module]:
    """Attention modules with one fused qkv Linear and an int `num_heads` (timm's ViT family)."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
    ]


def run_torch_pruning(name: str) -> dict[str, Any]:
    import torch_pruning as tp

    row: dict[str, Any] = {"status": "crash", "kept": None, "detail": "", "seconds": 0.0}
    start = time.perf_counter()
    stage = "build"
    try:
        with time_limit(TP_LIMIT_S), quiet():
            model, x = timm_zoo.build(name)
            before = timm_zoo.count_params(model)
            attns = qkv_attention(model)
            stage = "pruner"
            pruner = tp.pruner.MagnitudePruner(
                model,
                example_inputs=x,
                importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=0.5,
                global_pruning=False,
                ignored_layers=classifier_modules(model),
                num_heads={m.qkv: m.num_heads for m in attns},
            )
            stage = "step"
            pruner.step()
            for m in attns:
                if hasattr(m, "head_dim"):
                    m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                if hasattr(m, "attn_dim"):
                    m.attn_dim = m.num_heads * m.head_dim
            row["kept"] = timm_zoo.count_params(model) / before
            stage = "forward"
            with torch.no_grad():
                out = model(x)
            if out.shape != (x.shape[0], timm_zoo.NUM_CLASSES):
                row["detail"] = f"output shape {tuple(out.shape)}"
            else:
                row["status"] = "ok"
    except Timeout as exc:
        row.update(status="timeout", detail=f"{stage}: {exc}")
    except Exception as exc:
        row["detail"] = f"{stage}: {first_line(exc)}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


# -- speed ----------------------------------------------------------------------------------------
def median_time(fn: Callable[[], Any], reps: int, setup: Callable[[], Any] | None = None) -> float:
    times = []
    for _ in range(reps):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn(arg) if setup else fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(reps: int) -> dict[str, float]:
    import torch_pruning as tp

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    graph = trace(model, x)
    res = {
        "prunecore_trace_s": median_time(lambda: trace(model, x), reps),
        "prunecore_prune_s": median_time(
            lambda: apply_plan(model, make_plan(model, graph, 0.5), mode="remove", graph=graph), reps
        ),
    }
    with quiet():
        res["tp_build_dependency_s"] = median_time(
            lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x), reps
        )

        def fresh_pruner():
            m = copy.deepcopy(model)
            return tp.pruner.MagnitudePruner(
                m,
                example_inputs=x,
                importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=0.5,
                global_pruning=False,
                ignored_layers=[m.fc],
            )

        res["tp_prune_s"] = median_time(lambda p: p.step(), reps, setup=fresh_pruner)
    res["trace_ratio"] = res["prunecore_trace_s"] / res["tp_build_dependency_s"]
    res["prune_ratio"] = res["prunecore_prune_s"] / res["tp_prune_s"]
    return res


# -- report ---------------------------------------------------------------------------------------
def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def status_cell(result: dict[str, Any]) -> str:
    detail = result.get("detail") or ""
    if result["status"] == "ok" or not detail:
        return result["status"]
    return f"{result['status']} ({detail[:60].replace('|', '/')})"


def meaningful_pc(row: dict[str, Any]) -> bool:
    pc = row["prunecore"]
    return pc.get("status") == "ok" and pc.get("params_kept_at_50", 1.0) <= MEANINGFUL_KEPT


def meaningful_tp(row: dict[str, Any]) -> bool:
    t = row["torch_pruning"]
    return t["status"] == "ok" and t["kept"] is not None and t["kept"] <= MEANINGFUL_KEPT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated timm model names (default: tests/timm_zoo.py MODELS)")
    ap.add_argument("--json", type=Path, help="also write every row and the speed numbers here")
    ap.add_argument("--quick", action="store_true", help="a few tiny timm test models, 1 rep of the speed part")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--levels", default="0.5", help="sparsities prunecore checks pruned == masked at (default 0.5)")
    ap.add_argument("--skip-speed", action="store_true", help="leave out the resnet50 speed comparison")
    ap.add_argument("--tp-from", type=Path, help="take the Torch-Pruning rows from an earlier --json of this bench "
                    "(they do not depend on prunecore) instead of running Torch-Pruning again")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import torch_pruning as tp
    import timm

    levels = tuple(float(v) for v in args.levels.split(","))
    names = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else timm_zoo.MODELS)
    print("# timm zoo: prunecore vs Torch-Pruning\n")
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, torch_pruning {tp.__version__}, "
        f"{args.threads} thread(s), {platform.machine()}; {len(names)} models, random init\n"
    )
    earlier = {}
    if args.tp_from:
        earlier = {r["model"]: r["torch_pruning"] for r in json.loads(args.tp_from.read_text())["rows"]}
        print(f"Torch-Pruning rows from {args.tp_from}\n")
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}", file=sys.stderr, flush=True)
        row: dict[str, Any] = {"model": name}
        try:
            row["prunecore"] = run_prunecore(name, levels)
        except Exception as exc:  # check() never raises; belt and braces
            row["prunecore"] = {"status": "crash", "detail": first_line(exc)}
        try:
            row["torch_pruning"] = earlier[name] if name in earlier else run_torch_pruning(name)
        except Exception as exc:
            row["torch_pruning"] = {"status": "crash", "kept": None, "detail": first_line(exc)}
        rows.append(row)

    print(
        "| model | params M | prunecore share % | prunecore kept@50 % | prunecore status "
        "| TP kept@50 % | TP status |"
    )
    print("|---|---:|---:|---:|---|---:|---|")
    for row in rows:
        pc, t = row["prunecore"], row["torch_pruning"]
        pc_kept = pct(pc.get("params_kept_at_50")) if pc.get("status") == "ok" else "-"
        print(
            f"| {row['model']} | {pc.get('params', 0) / 1e6:.2f} | {pct(pc.get('prunable_share'))} | {pc_kept} | "
            f"{status_cell(pc)} | {pct(t.get('kept'))} | {status_cell(t)} |"
        )

    n = len(rows)
    totals = {
        "models": n,
        "prunecore_ok": sum(r["prunecore"].get("status") == "ok" for r in rows),
        "prunecore_meaningful": sum(meaningful_pc(r) for r in rows),
        "prunecore_share_ge_80": sum(r["prunecore"].get("prunable_share", 0.0) >= HIGH_SHARE for r in rows),
        "tp_ok": sum(r["torch_pruning"]["status"] == "ok" for r in rows),
        "tp_meaningful": sum(meaningful_tp(r) for r in rows),
    }
    print(
        f"\n**Totals** ({n} models): prunes meaningfully (>= 40 % of params removed at 50 %, pruned model ok): "
        f"prunecore {totals['prunecore_meaningful']}/{n}, Torch-Pruning {totals['tp_meaningful']}/{n}. "
        f"prunecore pruned == masked on {totals['prunecore_ok']}/{n}; Torch-Pruning's pruned model runs on "
        f"{totals['tp_ok']}/{n}. prunecore models with >= 80 % of params in prunable groups: "
        f"{totals['prunecore_share_ge_80']}/{n}."
    )

    speeds = None
    if not args.skip_speed:
        reps = 1 if args.quick else 3
        try:
            speeds = speed(reps)
            print(f"\n## Engine speed: torchvision resnet50, 1x3x224x224, median of {reps}\n")
            print("| step | prunecore s | Torch-Pruning s | prunecore / TP |")
            print("|---|---:|---:|---:|")
            print(
                f"| trace / build_dependency | {speeds['prunecore_trace_s']:.3f} | "
                f"{speeds['tp_build_dependency_s']:.3f} | {speeds['trace_ratio']:.2f} |"
            )
            print(
                f"| prune 50 % (plan + apply / step) | {speeds['prunecore_prune_s']:.3f} | "
                f"{speeds['tp_prune_s']:.3f} | {speeds['prune_ratio']:.2f} |"
            )
        except Exception as exc:
            print(f"\nspeed comparison failed: {first_line(exc)}")

    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "totals": totals, "speed": speeds}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
