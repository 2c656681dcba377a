"""The prunecore command: reports, saved artefacts that rebuild, one-line errors."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

import toy_models as toys
from prunecore import latency
from prunecore.allocate import list_methods
from prunecore.cli import main
from prunecore.cost import count
from prunecore.datasets import load_data
from prunecore.models import load_model, load_pruned
from prunecore.plan import MeasuredOn, Plan
from prunecore.store import RunStore
from prunecore.surgery import apply_plan


pytestmark = pytest.mark.usefixtures("one_thread")


def test_inspect_lists_groups(capsys):
    assert main(["inspect", "--model", "toy_models:Concat", "--input", "2,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert "Concat: 4 channel groups, 3 prunable" in out
    assert "reaches the model output" in out


def test_timm_spec_inspects_prunes_and_rebuilds(tmp_path, capsys):
    """`timm:NAME`: random init (nothing downloaded), the input shape from timm's config."""
    pytest.importorskip("timm")
    from prunecore.models import default_input_shape

    assert default_input_shape("timm:test_resnet") == (1, 3, 160, 160)
    assert main(["inspect", "--model", "timm:test_vit", "--input", "1,3,32,32"]) == 0
    assert "blocks.0.attn" in capsys.readouterr().out
    out_file = tmp_path / "pruned.pt"
    args = ["prune", "--model", "timm:test_resnet", "--input", "1,3,64,64", "--sparsity", "0.5", "--check"]
    assert main(args + ["--out", str(out_file)]) == 0
    rebuilt, plan = load_pruned(out_file)  # rebuilt from the spec the file records
    assert rebuilt.conv1[0].out_channels == len(plan.groups["conv1.0"].keep) < 16
    assert rebuilt(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_prune_check_and_rebuild(tmp_path, capsys):
    out_file = tmp_path / "pruned.pt"
    args = ["prune", "--model", "torchvision:resnet18", "--input", "1,3,32,32", "--sparsity", "0.5"]
    assert main(args + ["--round-to", "8", "--check", "--out", str(out_file)]) == 0
    report = capsys.readouterr().out
    assert "OK" in report and "MISMATCH" not in report
    plan = Plan.from_json((tmp_path / "pruned.plan.json").read_text())
    assert all(len(g.keep) % 8 == 0 for g in plan.groups.values())

    rebuilt, saved_plan = load_pruned(out_file)
    assert saved_plan == plan and rebuilt.conv1.out_channels == 32


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "--model", "torchvision:resnet1"], "torchvision has no classification model 'resnet1'"),
        (["inspect", "--model", "timm:resnet_nope"], "timm has no model 'resnet_nope' .did you mean resnet"),
        (["inspect", "--model", "resnet18"], "must look like"),
        (["inspect", "--model", "no_such_pkg:f"], "cannot import 'no_such_pkg'"),
        (["inspect", "--model", "toy_models:nothing"], "has no callable 'nothing'"),
        (["inspect", "--model", "toy_models:Concat"], "pass --input"),
        (["inspect", "--model", "sample:lenet"], "unknown sample model .lenet."),
        (["inspect", "--model", "toy_models:Concat", "--input", "2,5,8,8"], "failed at Conv2d module 'a.0'"),
        (["prune", "--model", "toy_models:Concat", "--input", "2,3,8,8", "--sparsity", "1.0"],
         r"sparsity must be in \[0, 1\)"),
        (["sweep", "--model", "sample:resnet20", "--data", "sample", "--limit", "8", "--device", "gpu0"],
         "device 'gpu0' is not a device torch knows"),
        (["sweep", "--model", "sample:resnet20", "--data", "sample", "--limit", "8", "--autocast", "fp16",
          "--device", "cpu"], "autocast 'fp16' runs on CUDA only"),
        (["evaluate", "--model", "sample:resnet20", "--data", "sample", "--limit", "8", "--device", "cuda:7"],
         "device 'cuda:7'"),
    ],
)
def test_bad_input_gives_one_line_error(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunecore: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err)


