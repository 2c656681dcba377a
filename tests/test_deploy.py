"""ONNX export of pruned models, checked in ONNX Runtime, and their INT8 versions."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunecore as pc
from prunecore import deploy
from prunecore.cli import main
from prunecore.datasets import EvalData
from prunecore.deploy import DeployError, OnnxModule, deploy_onnx, export_onnx, onnx_session, quantize_int8
from prunecore.evaluate import output_logits

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_thread")


def pruned_sample(name: str, sparsity: float = 0.3) -> tuple[pc.Sample, nn.Module]:
    sample = pc.load_sample(name)
    pruned = pc.recalibrate_bn_(pc.prune(sample.model, sample.example, sparsity), sample.calibration, batches=2)
    return sample, pruned.eval()


def run(path, x: torch.Tensor) -> np.ndarray:
    session = onnx_session(path)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name", pc.list_samples())
def test_every_sample_exports_with_a_dynamic_batch_and_equals_pytorch(name, tmp_path):
    sample, pruned = pruned_sample(name)
    exported = export_onnx(pruned, sample.example, tmp_path / "m.onnx")
    assert exported.dynamic_batch and exported.batch_sizes == (2, 5) and exported.max_abs_diff < 1e-4
    shape = (7, *sample.example.shape[1:])  # a batch size the export never saw
    if sample.example.dtype == torch.long:  # tinylm: byte ids; its logits are (7, 128, 256)
        x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0))
    else:
        x = torch.randn(shape)
    with torch.no_grad():
        expected = output_logits(pruned(x)).numpy()
    np.testing.assert_allclose(run(exported.path, x), expected, rtol=1e-3, atol=1e-4)


class Cummax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=1)[0]


class FixedBatch(nn.Module):
    """Code that fixes the batch size: exported for the example's shape only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(4, 8))


def test_an_op_without_an_onnx_translation_is_named_and_nothing_is_written(tmp_path):
    with pytest.raises(DeployError, match=r"Cummax does not export to ONNX: op aten.cummax cannot be translated"):
        export_onnx(Cummax(), torch.randn(2, 8), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_a_model_that_fixes_its_batch_exports_for_the_example_only(tmp_path):
    model = FixedBatch().eval()
    exported = export_onnx(model, torch.randn(4, 8), tmp_path / "m.onnx")
    assert not exported.dynamic_batch and exported.batch_sizes == (4,)
    x = torch.randn(4, 8)
    np.testing.assert_allclose(run(exported.path, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_export_runs_the_model_in_eval_mode_and_leaves_its_training_flags(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3))
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 8))  # running statistics away from their defaults
    exported = export_onnx(model, torch.randn(4, 8), tmp_path / "m.onnx")
    assert all(m.training for m in model.modules())
    x = torch.randn(6, 8)
    with torch.no_grad():
        expected = model.eval()(x).numpy()  # eval mode: running statistics, no dropout
    np.testing.assert_allclose(run(exported.path, x), expected, rtol=1e-4, atol=1e-5)


def test_int8_keeps_the_pruned_models_accuracy(tmp_path):
    sample, pruned = pruned_sample("resnet20", 0.2)
    exported = export_onnx(pruned, sample.example, tmp_path / "m.onnx")
    static = quantize_int8(exported.path, tmp_path / "static.onnx", sample.calibration, batches=4)
    dynamic = quantize_int8(exported.path, tmp_path / "dynamic.onnx")
    x, y = next(iter(sample.heldout))  # 250 held-out digits
    float_acc = (pruned(x).argmax(1) == y).float().mean().item()
    for path in (static, dynamic):
        assert (run(path, x).argmax(1) == y.numpy()).mean() >= float_acc - 0.02, path.name
    assert static.stat().st_size < 0.5 * exported.path.stat().st_size  # INT8 weights
    with pytest.raises(DeployError, match="does not exist"):
        quantize_int8(tmp_path / "missing.onnx", tmp_path / "q.onnx")


