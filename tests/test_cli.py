"""The prunecore command: reports, saved artefacts that rebuild, one-line errors."""

import re
import subprocess
import sys

import pytest
import torch

import toy_models as toys
from prunecore.cli import main
from prunecore.models import load_model
from prunecore.plan import Plan
from prunecore.surgery import apply_plan


def test_inspect_lists_groups(capsys):
    assert main(["inspect", "--model", "toy_models:Concat", "--input", "2,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert "Concat: 4 channel groups, 3 prunable" in out
    assert "reaches the model output" in out


def test_prune_check_and_rebuild(tmp_path, capsys):
    out_file = tmp_path / "pruned.pt"
    args = ["prune", "--model", "torchvision:resnet18", "--input", "1,3,32,32", "--sparsity", "0.5"]
    assert main(args + ["--round-to", "8", "--check", "--out", str(out_file)]) == 0
    report = capsys.readouterr().out
    assert "OK" in report and "MISMATCH" not in report
    plan = Plan.from_json((tmp_path / "pruned.plan.json").read_text())
    assert all(len(g.keep) % 8 == 0 for g in plan.groups.values())

    rebuilt = apply_plan(load_model("torchvision:resnet18"), plan)
    rebuilt.load_state_dict(torch.load(out_file, weights_only=True))
    assert rebuilt.conv1.out_channels == 32


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "--model", "torchvision:resnet1"], "torchvision has no classification model 'resnet1'"),
        (["inspect", "--model", "resnet18"], "must look like"),
        (["inspect", "--model", "no_such_pkg:f"], "cannot import 'no_such_pkg'"),
        (["inspect", "--model", "toy_models:nothing"], "has no callable 'nothing'"),
        (["inspect", "--model", "toy_models:DataDependent", "--input", "2,3,8,8"], "torch.fx could not trace DataDependent"),
        (["inspect", "--model", "toy_models:Concat"], "pass --input"),
        (["inspect", "--model", "sample:lenet"], "unknown sample model .lenet."),
        (["inspect", "--model", "toy_models:Concat", "--input", "2,5,8,8"], "failed at call_module"),
        (["prune", "--model", "toy_models:Concat", "--input", "2,3,8,8", "--sparsity", "1.0"], r"sparsity must be in \[0, 1\)"),
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
    assert main(["inspect", "--model", "toy_models:Concat", "--input", "2,3,8,8", "--weights", str(tmp_path / "x.pt")]) == 2
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
    listing = capsys.readouterr().out
    run_id = listing.split()[0]
    assert "sample:resnet20" in listing and "complete" in listing
    assert main(["runs", "--store", str(store), "--export", run_id, "--out", str(tmp_path / "c.parquet")]) == 0
    assert pd.read_parquet(tmp_path / "c.parquet").shape[0] == 3
    assert main(["runs", "--store", str(store), "--delete", run_id]) == 0
    capsys.readouterr()
    assert main(["runs", "--store", str(store)]) == 0
    assert "no stored sweeps" in capsys.readouterr().out


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