def test_corrupt_weights_file(tmp_path, capsys):
    good = tmp_path / "good.pt"
    torch.save(toys.Concat().state_dict(), good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:200])
    assert main(["inspect", "--model", "toy_models:Concat", "--input", "2,3,8,8", "--weights", str(bad)]) == 2
    assert "not a readable PyTorch weights file" in capsys.readouterr().err
    assert main(["inspect", "--model", "toy_models:Chunk", "--input", "2,3,8,8", "--weights", str(good)]) == 2
    assert "does not fit Chunk" in capsys.readouterr().err
    missing = str(tmp_path / "x.pt")
    assert main(["inspect", "--model", "toy_models:Concat", "--input", "2,3,8,8", "--weights", missing]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "prunecore.cli", "criteria"], capture_output=True, text=True, check=True
    )
    assert result.stdout.split()[0] == "bn_scale" and "taylor" in result.stdout


def test_sweep_and_runs(tmp_path, capsys):
    store, out = tmp_path / "runs.sqlite", tmp_path / "curves.csv"
    args = ["sweep", "--model", "sample:resnet20", "--data", "sample", "--limit", "50", "--levels", "0.5",
            "--groups", "stem.0,layer1.0.conv1", "--store", str(store), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = capsys.readouterr().out
    assert "accuracy (dense" in report and "layer1.0.conv1" in report
    import pandas as pd

    curves = pd.read_csv(out)
    assert list(curves.group) == ["(dense)", "stem.0", "layer1.0.conv1"]
    assert main(["runs", "--store", str(store)]) == 0
    head, row, footer = capsys.readouterr().out.splitlines()
    assert head.split() == ["run", "id", "age", "model", "data", "fp", "mode", "criterion", "levels", "groups",
                            "metrics", "state"]  # fmt: skip
    run_id = row.split()[0]
    info = RunStore(store).get(run_id)
    assert row.split() == [run_id, "just", "now", "sample:resnet20", info.data_fp[:8], "exact", "l1", "0.5", "2",
                           "accuracy,loss", "complete"]  # fmt: skip
    assert "allocate --run RUN_ID" in footer
    assert main(["runs", "--store", str(store), "--export", run_id, "--out", str(tmp_path / "c.parquet")]) == 0
    assert pd.read_parquet(tmp_path / "c.parquet").shape[0] == 3
    assert main(["runs", "--store", str(store), "--delete", run_id]) == 0
    capsys.readouterr()
    assert main(["runs", "--store", str(store)]) == 0
    assert "no stored sweeps" in capsys.readouterr().out
    assert main([*args, "--channels-last"]) == 0  # another layout: its own run, the same points to 1e-5
    capsys.readouterr()
    (stored,) = RunStore(store).runs()
    assert stored.config["channels_last"] is True
    again = pd.read_csv(out)
    assert (again.accuracy - curves.accuracy).abs().max() < 1e-5


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "sample", "--levels", "0.5,1.5"], r"levels must be sparsities in \[0, 1\)"),
        (["--data", "imagefolder:/nonexistent/folder"], "does not exist"),
        (["--data", "mnist"], "unknown data spec"),
        (["--data", "sample", "--metric", "acc"], "unknown metric"),
    ],
)
def test_sweep_bad_input(tmp_path, extra, message, capsys):
    assert main(["sweep", "--model", "sample:resnet20", "--store", str(tmp_path / "s.sqlite"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunecore: error: ") and re.search(message, err) and len(err.strip().splitlines()) == 1


# -- sweep -> allocate -> apply -> evaluate ---------------------------------------------------------
SPEC = "sample:resnet20"
SWEPT = "stem.0,layer2.0.conv2,layer3.0.conv2"  # the three residual streams: most of the MACs
QUICK = ["--limit", "200", "--bn-recalibration", "2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A run store holding one quick sweep of sample:resnet20 (3 groups x 2 levels)."""
    path = tmp_path_factory.mktemp("store") / "runs.db"
    args = ["sweep", "--model", SPEC, "--data", "sample", "--limit", "200", "--levels", "0.3,0.6",
            "--groups", SWEPT, "--store", str(path)]  # fmt: skip
    assert main(args) == 0
    return path


@pytest.fixture(scope="module")
def run(store) -> list[str]:
    """Arguments naming the stored sweep: it covers 3 of 12 groups, so allocate needs it named."""
    return ["--store", str(store), "--run", RunStore(store).runs()[0].run_id]


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory, run):
    """A dp plan for 60% of the MACs, measured on the sample data (allocate --evaluate)."""
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    args = ["allocate", "--model", SPEC, "--budget", "flops=0.6", "--method", "dp", *run,
            "--out", str(path), "--data", "sample", "--evaluate", *QUICK]  # fmt: skip
    assert main(args) == 0
    return path


def _one_line_error(capsys, message: str) -> None:
    lines = capsys.readouterr().err.splitlines(True)
    err = "".join(line for line in lines if not line.startswith("prunecore: warning:"))
    assert err.startswith("prunecore: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def _metric_rows(report: str) -> list[str]:
    return report[report.index("metric ") :].splitlines()[:3]


def test_allocate_apply_evaluate(tmp_path, store, plan_file, capsys):
    plan = Plan.from_json(plan_file.read_text())
    assert plan.model_name == SPEC and plan.allocation.method == "dp" and str(plan.allocation.budget) == "flops=0.6"
    assert set(plan.measured) == set(plan.predicted) == {"accuracy", "loss"}
    assert {n for n, g in plan.groups.items() if len(g.keep) < g.size} <= set(SWEPT.split(","))

    out = tmp_path / "pruned.pt"
    assert main(["apply", str(plan_file), "--model", SPEC, "--out", str(out), "--check"]) == 0
    report = capsys.readouterr().out
    assert "OK" in report and "MISMATCH" not in report
    pruned, saved_plan = load_pruned(out)
    assert saved_plan == plan
    dense, x = load_model(SPEC), torch.randn(1, 1, 28, 28)
    flops = count(pruned, x).flops
    assert flops == plan.totals.flops_after <= 0.6 * count(dense, x).flops
    expected = apply_plan(dense, plan).state_dict()
    for name, value in pruned.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)

    copy = tmp_path / "plan.json"
    copy.write_text(plan_file.read_text())
    evaluate = ["evaluate", "--model", SPEC, "--data", "sample", *QUICK]
    assert main([*evaluate, "--plan", str(copy), "--update"]) == 0
    by_plan = capsys.readouterr().out
    updated = Plan.from_json(copy.read_text())
    assert updated == plan  # the same measurement as allocate --evaluate: everything else kept
    assert main([*evaluate, "--pruned", str(out)]) == 0
    by_file = capsys.readouterr().out
    assert _metric_rows(by_file) == _metric_rows(by_plan)  # dense, predicted and measured agree
    assert _metric_rows(by_plan)[0].split() == ["metric", "dense", "predicted", "measured"]


def test_allocate_refine_measures_no_worse_than_the_plan_it_starts_from(tmp_path, run, plan_file, capsys):
    """On the data it refines on, the refined plan's measured loss is at most the dp plan's (same measuring)."""
    path = tmp_path / "refined.json"
    args = ["allocate", "--model", SPEC, "--budget", "flops=0.6", "--method", "dp", *run, "--out", str(path),
            "--data", "sample", "--evaluate", "--refine", "4", *QUICK]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert re.search(r"refined +\d+ measured moves on sample held-out digits .*, \d+ kept: loss ", printed)
    start, refined = Plan.from_json(plan_file.read_text()), Plan.from_json(path.read_text())
    assert refined.allocation.method == "dp+refine" and str(refined.allocation.budget) == "flops=0.6"
    assert refined.totals.flops_after <= 0.6 * refined.totals.flops_before
    assert refined.measured["loss"] <= start.measured["loss"]


def test_evaluate_update_adds_measured_metrics(tmp_path, plan_file):
    path = tmp_path / "plan.json"
    plan = dataclasses.replace(Plan.from_json(plan_file.read_text()), measured={}, measured_on=None)
    path.write_text(plan.to_json())
    assert main(["evaluate", "--model", SPEC, "--plan", str(path), "--data", "sample", "--limit", "100",
                 "--bn-recalibration", "0", "--metric", "accuracy", "--update"]) == 0  # fmt: skip
    updated = Plan.from_json(path.read_text())
    assert set(updated.measured) == {"accuracy"} and 0 <= updated.measured["accuracy"] <= 1
    assert updated.measured_on == MeasuredOn(load_data("sample", limit=100).description, 0)
    assert dataclasses.replace(updated, measured={}, measured_on=None) == plan


@pytest.mark.parametrize("method", list_methods())
def test_allocate_every_method_meets_the_budget(tmp_path, run, method):
    out = tmp_path / "plan.json"
    args = ["allocate", "--model", SPEC, "--budget", "params=0.85", "--method", method, *run]
    assert main([*args, "--out", str(out), "--lock", "layer1.0.conv1=0.25", "--exclude", "layer3.0.conv2"]) == 0
    plan = Plan.from_json(out.read_text())
    assert plan.totals.params_after <= 0.85 * plan.totals.params_before
    assert len(plan.groups["layer1.0.conv1"].keep) == 12 and plan.groups["layer3.0.conv2"].sparsity == 0


def test_allocate_from_a_run_id_or_a_curves_file(tmp_path, store, capsys):
    run_id = RunStore(store).runs()[0].run_id
    curves = tmp_path / "curves.parquet"
    assert main(["runs", "--store", str(store), "--export", run_id, "--out", str(curves)]) == 0
    plans = []
    for source in (["--run", run_id, "--store", str(store)], ["--curves", str(curves)]):
        out = tmp_path / "plan.json"
        assert main(["allocate", "--model", SPEC, "--budget", "flops=0.6", *source, "--out", str(out)]) == 0
        plans.append(Plan.from_json(out.read_text()))
    report = capsys.readouterr().out
    assert f"curves     run {run_id}" in report and f"curves     file {curves}" in report
    assert plans[0].groups == plans[1].groups and plans[0].totals == plans[1].totals
    assert plans[0].totals.flops_after <= 0.6 * plans[0].totals.flops_before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--run", "0123456789abcdef"], "unknown run id '0123456789abcdef'"),
        (["--budget", "flops=0.05"], "budget flops=0.05 cannot be met"),
        (["--budget", "flops:0.5"], "budget must look like flops=0.5"),
        (["--budget", "flops=half"], "budget value must be a number"),
        (["--lock", "stem.0"], "--lock must look like group=sparsity"),
        (["--lock", "stem.0=1.5"], r"locked sparsity of 'stem.0' must be a number in \[0, 1\)"),
        (["--lock", "nothing=0.5"], "no channel group named 'nothing'"),
        (["--evaluate"], "--evaluate and --data go together"),
        (["--refine", "3"], "--refine measures plans: give it --data SPEC"),
        (["--curves", "/nonexistent/curves.csv"], "curves file '/nonexistent/curves.csv' does not exist"),
        (["--metric", "kl"], "the curves have no 'kl' column"),
    ],
)
def test_allocate_bad_input(tmp_path, store, run, extra, message, capsys):
    out = tmp_path / "p.json"
    source = ["--store", str(store)] if {"--run", "--curves"} & set(extra) else run
    args = ["allocate", "--model", SPEC, "--budget", "flops=0.6", *source, "--out", str(out)]
    assert main([*args, *extra]) == 2
    _one_line_error(capsys, message)
    assert not out.exists()


def test_allocate_meets_a_latency_budget_and_names_the_smallest_reachable_one(tmp_path, run, capsys, monkeypatch):
    monkeypatch.setattr(latency, "FRACTIONS", (0.5, 1.0))  # small tables: what is tested is the path, not the timing
    out = tmp_path / "p.json"
    args = ["allocate", "--model", SPEC, "--method", "greedy", *run, "--out", str(out), "--runtime", "torch"]
    assert main([*args, "--budget", "latency=1e6"]) == 0  # met by the dense model
    report = capsys.readouterr().out
    dense = float(re.search(r"dense ([0-9.e+-]+) ms", report).group(1))
    assert "whole-model timings (median error" in report
    assert main([*args, "--budget", f"latency={0.9 * dense}ms", "--guide", "latency"]) == 0  # timings: the store's
    report = capsys.readouterr().out
    plan = Plan.from_json(out.read_text())
    assert plan.allocation.budget.kind == "latency" and plan.allocation.budget.value == pytest.approx(0.9 * dense)
    predicted = float(re.search(r"the plan ([0-9.e+-]+) ms \(predicted\)", report).group(1))
    assert predicted <= float(f"{0.9 * dense:.3g}")  # both printed to 3 digits, and rounding keeps the order
    assert any(g.sparsity > 0 for g in plan.groups.values())
    out.unlink()
    assert main([*args, "--budget", "latency=1e-6"]) == 2
    _one_line_error(capsys, r"budget latency=1e-06 ms cannot be met: the smallest reachable latency is [0-9.]+ ms")
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--budget", "latency=5", "--runtime", "tensorrt"], "unknown latency runtime 'tensorrt'; choose from"),
    (["--budget", "flops=0.5", "--batch", "8"], "--runtime, --batch and --guide go with a latency budget"),
    (["--budget", "flops=0.5", "--guide", "latency"], "--runtime, --batch and --guide go with a latency budget"),
    (["--budget", "latency=fast"], "budget value must be a number, got 'fast'"),
    pytest.param(["--budget", "latency=5", "--runtime", "torch-cuda"], "runtime 'torch-cuda' times on a CUDA GPU, "
                 "and torch sees none on this machine", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                               reason="checks a machine without GPU")),
])  # fmt: skip
def test_allocate_latency_bad_input(tmp_path, run, extra, message, capsys):
    out = tmp_path / "p.json"
    assert main(["allocate", "--model", SPEC, *run, "--out", str(out), *extra]) == 2
    _one_line_error(capsys, message)
    assert not out.exists()