class TinyTokens(nn.Module):
    """Token ids in, logits per token out: what `deploy_onnx` treats as a language model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(16, 8), nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))  # (B, T, 16)


def _images(n: int = 16) -> EvalData:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    return EvalData(loader, loader, True, f"{n} random images")


def test_deploy_onnx_quantises_images_statically_on_the_calibration_data_and_tokens_dynamically(tmp_path,
                                                                                              monkeypatch):
    calibrations = []
    real = deploy.quantize_int8
    monkeypatch.setattr(deploy, "quantize_int8", lambda src, out, calibration=None: calibrations.append(calibration)
                        or real(src, out, calibration))  # fmt: skip
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 4)).eval()
    data, example = _images(), torch.randn(2, 3, 8, 8)
    static = deploy_onnx(cnn, example, tmp_path / "cnn.onnx", tmp_path / "cnn.int8.onnx", data)
    assert static.int8 == tmp_path / "cnn.int8.onnx" and static.int8.is_file() and static.onnx.path.is_file()
    assert static.mode == "static, calibrated on 16 random images" and calibrations == [data.calibration]
    assert static.max_abs_diff == static.onnx.max_abs_diff < 1e-4
    with torch.no_grad():  # the INT8 file runs and stays near the float model
        np.testing.assert_allclose(OnnxModule(static.int8)(example).numpy(), cnn(example).numpy(), atol=0.1)
    dynamic = deploy_onnx(cnn, example, tmp_path / "cnn2.onnx", tmp_path / "cnn2.int8.onnx")
    assert dynamic.mode == "dynamic: weights INT8, activations quantised per batch" and calibrations[1] is None
    tokens = deploy_onnx(TinyTokens().eval(), torch.randint(0, 16, (2, 5)), tmp_path / "lm.onnx",
                         tmp_path / "lm.int8.onnx", data)  # fmt: skip
    assert tokens.mode == "dynamic: weights INT8, activations quantised per batch (a language model)"
    assert calibrations[2] is None and tokens.int8.is_file()
    only = deploy_onnx(cnn, example, tmp_path / "only.onnx")
    assert (only.int8, only.mode, len(calibrations)) == (None, "", 3) and only.onnx.path.is_file()


def test_a_missing_runtime_is_said_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(DeployError) as caught:
        deploy_onnx(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "m.onnx", tmp_path / "m.int8.onnx")
    assert str(caught.value) == ("ONNX export and INT8 need onnx, onnxscript and onnxruntime: "
                                 "pip install 'prunecore[deploy]'")  # not repeated by the fixed-shape retry
    assert not list(tmp_path.iterdir())


def test_cli_apply_writes_a_checked_onnx_file(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    sample, _ = pruned_sample("resnet20")
    plan.write_text(pc.make_plan(sample.model, pc.trace(sample.model, sample.example), 0.3).to_json())
    out = tmp_path / "m.onnx"
    assert main(["apply", str(plan), "--model", "sample:resnet20", "--out", str(tmp_path / "p.pt"),
                 "--onnx", str(out)]) == 0  # fmt: skip
    assert "checked in ONNX Runtime at batch 2 and 5" in capsys.readouterr().out and out.is_file()
    assert main(["apply", str(plan), "--model", "sample:resnet20", "--out", str(tmp_path / "r.pt"), "--onnx", str(out),
                 "--int8", str(tmp_path / "m.int8.onnx"), "--data", "sample", "--limit", "250",
                 "--bn-recalibration", "2", "--check"]) == 0  # fmt: skip
    report = capsys.readouterr().out
    assert "check      " in report and "OK" in report  # the masked twin is compared before BatchNorm moves
    rows = {line[:28].strip(): line[28:].split() for line in report.splitlines()[-4:]}
    accuracy = {name: float(cells[0].rstrip("%")) for name, cells in rows.items()}
    assert set(accuracy) == {"dense", "pruned", "pruned, ONNX Runtime", "pruned + INT8, ONNX Runtime"}
    assert accuracy["pruned"] == accuracy["pruned, ONNX Runtime"] > 50  # BatchNorm re-estimated, then saved
    assert abs(accuracy["pruned + INT8, ONNX Runtime"] - accuracy["pruned"]) <= 3
    saved, _ = pc.load_pruned(tmp_path / "r.pt")
    with torch.no_grad():
        np.testing.assert_allclose(run(out, sample.example), saved(sample.example).numpy(), rtol=1e-3, atol=1e-4)
    assert main(["apply", str(plan), "--model", "sample:resnet20", "--out", str(tmp_path / "q.pt"),
                 "--onnx", str(tmp_path)]) == 2  # fmt: skip
    assert "--onnx" in capsys.readouterr().err


def test_cli_quantises_a_language_model_dynamically_and_keeps_its_accuracy(tmp_path, capsys):
    """Static activation ranges wreck tinylm (next-byte accuracy 62 % -> 21 % when tried); dynamic INT8 keeps it."""
    sample = pc.load_sample("tinylm")
    plan = tmp_path / "plan.json"
    plan.write_text(pc.make_plan(sample.model, pc.trace(sample.model, sample.example), 0.3).to_json())
    assert main(["apply", str(plan), "--model", "sample:tinylm", "--out", str(tmp_path / "p.pt"), "--onnx",
                 str(tmp_path / "m.onnx"), "--int8", str(tmp_path / "m.int8.onnx"), "--data", "sample",
                 "--limit", "32"]) == 0  # fmt: skip
    report = capsys.readouterr().out
    assert "dynamic: weights INT8, activations quantised per batch (a language model)" in report
    rows = {line[:28].strip(): line[28:].split() for line in report.splitlines()[-4:]}
    accuracy = {name: float(cells[0].rstrip("%")) for name, cells in rows.items()}
    assert accuracy["pruned"] == accuracy["pruned, ONNX Runtime"]
    assert abs(accuracy["pruned + INT8, ONNX Runtime"] - accuracy["pruned"]) <= 1


ZOO = {  # one model of each torchvision family the engine prunes, at the input it was built for
    "resnet18": (1, 3, 64, 64), "mobilenet_v3_small": (1, 3, 64, 64), "efficientnet_b0": (1, 3, 64, 64),
    "convnext_tiny": (1, 3, 64, 64), "regnet_x_400mf": (1, 3, 64, 64), "shufflenet_v2_x0_5": (1, 3, 64, 64),
    "densenet121": (1, 3, 64, 64), "vit_b_16": (1, 3, 224, 224), "swin_t": (1, 3, 224, 224),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_families_export_pruned_and_equal_pytorch(name, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    example = torch.randn(ZOO[name])
    pruned = pc.prune(model, example, 0.3).eval()
    exported = export_onnx(pruned, example, tmp_path / "m.onnx", rtol=1e-3, atol=1e-3)
    assert exported.dynamic_batch and exported.max_abs_diff < 1e-3
