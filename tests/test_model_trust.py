"""Pruned-model files are data: code named in one never runs unless the caller asks, edits are caught.

A file names its model by spec. `sample:`, `torchvision:` and `timm:` specs build registered
architectures; a `package.module:function` spec would import and call code, so `load_pruned`
refuses it (importing nothing) unless the caller names the same spec or passes `trust_code=True`.
Files in format /2 carry a SHA-256 over spec, plan and weights; format /1 files (no hash) still load.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from prunecore import make_plan, trace
from prunecore.models import DATA_SPEC_KINDS, ModelSpecError, load_model, load_pruned, save_pruned
from prunecore.plan import Plan
from prunecore.surgery import apply_plan

PROBE = "prunecore_trust_probe"  # a module written to tmp_path: importing or calling it leaves marker files
PROBE_SPEC = f"{PROBE}:build"
PROBE_SOURCE = textwrap.dedent(
    """
    from pathlib import Path

    from torch import nn

    HERE = Path(__file__).parent
    (HERE / "imported.marker").write_text("imported")


    def build():
        (HERE / "called.marker").write_text("called")
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    """
)


def _tiny_net() -> nn.Sequential:
    """The architecture the probe's `build` returns: two convolutions, one prunable 8-channel group."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))


def _markers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.marker"))


@pytest.fixture
def probe_file(tmp_path, monkeypatch) -> Path:
    """A real pruned-model file (half the channels kept) whose spec names the probe's factory.

    The probe module sits in tmp_path, importable in this process (sys.path) and in subprocesses
    (PYTHONPATH); it is built here from `_tiny_net`, so making the file imports nothing.
    """
    (tmp_path / f"{PROBE}.py").write_text(PROBE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PROBE, raising=False)  # and removed again after the test
    model = _tiny_net().eval()
    graph = trace(model, torch.randn(1, 3, 8, 8))
    plan = make_plan(model, graph, 0.5)
    path = save_pruned(tmp_path / "probe.pt", apply_plan(model, plan, graph=graph), plan, PROBE_SPEC)
    assert _markers(tmp_path) == [] and PROBE not in sys.modules
    return path


@pytest.fixture
def system_file(tmp_path) -> Path:
    """A hand-made format /1 file (no hash to check) naming `os:system` as its model."""
    path = tmp_path / "system.pt"
    torch.save({"format": "prunecore.pruned/1", "model": "os:system", "plan": "{}", "state_dict": {}}, path)
    return path


def _evaluate_cli(pruned: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`prunecore evaluate --pruned FILE` in a fresh interpreter that can import the probe module."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "prunecore.cli", "evaluate", "--model", "sample:resnet20",
               "--pruned", str(pruned), "--data", "sample", "--limit", "8"]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("which, spec", [("system_file", "os:system"), ("probe_file", PROBE_SPEC)])