def test_allocate_without_a_stored_sweep(tmp_path, capsys):
    args = ["allocate", "--model", SPEC, "--budget", "flops=0.5", "--store", str(tmp_path / "runs.db")]
    assert main([*args, "--out", str(tmp_path / "p.json")]) == 2
    _one_line_error(capsys, "no complete sweep of every prunable group of sample:resnet20 .* run `prunecore sweep")


def test_allocate_does_not_take_a_partial_sweep_unasked(tmp_path, store, run, capsys):
    """The stored sweep covers 3 of 12 groups: allocate names it and asks for --run instead of pruning 3 groups."""
    out = tmp_path / "p.json"
    args = ["allocate", "--model", SPEC, "--budget", "flops=0.6", "--out", str(out)]
    assert main([*args, "--store", str(store)]) == 2
    _one_line_error(capsys, rf"swept 3 of its 12 prunable groups, pass --run {run[-1]} to use it anyway")
    assert not out.exists()
    assert main([*args, *run]) == 0
    assert "did not sweep 9 prunable group(s)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "levels, text",
    [([0.1, 0.3, 0.5, 0.7, 0.9], "0.1..0.9/0.2"), ([round(0.1 * i, 1) for i in range(1, 10)], "0.1..0.9/0.1"),
     ([0.3, 0.6], "0.3,0.6"), ([0.1, 0.2, 0.5, 0.9], "0.1,0.2,0.5,0.9")],
)  # fmt: skip
def test_runs_show_their_levels(levels, text):
    from prunecore.cli import _level_range

    assert _level_range(levels) == text


