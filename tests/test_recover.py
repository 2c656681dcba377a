"""Fine-tuning after pruning: the model passed in stays, distillation trains without labels, and a run killed
with SIGKILL resumes from its last finished epoch to the same weights as a run never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunecore as pc
from prunecore.datasets import DataSpecError, load_train
from prunecore.recover import FinetuneError, distillation_loss, finetune, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


class Net(nn.Module):
    """Conv, BatchNorm and dropout: everything whose state a resumed run must restore."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1)  # (B, 32): where the square is
        return self.head(self.drop(h))  # (B, 4)


def digits(n: int = 96, labelled: bool = True, seed: int = 0, shuffle: bool = True) -> DataLoader:
    """Four classes of 8x8 images that differ by where a bright square sits: learnable in a few steps.

    Training data shuffles; held-out data (`shuffle=False`) iterates in one order, as sweeps need.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 1.5
    data = TensorDataset(x, y) if labelled else TensorDataset(x)
    return DataLoader(data, batch_size=16, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_distillation_loss_is_the_softened_kl_times_t_squared():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    p_t, log_s = F.softmax(t / 3.0, dim=1), F.log_softmax(s / 3.0, dim=1)
    by_hand = (p_t * (p_t.log() - log_s)).sum(dim=1).mean() * 9.0
    torch.testing.assert_close(distillation_loss(s, t, 3.0), by_hand)
    assert distillation_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    seq = torch.randn(2, 3, 7), torch.randn(2, 3, 7)  # (batch, tokens, vocab): every token an example
    torch.testing.assert_close(distillation_loss(*seq), distillation_loss(seq[0].reshape(6, 7), seq[1].reshape(6, 7)))


def test_finetune_trains_a_copy_and_records_each_epoch():
    model, train, held = net(), digits(), digits(64, seed=1, shuffle=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, train, epochs=3, lr=0.1, eval_data=held, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is never changed
    assert result.model is not model and not result.model.training
    assert [e.epoch for e in result.history] == [1, 2, 3]
    assert [set(e.metrics) for e in result.history] == [{"accuracy", "loss"}] * 3
    assert result.history[0].lr == pytest.approx(0.1) and result.history[2].lr < result.history[1].lr  # cosine
    assert result.history[-1].metrics["accuracy"] > 0.9 > pc.evaluate(model, held)["accuracy"]
    assert result.history[-1].metrics == pytest.approx(pc.evaluate(result.model, held, ["accuracy", "loss"]))


def test_distillation_trains_without_labels_towards_the_teacher():
    teacher = finetune(net(), digits(), epochs=4, lr=0.1, device="cpu").model
    unlabelled, held = digits(labelled=False, seed=2), digits(64, seed=1, shuffle=False)
    student = net(seed=5)
    kl_before = pc.evaluate(student, held, ["kl"], reference=teacher)["kl"]
    result = finetune(student, unlabelled, teacher=teacher, epochs=4, lr=0.1, eval_data=held, device="cpu",
                      metrics=["kl", "agreement"])  # fmt: skip
    assert result.history[-1].metrics["kl"] < 0.5 * kl_before
    with pytest.raises(FinetuneError, match="no labels and there is no teacher"):
        finetune(student, unlabelled, epochs=1, device="cpu")


def test_distill_weighs_cross_entropy_against_distillation():
    model, teacher, train = net(), net(seed=3), digits()
    only_ce = finetune(model, train, epochs=1, device="cpu").model
    none_distilled = finetune(model, train, teacher=teacher, distill=0.0, epochs=1, device="cpu").model
    assert same_weights(only_ce, none_distilled)  # distill=0: the teacher changes nothing
    only_kd = finetune(model, train, teacher=teacher, distill=1.0, epochs=1, device="cpu").model
    unlabelled = finetune(model, digits(labelled=False), teacher=teacher, epochs=1, device="cpu").model
    assert same_weights(only_kd, unlabelled)  # distill=1: labels are not used


def test_an_existing_checkpoint_is_never_overwritten_and_resumes_only_under_its_settings(tmp_path):
    path = tmp_path / "ft.pt"
    finetune(net(), digits(), epochs=2, device="cpu", checkpoint=path)
    saved = path.read_bytes()
    with pytest.raises(FinetuneError, match="exists: pass resume=True"):
        finetune(net(), digits(), epochs=2, device="cpu", checkpoint=path)
    with pytest.raises(FinetuneError, match=r"other settings: lr 0.01 \(now 0.5\)"):
        finetune(net(), digits(), epochs=2, lr=0.5, device="cpu", checkpoint=path, resume=True)
    assert path.read_bytes() == saved
    done = finetune(net(), digits(), epochs=2, device="cpu", checkpoint=path, resume=True)  # nothing left to do
    assert [e.epoch for e in done.history] == [1, 2] and path.read_bytes() == saved
    wider = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(288, 4))
    with pytest.raises(FinetuneError, match="holds another model's weights"):
        finetune(wider, digits(), epochs=2, device="cpu", checkpoint=path, resume=True)
    if not torch.cuda.is_available():
        with pytest.raises(pc.UserError, match="device 'cuda': no CUDA device is available here"):
            finetune(net(), digits(), device="cuda")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(FinetuneError, match="bad.pt' cannot be read"):
        read_checkpoint(bad)


KILLED = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_recover import digits, net
    from prunecore.recover import finetune
    torch.set_num_threads(1)
    finetune(net(), digits(), epochs=4, lr=0.1, device="cpu", checkpoint={path!r},
             progress=lambda epoch, batch, total: time.sleep(0.25))
""")


def test_a_run_killed_with_sigkill_resumes_to_the_weights_of_a_run_never_stopped(tmp_path):
    path = tmp_path / "ft.pt"
    script = KILLED.format(tests=str(ROOT / "tests"), path=str(path))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not path.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    finished = len(read_checkpoint(path)["history"])
    assert 1 <= finished < 4  # killed mid-run, after at least one epoch was written
    resumed = finetune(net(), digits(), epochs=4, lr=0.1, device="cpu", checkpoint=path, resume=True)
    straight = finetune(net(), digits(), epochs=4, lr=0.1, device="cpu")
    assert [e.epoch for e in resumed.history] == [1, 2, 3, 4]
    assert [e.loss for e in resumed.history] == [e.loss for e in straight.history]
    assert same_weights(resumed.model, straight.model)


def test_training_data_specs():
    train = load_train("sample")
    assert train.labelled and len(train.loader.dataset) == 4000 and "training digits" in train.description
    first = next(iter(train.loader))[1]
    assert not torch.equal(first, next(iter(load_train("sample", seed=1).loader))[1])  # shuffled by the seed
    noise = load_train("random", input_shape=(1, 3, 8, 8), limit=20)
    assert not noise.labelled and next(iter(noise.loader)).shape == (20, 3, 8, 8)
    with pytest.raises(DataSpecError, match="1x28x28 but the model takes 1x3x32x32"):
        load_train("sample", input_shape=(1, 3, 32, 32))
    with pytest.raises(DataSpecError, match="unknown data spec 'mnist'"):
        load_train("mnist")
    assert len(pc.load_sample("resnet20").train.dataset) == 4000