def test_cli_refuses_code_named_in_a_file(request, tmp_path, which, spec):
    path = request.getfixturevalue(which)
    result = _evaluate_cli(path, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("prunecore: error: ") and f"names code {spec!r}" in lines[0]
    assert str(path) in lines[0] and "--trust-model-code" in lines[0]
    assert _markers(tmp_path) == []  # the probe module was neither imported nor called


def test_api_refuses_code_named_in_a_file_and_imports_nothing(probe_file, system_file):
    for path, spec in ((probe_file, PROBE_SPEC), (system_file, "os:system")):
        with pytest.raises(ModelSpecError) as info:
            load_pruned(path)
        message = str(info.value)
        assert len(message.splitlines()) == 1 and str(path) in message
        assert f"names code {spec!r}" in message and "does not run code named in a file" in message
        assert f"model={spec!r}" in message and "trust_code=True" in message
    assert _markers(probe_file.parent) == [] and PROBE not in sys.modules


def test_another_model_named_by_the_caller_does_not_allow_it(probe_file):
    with pytest.raises(ModelSpecError, match="the model you named is 'sample:resnet20'"):
        load_pruned(probe_file, model="sample:resnet20")
    assert _markers(probe_file.parent) == [] and PROBE not in sys.modules


@pytest.mark.parametrize("allow", [{"trust_code": True}, {"model": PROBE_SPEC}], ids=["trust_code", "same-spec"])
def test_code_runs_when_the_caller_allows_it(probe_file, allow):
    pruned, plan = load_pruned(probe_file, **allow)
    assert _markers(probe_file.parent) == ["called.marker", "imported.marker"]
    saved = torch.load(probe_file, weights_only=True)
    assert plan == Plan.from_json(saved["plan"])
    for name, tensor in pruned.state_dict().items():
        torch.testing.assert_close(tensor, saved["state_dict"][name], rtol=0, atol=0)
    assert pruned[0].out_channels == 4  # half of the 8 channels kept, the file's weights loaded


def test_user_typed_factory_spec_still_loads(probe_file):
    assert isinstance(load_model(PROBE_SPEC), nn.Sequential)
    assert _markers(probe_file.parent) == ["called.marker", "imported.marker"]


# -- integrity hash -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_file(tmp_path_factory) -> tuple[Path, torch.nn.Module, Plan]:
    """sample:resnet20 with every prunable group at 40 %, saved in the current format."""
    model = load_model("sample:resnet20")
    graph = trace(model, torch.randn(1, 1, 28, 28))
    plan = make_plan(model, graph, 0.4)
    pruned = apply_plan(model, plan, graph=graph).eval()
    path = save_pruned(tmp_path_factory.mktemp("hash") / "pruned.pt", pruned, plan, "sample:resnet20")
    return path, pruned, plan


def _assert_same(loaded: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = loaded.state_dict(), expected.state_dict()
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_saved_file_round_trips(sample_file):
    path, pruned, plan = sample_file
    loaded, loaded_plan = load_pruned(path)
    assert loaded_plan == plan
    _assert_same(loaded, pruned)


def test_file_without_hash_in_format_1_still_loads(tmp_path, sample_file):
    path, pruned, plan = sample_file
    payload = torch.load(path, weights_only=True)
    del payload["sha256"]
    torch.save({**payload, "format": "prunecore.pruned/1"}, tmp_path / "v1.pt")
    loaded, loaded_plan = load_pruned(tmp_path / "v1.pt")
    assert loaded_plan == plan
    _assert_same(loaded, pruned)


def _move_one_kept_index(plan_json: str) -> str:
    """The plan with one kept unit of a pruned group swapped for a dropped one: same counts, other units."""
    plan = json.loads(plan_json)
    group = next(g for g in plan["groups"].values() if len(g["keep"]) < g["size"])
    dropped = next(i for i in range(group["size"]) if i not in group["keep"])
    group["keep"] = sorted([*group["keep"][1:], dropped])
    return json.dumps(plan)


def _flip_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A copy with the bytes of its first element inverted; dtype and shape unchanged."""
    flipped = tensor.clone()
    flipped.view(-1)[:1].view(torch.uint8).bitwise_not_()
    return flipped


def _edit_weight(state: dict) -> dict:
    name = next(n for n, t in state.items() if t.is_floating_point() and t.dim() == 4)
    return {**state, name: _flip_bytes(state[name])}


@pytest.mark.parametrize(
    "edit",
    [
        lambda payload: {**payload, "plan": _move_one_kept_index(payload["plan"])},
        lambda payload: {**payload, "state_dict": _edit_weight(payload["state_dict"])},
        lambda payload: {**payload, "model": "sample:mobilenet_v2"},
    ],
    ids=["kept-index", "weight-bytes", "spec"],
)
def test_file_edited_after_saving_is_refused(tmp_path, sample_file, edit):
    payload = torch.load(sample_file[0], weights_only=True)
    torch.save(edit(payload), tmp_path / "edited.pt")
    with pytest.raises(ModelSpecError) as info:
        load_pruned(tmp_path / "edited.pt")
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(tmp_path / "edited.pt") in message
    assert "its plan or weights were changed after saving" in message


@pytest.mark.parametrize("kind", sorted(DATA_SPEC_KINDS))
def test_data_kinds_in_a_file_are_looked_up_not_refused(tmp_path, sample_file, kind):
    payload = torch.load(sample_file[0], weights_only=True)
    del payload["sha256"]
    torch.save({**payload, "format": "prunecore.pruned/1", "model": f"{kind}:nope"}, tmp_path / "other.pt")
    with pytest.raises(ModelSpecError, match="nope") as info:
        load_pruned(tmp_path / "other.pt")
    assert "names code" not in str(info.value)