@pytest.mark.parametrize(
    "created, age",
    [("2026-01-10T12:00:00+00:00", "just now"), ("2026-01-10T11:57:00+00:00", "3 min ago"),
     ("2026-01-10T07:00:00+00:00", "5 h ago"), ("2026-01-09T11:00:00+00:00", "1 day ago"),
     ("2026-01-08T12:00:00", "2 days ago"), ("not a time", "not a time")],
)  # fmt: skip
def test_runs_show_their_age(created, age):
    from datetime import datetime, timezone

    from prunecore.cli import _age

    assert _age(created, datetime(2026, 1, 10, 12, 0, 30, tzinfo=timezone.utc)) == age


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--model", "sample:resnet20", "--sparsity", "0.3", "--criterion", "l3"],
         "unknown criterion 'l3'; choose one of bn_scale, l1"),
        (["sweep", "--model", "sample:resnet20", "--data", "sample", "--criterion", "l3"], "unknown criterion 'l3'"),
        (["allocate", "--model", "sample:resnet20", "--budget", "flops=0.5", "--out", "p.json", "--method", "best"],
         "unknown allocation method 'best'; choose one of"),
    ],
)  # fmt: skip
def test_unknown_criterion_or_method_is_one_line(args, message, capsys, tmp_path, monkeypatch):
    """Checked when the command runs (the parser does not import the registries), still one line."""
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    _one_line_error(capsys, message)


