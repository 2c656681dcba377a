"""Data specs: image folders (labelled and flat) become normalised model-shaped batches; bad specs fail in one line."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from prunecore.datasets import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, RANDOM_IMAGES, DataSpecError,
                                load_data)
from sample_models.data import MEAN, STD

RGB, GRAY = (1, 3, 32, 32), (1, 1, 28, 28)
CLASSES = ("cat", "dog", "eel")  # sorted, so the targets are 0, 1, 2


def _image(path: Path, size: tuple[int, int], mode: str = "RGB", colour: int | tuple[int, ...] = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """3 classes x 4 images: PNG and JPEG, RGB and L, various sizes; class folders created out of order."""
    for c, name in reversed(list(enumerate(CLASSES))):
        for i in range(4):
            ext = (".png", ".JPG")[i % 2]
            _image(tmp_path / "data" / name / f"img{i}{ext}", (40 + 7 * i, 30 + 5 * c), ("RGB", "L")[i // 2], 40 * i)
    return tmp_path / "data"


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    for i in range(5):
        _image(tmp_path / "flat" / f"{i}.jpeg", (20 + i, 50), ("RGB", "L")[i % 2])
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    return tmp_path / "flat"


def _batches(loader: torch.utils.data.DataLoader) -> list:
    return list(loader)


@pytest.mark.parametrize("shape", [RGB, GRAY])
def test_labelled_folder_gives_targets_and_model_shaped_inputs(labelled: Path, shape: tuple[int, ...]):
    data = load_data(f"imagefolder:{labelled}", batch_size=5, input_shape=shape)
    assert data.labelled
    assert data.description == f"imagefolder {labelled} (12 images, 3 classes)"
    batches = _batches(data.evaluation)
    assert [len(t) for _, t in batches] == [5, 5, 2]
    assert all(x.shape[1:] == shape[1:] and x.dtype == torch.float32 for x, _ in batches)
    assert torch.cat([t for _, t in batches]).tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_calibration_is_a_separate_loader_over_the_same_images(labelled: Path):
    data = load_data(f"imagefolder:{labelled}", batch_size=4, input_shape=RGB)
    assert data.calibration is not data.evaluation
    for (a, ta), (b, tb) in zip(data.evaluation, data.calibration, strict=True):
        torch.testing.assert_close(a, b)
        assert torch.equal(ta, tb)


def test_calibration_spec_loads_calibration_from_other_data(labelled: Path, flat: Path):
    data = load_data(f"imagefolder:{labelled}", batch_size=4, input_shape=RGB, calibration_spec=f"imagefolder:{flat}")
    assert data.labelled
    assert sum(len(t) for _, t in data.evaluation) == 12
    assert sum(len(x) for x in data.calibration) == 5
    assert data.description.endswith(f"calibration: imagefolder {flat} (5 images, unlabelled)")


def test_flat_folder_gives_unlabelled_bare_tensors(flat: Path):
    data = load_data(f"imagefolder:{flat}", batch_size=2, input_shape=GRAY)
    assert not data.labelled
    assert data.description == f"imagefolder {flat} (5 images, unlabelled)"
    batches = _batches(data.evaluation)
    assert all(isinstance(x, torch.Tensor) for x in batches)
    assert [x.shape for x in batches] == [(2, 1, 28, 28), (2, 1, 28, 28), (1, 1, 28, 28)]


def test_limit_takes_the_first_images_in_sorted_order(labelled: Path):
    def load() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return _batches(load_data(f"imagefolder:{labelled}", batch_size=10, input_shape=GRAY, limit=6).evaluation)

    (x, t), = load()
    assert t.tolist() == [0, 0, 0, 0, 1, 1]
    (x2, t2), = load()
    torch.testing.assert_close(x, x2)
    full, _ = next(iter(load_data(f"imagefolder:{labelled}", batch_size=6, input_shape=GRAY).evaluation))
    torch.testing.assert_close(x, full)


@pytest.mark.parametrize("ext", IMAGE_EXTENSIONS + (".PNG",))
def test_recognised_extensions(tmp_path: Path, ext: str):
    _image(tmp_path / f"a{ext}", (8, 8))
    assert load_data(f"imagefolder:{tmp_path}", input_shape=GRAY).description.endswith("(1 images, unlabelled)")


def test_rgb_normalisation_uses_imagenet_statistics(tmp_path: Path):
    colour = (200, 100, 30)
    _image(tmp_path / "c.png", (50, 40), "RGB", colour)
    x = next(iter(load_data(f"imagefolder:{tmp_path}", input_shape=RGB).evaluation))  # (1, 3, 32, 32)
    expected = [(v / 255 - m) / s for v, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(x, torch.tensor(expected).view(1, 3, 1, 1).expand(1, 3, 32, 32))


def test_gray_normalisation_uses_the_sample_digit_statistics(tmp_path: Path):
    _image(tmp_path / "c.png", (30, 60), "L", 255)
    x = next(iter(load_data(f"imagefolder:{tmp_path}", input_shape=GRAY).evaluation))  # (1, 1, 28, 28)
    torch.testing.assert_close(x, torch.full((1, 1, 28, 28), (1 - MEAN) / STD))


def test_sample_spec():
    data = load_data("sample")
    assert data.labelled
    assert sum(len(t) for _, t in data.evaluation) == 1000
    assert sum(len(t) for _, t in data.calibration) == 500
    assert "1,000 images" in data.description
    x, _ = next(iter(data.evaluation))
    assert x.shape[1:] == (1, 28, 28)
    assert sum(len(t) for _, t in load_data("sample", limit=30).evaluation) == 30


def test_random_spec_is_seeded_unlabelled_noise_of_the_input_shape():
    def images(limit: int | None, batch_size: int = 250) -> torch.Tensor:
        return torch.cat(list(load_data("random", batch_size, input_shape=RGB, limit=limit).evaluation))

    data = load_data("random", batch_size=4, input_shape=RGB, limit=10)
    assert not data.labelled
    assert data.description == "random label-free data (10 Gaussian noise images of 3x32x32; KL and agreement only)"
    batches = _batches(data.evaluation)
    assert all(isinstance(x, torch.Tensor) for x in batches)  # bare inputs, no targets
    assert [x.shape for x in batches] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    torch.testing.assert_close(torch.cat(batches), images(10))  # the same images in any batch size, every time
    torch.testing.assert_close(torch.cat(_batches(data.calibration)), images(10))
    torch.testing.assert_close(images(10), images(20)[:10])  # a limit takes the first images
    assert images(None).shape == (RANDOM_IMAGES, 3, 32, 32)
    assert 0.5 < float(images(None).std()) < 1.5  # standard Gaussian, not constant
    first, second = images(2)
    assert not torch.equal(first, second)  # each image its own noise


def test_hidden_entries_are_skipped(labelled: Path):
    _image(labelled / "cat" / "._img0.png", (8, 8))  # a macOS resource fork would not decode
    (labelled / ".ipynb_checkpoints").mkdir()
    data = load_data(f"imagefolder:{labelled}", input_shape=RGB)
    assert data.description.endswith("(12 images, 3 classes)")


@pytest.mark.parametrize(
    "spec, kwargs, fragment",
    [
        ("mnist", {}, "supported: 'sample'"),
        ("imagefolder:", {"input_shape": RGB}, "unknown data spec"),
        ("imagefolder:{tmp}/missing", {"input_shape": RGB}, "does not exist"),
        ("imagefolder:{tmp}/file.png", {"input_shape": RGB}, "is not a directory"),
        ("imagefolder:{tmp}/empty", {"input_shape": RGB}, "has no images (recognised: .jpg .jpeg .png"),
        ("imagefolder:{tmp}/mixed", {"input_shape": RGB}, "mixes image files"),
        ("imagefolder:{tmp}/mixed", {}, "needs input_shape"),
        ("imagefolder:{tmp}/mixed", {"input_shape": (1, 2, 8, 8)}, "C 1 or 3"),
        ("sample", {"limit": 0}, "limit must be >= 1"),
        ("sample", {"input_shape": RGB}, "sample digits are 1x28x28"),
        ("sample", {"calibration_spec": "nope"}, "unknown data spec 'nope'"),
        ("random", {}, "random data needs input_shape"),
        ("random", {"input_shape": RGB, "limit": 0}, "limit must be >= 1"),
    ],
)
def test_bad_specs_fail_with_one_line(tmp_path: Path, spec: str, kwargs: dict, fragment: str):
    _image(tmp_path / "file.png", (8, 8))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    _image(tmp_path / "mixed" / "a" / "x.png", (8, 8))
    _image(tmp_path / "mixed" / "y.png", (8, 8))
    with pytest.raises(DataSpecError) as info:
        load_data(spec.format(tmp=tmp_path), **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_corrupt_image_names_the_file(tmp_path: Path):
    _image(tmp_path / "good.png", (8, 8))
    bad = tmp_path / "zbad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    data = load_data(f"imagefolder:{tmp_path}", batch_size=1, input_shape=GRAY)
    loader = iter(data.evaluation)
    assert next(loader).shape == (1, 1, 28, 28)
    with pytest.raises(DataSpecError, match="cannot decode image file .*zbad.png"):
        next(loader)
