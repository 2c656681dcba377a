"""Hostile and careless input: every failure is one line and exit 2, nothing half-written, nothing run.

A corpus of the cases an outside probe found (a factory that raises, more classes than outputs,
`--out` at a folder or under a file, a full disk, plans whose inputs do not fit the model, raw
torch errors) plus hypothesis fuzzing of CLI arguments and data specs. The invariant everywhere:
the CLI returns 0 or 2 (argparse's own usage errors exit 2 too), never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from prunecore.cli import main
from prunecore.datasets import DataSpecError, load_data
from prunecore.errors import UserError
from prunecore.files import write_atomic
from prunecore.graph import trace
from prunecore.models import load_model
from prunecore.prune import make_plan

SPEC = "sample:resnet20"  # 1x28x28 digits, 10 classes


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of one in-process CLI call; argparse's SystemExit counts as its status."""
    try:
        status = main(args)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 2
    return status, capsys.readouterr().err


def assert_one_line_error(status: int, err: str, pattern: str = "") -> None:
    lines = [line for line in err.splitlines() if line and not line.startswith("prunecore: warning:")]
    assert status == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("prunecore: error: "), err
    if pattern:
        assert pattern in lines[0], err


@pytest.fixture(scope="module")
def plan_json(tmp_path_factory) -> Path:
    """A valid uniform 30 % plan for the sample model."""
    model = load_model(SPEC)
    x = torch.randn(1, 1, 28, 28)
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(make_plan(model, trace(model, x), 0.3).to_json())
    return path


def _edited_plan(plan_json: Path, tmp_path: Path, **inputs) -> Path:
    data = json.loads(plan_json.read_text())
    data["inputs"] = [{**data["inputs"][0], **inputs}]
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def _image_folder(root: Path, classes: int) -> Path:
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        Image.new("L", (28, 28), color=c * 20).save(root / f"class{c:02d}" / "a.png")
    return root


# -- the corpus ------------------------------------------------------------------------------------
def test_more_classes_than_outputs(tmp_path, capsys):
    folder = _image_folder(tmp_path / "digits", classes=11)
    status, err = run_cli(["evaluate", "--model", SPEC, "--data", f"imagefolder:{folder}"], capsys)
    assert_one_line_error(status, err, "class labels up to 10 but the model has 10 outputs")


@pytest.mark.parametrize("command", ["prune", "apply"])
def test_out_at_a_folder_or_under_a_file(tmp_path, plan_json, command, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    head = ["prune", "--model", SPEC, "--sparsity", "0.3"] if command == "prune" else ["apply", str(plan_json),
                                                                                       "--model", SPEC]  # fmt: skip
    status, err = run_cli([*head, "--out", str(tmp_path)], capsys)
    assert_one_line_error(status, err, "is a folder")
    status, err = run_cli([*head, "--out", str(afile / "pruned.pt")], capsys)
    assert_one_line_error(status, err, "is a file")
    assert afile.read_text() == "keep me"


def test_sweep_out_is_checked_before_the_sweep(tmp_path, capsys):
    store = tmp_path / "runs.db"
    args = ["sweep", "--model", SPEC, "--data", "sample", "--limit", "8", "--store", str(store), "--out", str(tmp_path)]
    status, err = run_cli(args, capsys)
    assert_one_line_error(status, err, "is a folder")
    assert not store.exists()  # refused before any work


def test_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, plan_json, monkeypatch, capsys):
    out = tmp_path / "pruned.pt"
    out.write_bytes(b"the previous model")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    status, err = run_cli(["apply", str(plan_json), "--model", SPEC, "--out", str(out)], capsys)
    assert_one_line_error(status, err, "the disk is full")
    assert out.read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.pt"]


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"shape": [100000, 3, 224, 224]}, "would take 56.1 GiB"),
        ({"dtype": "load"}, "dtype must be one of"),
        ({"shape": [1, 3, 28, 28]}, "ResNet20"),  # three channels into a one-channel stem
    ],
)
def test_plan_inputs_that_do_not_fit_the_model(tmp_path, plan_json, inputs, message, capsys):
    plan = _edited_plan(plan_json, tmp_path, **inputs)
    status, err = run_cli(["apply", str(plan), "--model", SPEC, "--out", str(tmp_path / "p.pt")], capsys)
    assert_one_line_error(status, err, message)
    assert not (tmp_path / "p.pt").exists()


def test_raw_torch_errors_name_the_model_step_and_inputs(capsys):
    status, err = run_cli(["inspect", "--model", SPEC, "--input", "1,3,28,28"], capsys)
    assert_one_line_error(status, err, "running ResNet20 on the example inputs failed at Conv2d module 'stem.0'")
    assert "[1, 3, 28, 28]" in err