def test_help_imports_neither_torch_nor_the_engine():
    """`prunecore --help` (and a usage error) only build the parser: no torch, pandas or engine import."""
    code = (
        "import sys\n"
        "from prunecore.cli import main\n"
        "for argv in (['--help'], ['sweep', '--help'], ['allocate', '--help'], ['prune']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('torch', 'pandas', 'numpy', 'prunecore.graph', 'prunecore.cost', 'prunecore.allocate')\n"
        "sys.stderr.write(repr(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stderr.endswith("[]"), result.stderr
    assert "--criterion CRITERION" in result.stdout and "prunecore criteria" in result.stdout


def test_sweep_help_states_the_default_levels(capsys):
    """The parser cannot import sensitivity.DEFAULT_LEVELS (torch), so its help states them: keep them equal."""
    from prunecore.sensitivity import DEFAULT_LEVELS

    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "(default: 0.1 to 0.9 by 0.1)" in " ".join(capsys.readouterr().out.split())
    assert list(DEFAULT_LEVELS) == [round(0.1 * i, 1) for i in range(1, 10)]


def test_every_public_name_resolves_lazily():
    """`prunecore/__init__.py` imports on first use; every name in __all__ is the object of its module."""
    import importlib

    import prunecore as pc

    for name in pc.__all__:
        module, attribute = pc._LAZY[name]
        assert getattr(pc, name) is getattr(importlib.import_module(f"prunecore.{module}"), attribute), name
    from prunecore import register_handler, trace

    assert trace is pc.trace and register_handler is sys.modules["prunecore.ops"].register
    for name in ("prune", "evaluate", "allocate"):  # named like their modules, which are imported by now
        assert pc.__dict__[name] is getattr(sys.modules[f"prunecore.{name}"], name)
    assert set(pc.__all__) <= set(dir(pc)) and pc.cost is sys.modules["prunecore.cost"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pc.nothing


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list_methods()


def test_apply_refuses_a_bad_plan(tmp_path, plan_file, capsys):
    bad, out = tmp_path / "bad.json", tmp_path / "pruned.pt"
    bad.write_text(plan_file.read_text()[:-20])
    assert main(["apply", str(bad), "--model", SPEC, "--out", str(out)]) == 2
    _one_line_error(capsys, "bad.json': plan is not valid JSON")
    assert main(["apply", str(tmp_path / "none.json"), "--model", SPEC, "--out", str(out)]) == 2
    _one_line_error(capsys, "none.json' does not exist")
    assert main(["apply", str(plan_file), "--model", "sample:mobilenet_v2", "--out", str(out)]) == 2
    _one_line_error(capsys, "plan is for a ResNet20, the model is a MobileNetV2")
    data = json.loads(plan_file.read_text())
    data["totals"]["flops_after"] += 1
    bad.write_text(json.dumps(data))
    assert main(["apply", str(bad), "--model", SPEC, "--out", str(out)]) == 2
    _one_line_error(capsys, "the pruned model has .* MACs, the plan's totals say")
    assert not out.exists()


def test_apply_other_fingerprint_needs_force(tmp_path, plan_file, capsys):
    edited, out = tmp_path / "edited.json", tmp_path / "pruned.pt"
    data = json.loads(plan_file.read_text())
    data["model"]["fingerprint"] = "0123456789abcdef"
    edited.write_text(json.dumps(data))
    assert main(["apply", str(edited), "--model", SPEC, "--out", str(out)]) == 2
    _one_line_error(capsys, "fingerprint is 0123456789abcdef.*pass --force")
    assert not out.exists()
    assert main(["apply", str(edited), "--model", SPEC, "--out", str(out), "--force"]) == 0
    pruned, plan = load_pruned(out)  # the saved plan records the model it was really applied to
    assert plan.meta["forced_from_fingerprint"] == "0123456789abcdef"
    assert plan.groups == Plan.from_json(plan_file.read_text()).groups


def test_apply_export(tmp_path, plan_file, capsys, monkeypatch):
    out, program = tmp_path / "pruned.pt", tmp_path / "program.pt2"
    args = ["apply", str(plan_file), "--model", SPEC, "--out", str(out), "--export", str(program)]
    assert main(args) == 0
    assert "for input Bx1x28x28, any batch size B" in capsys.readouterr().out
    pruned, _ = load_pruned(out)
    exported = torch.export.load(program).module()
    for batch in (1, 4):  # the plan's example has batch 1; the program takes any batch size
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), pruned(x))

    def fail(*args, **kwargs):
        raise RuntimeError("data-dependent control flow\nmore detail")

    monkeypatch.setattr(torch.export, "export", fail)
    out.unlink()
    program.unlink()
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.startswith("prunecore: warning: torch.export could not export") and "data-dependent" in err
    assert len(err.strip().splitlines()) == 1
    assert out.exists() and not program.exists()


