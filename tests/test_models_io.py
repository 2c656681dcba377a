"""Pruned-model files: a saved pruned model loads back identical; a bad file is refused by name."""

import dataclasses
import json

import pytest
import torch

import prunecore.models as models
from prunecore import make_plan, trace
from prunecore.models import PRUNED_FORMAT, ModelSpecError, load_model, load_pruned, save_pruned, write_atomic
from prunecore.plan import Plan, PlanError
from prunecore.surgery import apply_plan

SPEC = "sample:resnet20"


@pytest.fixture(scope="module")
def pruned_and_plan() -> tuple[torch.nn.Module, Plan]:
    """sample:resnet20 with every prunable group at 40%, its BatchNorm statistics perturbed.

    The perturbation makes the saved weights differ from anything `load_model` could rebuild, so
    a round trip that ignored the state_dict would fail.
    """
    model = load_model(SPEC)
    graph = trace(model, torch.randn(1, 1, 28, 28))
    plan = make_plan(model, graph, 0.4)
    pruned = apply_plan(model, plan, graph=graph)
    with torch.no_grad():
        for name, buffer in pruned.named_buffers():
            if name.endswith("running_mean"):
                buffer.add_(0.01)
    return pruned, plan


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pruned_and_plan) -> tuple[object, dict]:
    path = tmp_path_factory.mktemp("io") / "pruned.pt"
    save_pruned(path, *pruned_and_plan, SPEC)
    return path, torch.load(path, weights_only=True)


def test_round_trip_is_identical(saved, pruned_and_plan):
    pruned, plan = pruned_and_plan
    loaded, loaded_plan = load_pruned(saved[0])
    assert loaded_plan == plan
    assert not loaded.training
    expected, got = pruned.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned.eval()(x), rtol=0, atol=0)


def test_file_holds_plain_data(saved, pruned_and_plan):
    payload = saved[1]
    assert set(payload) == {"format", "model", "plan", "state_dict", "sha256"}
    assert payload["format"] == PRUNED_FORMAT == "prunecore.pruned/2" and payload["model"] == SPEC
    assert len(payload["sha256"]) == 64 and int(payload["sha256"], 16) >= 0
    assert Plan.from_json(payload["plan"]) == pruned_and_plan[1]


def _write(path, payload) -> object:
    torch.save(payload, path)
    return path


def _legacy(payload: dict) -> dict:
    """The payload as format /1 wrote it (no hash), so an edit to it is not caught as an edit."""
    return {**{k: v for k, v in payload.items() if k != "sha256"}, "format": "prunecore.pruned/1"}


@pytest.mark.parametrize(
    "corrupt, error, message",
    [
        (lambda p, good: p.write_bytes(b"not a torch file at all"), ModelSpecError, "is not readable"),
        (lambda p, good: p.write_bytes(good.read_bytes()[:5000]), ModelSpecError, "is not readable"),
        (lambda p, good: _write(p, torch.load(good)["state_dict"]), ModelSpecError, "holds a plain state_dict"),
        (lambda p, good: _write(p, [1, 2]), ModelSpecError, "holds a list, not a pruned model"),
        (lambda p, good: _write(p, {**torch.load(good), "format": "prunecore.pruned/9"}), ModelSpecError,
         "has format 'prunecore.pruned/9'"),
        (lambda p, good: _write(p, {**torch.load(good), "extra": 1}), ModelSpecError, "unknown keys"),
        (lambda p, good: _write(p, {k: v for k, v in torch.load(good).items() if k != "plan"}), ModelSpecError,
         "lacks"),
        (lambda p, good: _write(p, {**torch.load(good), "sha256": 5}), ModelSpecError,
         "'sha256' must be a str, got int"),
        (lambda p, good: _write(p, {**_legacy(torch.load(good)), "sha256": "0" * 64}), ModelSpecError,
         r"unknown keys \['sha256'\]"),
        (lambda p, good: _write(p, {**_legacy(torch.load(good)), "plan": "{"}), PlanError, "plan is not valid JSON"),
        (lambda p, good: _write(p, {**_legacy(torch.load(good)), "model": "sample:mobilenet_v2"}), PlanError,
         "plan is for a ResNet20, the model is a MobileNetV2"),
        (lambda p, good: _write(p, {**_legacy(torch.load(good)), "model": "sample:nope"}), ModelSpecError, "nope"),
        (lambda p, good: _write(p, {**_legacy(torch.load(good)), "model": "resnet20"}), ModelSpecError,
         "must look like"),
    ],
    ids=["garbage", "truncated", "plain-state-dict", "list", "format", "extra-key", "no-plan", "hash-type",
         "hash-in-v1", "bad-plan", "plan-for-other-model", "unknown-spec", "no-kind"],  # fmt: skip
)
def test_bad_file_is_refused_with_a_reason(tmp_path, saved, corrupt, error, message):
    bad = tmp_path / "bad.pt"
    corrupt(bad, saved[0])
    with pytest.raises(error, match=message) as info:
        load_pruned(bad)
    assert str(bad) in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_weights_that_do_not_fit_the_plan(tmp_path, saved, pruned_and_plan):
    payload = torch.load(saved[0])
    plan = json.loads(payload["plan"])
    group = plan["groups"]["layer3.1.conv1"]
    group["keep"] = list(range(group["size"]))  # the plan keeps every unit, the weights have fewer
    group.update(sparsity=0.0, channels_after=group["size"])
    bad = tmp_path / "bad.pt"
    save_pruned(bad, pruned_and_plan[0], Plan.from_json(json.dumps(plan)), SPEC)  # a consistent file, hash and all
    with pytest.raises(ModelSpecError, match="weights do not fit sample:resnet20 pruned by its plan"):
        load_pruned(bad)


def test_consistent_file_for_another_model_is_refused(tmp_path, pruned_and_plan):
    bad = save_pruned(tmp_path / "bad.pt", *pruned_and_plan, "sample:mobilenet_v2")
    with pytest.raises(PlanError, match="plan is for a ResNet20, the model is a MobileNetV2"):
        load_pruned(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_pruned(tmp_path / "absent.pt")


def test_failed_save_keeps_the_existing_file(tmp_path, saved, pruned_and_plan, monkeypatch):
    path = tmp_path / "pruned.pt"
    path.write_bytes(saved[0].read_bytes())

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(models.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(path, *pruned_and_plan, SPEC)
    monkeypatch.undo()
    assert path.read_bytes() == saved[0].read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["pruned.pt"]  # no temporary file left behind


def test_write_atomic_replaces_and_creates_folders(tmp_path):
    path = tmp_path / "a" / "b" / "plan.json"
    write_atomic(path, "first")
    write_atomic(path, b"second")
    write_atomic(path, lambda f: f.write(b"third"))
    assert path.read_text() == "third"
    assert sorted(p.name for p in path.parent.iterdir()) == ["plan.json"]


def test_plan_with_other_fingerprint_is_refused(tmp_path, pruned_and_plan):
    pruned, plan = pruned_and_plan
    bad = save_pruned(tmp_path / "bad.pt", pruned, dataclasses.replace(plan, fingerprint="0" * 16), SPEC)
    with pytest.raises(PlanError, match="fingerprint"):
        load_pruned(bad)