@pytest.mark.parametrize(
    "args",
    [
        ["sweep", "--model", SPEC, "--data", "sample", "--groups", ","],
        ["sweep", "--model", SPEC, "--data", "sample", "--limit", "0"],
        ["evaluate", "--model", SPEC, "--data", "sample", "--bn-recalibration", "-1"],
        ["prune", "--model", SPEC, "--sparsity", "0.3", "--round-to", "0"],
        ["prune", "--model", SPEC, "--sparsity", "nan"],
        ["prune", "--model", SPEC, "--sparsity", "1.5"],
        ["inspect", "--model", "nosuchpackage.nets:build"],
        ["inspect", "--model", "torchvision:resnet1800"],
        ["inspect", "--model", "no-colon"],
        ["evaluate", "--model", SPEC, "--data", "imagefolder:/nonexistent"],
        ["evaluate", "--model", SPEC, "--data", "ftp://example.com"],
    ],
)
def test_bad_arguments_are_one_line(args, capsys):
    status, err = run_cli(args, capsys)
    assert_one_line_error(status, err)


def test_a_factory_that_raises_is_a_user_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "badnets.py").write_text("def build():\n    raise RuntimeError('no such layer size')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    status, err = run_cli(["inspect", "--model", "badnets:build", "--input", "1,3,8,8"], capsys)
    assert_one_line_error(status, err, "no such layer size")


# -- atomic writes ------------------------------------------------------------------------------------
def test_a_killed_write_leaves_nothing_once_written_again(tmp_path):
    """SIGKILL inside write_atomic: the target is untouched; the next write removes the orphan."""
    target = tmp_path / "plan.json"
    target.write_text("old")
    child = textwrap.dedent(
        f"""
        import time
        from prunecore.files import write_atomic
        def slow(f):
            f.write(b"half")
            f.flush()
            time.sleep(60)
        write_atomic({str(target)!r}, slow)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".plan.json.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob(".plan.json.*.tmp")), "the child never started writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert target.read_text() == "old"
    write_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    target = tmp_path / "x.json"
    mine = tmp_path / f".x.json.{os.getppid()}.abcd1234.tmp"  # a live process (our parent)
    mine.write_text("in flight")
    write_atomic(target, "done")
    assert mine.exists() and target.read_text() == "done"


# -- fuzzing ------------------------------------------------------------------------------------------
_COMMANDS = ["inspect", "prune", "apply", "evaluate", "allocate", "runs", "criteria", "methods", "bogus"]
_FLAGS = ["--model", "--input", "--sparsity", "--round-to", "--data", "--limit", "--out", "--budget", "--method",
          "--lock", "--exclude", "--metric", "--bn-recalibration", "--criterion", "--run", "--curves", "--plan",
          "--pruned", "--weights", "--export", "--delete", "--force", "--check", "--update"]  # fmt: skip
_VALUES = ["sample:resnet20", "sample:nope", "torchvision:nope", "x:y", ":", "", "0", "-1", "0.3", "1.5", "nan",
           "inf", "1,1,28,28", "1,0,28", "a,b", "flops=0.5", "params=2", "flops=-1", "dp", "greedy", "l1",
           "stem.0=0.5", "stem.0", "accuracy", "kl", "sample", "imagefolder:missing", "missing/x.json",
           "\x00", "é", "--", "-"]  # fmt: skip


@st.composite
def cli_args(draw) -> list[str]:
    args = [draw(st.sampled_from(_COMMANDS))]
    for _ in range(draw(st.integers(0, 6))):
        args.append(draw(st.sampled_from(_FLAGS)))
        if draw(st.booleans()):
            args.append(draw(st.sampled_from(_VALUES) | st.text(max_size=8)))
    return args


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=cli_args())
def test_fuzzed_cli_arguments_never_trace_back(args, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNECORE_STORE", str(tmp_path / "runs.db"))
    monkeypatch.chdir(tmp_path)
    args = args + ["--limit", "8"] * (args[0] == "evaluate")
    try:
        status = main(args)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        status = exc.code
    err = capsys.readouterr().err
    assert status in (0, 1, 2), err
    assert "Traceback" not in err


_NAME = st.text(alphabet="abcXYZ019_-: é", max_size=20)  # no '/', '.' or '~': names stay inside tmp_path


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.one_of(_NAME, st.builds(lambda s: f"imagefolder:{s}", _NAME)))
def test_fuzzed_data_specs_are_data_spec_errors(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        load_data(spec, input_shape=(1, 1, 28, 28), limit=4)
    except DataSpecError:
        pass


@pytest.mark.parametrize("layout", ["empty", "not-an-image", "one-class-no-files", "flat"])
def test_broken_image_folders(tmp_path, layout, capsys):
    root = tmp_path / "data"
    root.mkdir()
    if layout == "not-an-image":
        (root / "cat").mkdir()
        (root / "cat" / "x.png").write_text("not a png")
    elif layout == "one-class-no-files":
        (root / "cat").mkdir()
    elif layout == "flat":
        (root / "x.png").write_bytes(b"\x89PNG broken")
    status, err = run_cli(["evaluate", "--model", SPEC, "--data", f"imagefolder:{root}", "--limit", "4"], capsys)
    assert_one_line_error(status, err)


def test_every_prunecore_error_is_a_user_error():
    import prunecore

    errors = [getattr(prunecore, name) for name in prunecore.__all__ if name.endswith("Error")]
    assert len(errors) >= 8 and all(issubclass(e, UserError) for e in errors)