def test_apply_export_falls_back_to_a_fixed_batch(tmp_path, plan_file, capsys, monkeypatch):
    """A model whose batch size export cannot make dynamic is exported for the example's shape, with a warning."""
    out, program = tmp_path / "pruned.pt", tmp_path / "program.pt2"
    export = torch.export.export

    def static_only(module, args, kwargs=None, *, dynamic_shapes=None, **rest):
        if dynamic_shapes is not None:
            raise RuntimeError("Constraints violated (batch0)! more detail")
        return export(module, args, kwargs, **rest)

    monkeypatch.setattr(torch.export, "export", static_only)
    assert main(["apply", str(plan_file), "--model", SPEC, "--out", str(out), "--export", str(program)]) == 0
    captured = capsys.readouterr()
    assert "for input 1x1x28x28, this batch size only" in captured.out
    assert captured.err.startswith("prunecore: warning: ") and "fixed to the example's batch size" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    pruned, _ = load_pruned(out)
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(program).module()(x), pruned(x))


def test_evaluate_update_needs_a_plan(tmp_path, capsys):
    args = ["evaluate", "--model", SPEC, "--data", "sample", "--pruned", str(tmp_path / "p.pt"), "--update"]
    assert main(args) == 2
    _one_line_error(capsys, "--update writes the measured metrics into a plan file")


def test_sweep_calibrate_stores_a_predictor_that_allocate_predicts_and_allocates_with(tmp_path, capsys):
    import prunecore as pc
    from prunecore.predict import Predictor

    store = tmp_path / "runs.db"
    args = ["sweep", "--model", SPEC, "--data", "sample", "--limit", "64", "--levels", "0.3,0.6", "--groups", SWEPT,
            "--store", str(store), "--calibrate", "10"]  # fmt: skip
    assert main(args) == 0
    assert re.search(r"calibrated on \d+ plans measured in \d+ s", capsys.readouterr().out)
    [run] = RunStore(store).runs()
    predictor = Predictor.from_dict(RunStore(store).get_predictor(run.run_id))
    assert set(predictor.groups) == set(SWEPT.split(",")) and predictor.plans >= 10

    base = ["allocate", "--model", SPEC, "--run", run.run_id, "--store", str(store), "--budget", "flops=0.6"]
    assert main([*base, "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert f"predicted  by the predictor fitted on {predictor.plans} measured plans" in out
    assert re.search(r"^band       accuracy \d+\.\d\d% to \d+\.\d\d%", out, re.M)
    plan = Plan.from_json((tmp_path / "p.json").read_text())
    model = load_model(SPEC)
    problem = pc.allocation_problem(RunStore(store).points(run.run_id), pc.trace(model, torch.randn(1, 1, 28, 28)),
                                    model)  # fmt: skip
    assert plan.predicted == pc.with_predictor(problem, predictor).predict(plan.sparsities)
    assert main([*base, "--additive", "--out", str(tmp_path / "a.json")]) == 0
    assert "predicted  by adding up each group's own curve" in capsys.readouterr().out
    additive = Plan.from_json((tmp_path / "a.json").read_text())
    assert additive.predicted == problem.predict(additive.sparsities)

    assert main(["sweep", "--model", SPEC, "--data", "sample", "--limit", "64", "--levels", "0.3", "--groups", "stem.0",
                 "--store", str(store), "--mode", "estimate", "--calibrate", "10"]) == 2  # fmt: skip
    assert "--calibrate measures plans: use it with --mode exact" in capsys.readouterr().err


# -- recovery ---------------------------------------------------------------------------------------
TOY = ["--model", "toy_models:TwoResiduals"]
RANDOM = ["--data", "random", "--limit", "32"]  # label-free: fine-tuning distils from the dense model alone


def test_finetune_writes_a_model_load_pruned_reads_and_never_overwrites_its_checkpoint(tmp_path, capsys):
    pruned = tmp_path / "p.pt"
    assert main(["prune", *TOY, "--input", "2,3,8,8", "--sparsity", "0.5", "--out", str(pruned)]) == 0
    out = tmp_path / "r.pt"
    command = ["finetune", str(pruned), *TOY, *RANDOM, "--epochs", "2", "--out", str(out)]
    assert main(command) == 0
    report = capsys.readouterr().out
    assert "epoch 1 " in report and "epoch 2 " in report and "kl" in report
    before, plan = load_pruned(pruned, model="toy_models:TwoResiduals")
    after, tuned_plan = load_pruned(out, model="toy_models:TwoResiduals")
    assert tuned_plan.groups == plan.groups and set(tuned_plan.measured) == {"kl", "agreement"}
    assert before.state_dict().keys() == after.state_dict().keys()
    assert any(not torch.equal(v, after.state_dict()[k]) for k, v in before.state_dict().items())
    checkpoint = tmp_path / "r.finetune.pt"
    saved = checkpoint.read_bytes()
    assert main(command) == 2
    assert "exists: pass resume=True (--resume)" in capsys.readouterr().err and checkpoint.read_bytes() == saved
    assert main([*command, "--resume"]) == 0  # both epochs done: nothing left to train
    again, _ = load_pruned(out, model="toy_models:TwoResiduals")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.state_dict().items())


def test_prune_iterative_reaches_the_budget_and_saves_the_final_model_with_its_composed_plan(tmp_path, capsys):
    out = tmp_path / "it.pt"
    assert main(["prune-iterative", *TOY, "--input", "2,3,8,8", "--budget", "flops=0.5", "--steps", "2",
                 "--levels", "0.25,0.5", *RANDOM, "--out", str(out)]) == 0  # fmt: skip
    report = capsys.readouterr().out
    assert "step 1/2" in report and "step 2/2" in report
    model, plan = load_pruned(out, model="toy_models:TwoResiduals")
    assert Plan.from_json((tmp_path / "it.plan.json").read_text()) == plan
    dense = toys.TwoResiduals()
    x = torch.randn(2, 3, 8, 8)
    assert count(model, x).flops <= 0.5 * count(dense, x).flops
    assert count(apply_plan(dense, plan), x).flops == count(model, x).flops
