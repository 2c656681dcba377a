"""Data specs shared by the CLI and the dashboard.

A spec is a string, so a command line, a dashboard text box and a saved sweep all name data alike:

- `sample`: the bundled digits, the 1,000 held-out images for evaluation and the disjoint
  500-image calibration split for BatchNorm re-estimation;
- `imagefolder:PATH`: the user's images. Class subfolders (torchvision's `ImageFolder` layout)
  give labelled data; image files directly in PATH give unlabelled batches of bare tensors, for
  label-free metrics (KL, agreement with the dense model);
- `random`: seeded Gaussian noise of the model's input shape, unlabelled, for trying a model when no
  data fits it (its images, classes or channels): only the label-free metrics (KL, agreement) mean
  anything on it. Image i is the same on every run and in every process, so a sweep on it resumes;
- `text:PATH`: a local `.txt` or `.jsonl` file for a language model (input shape (B, T) token ids),
  in fixed blocks of T tokens with next-token targets (`prunecore.text`), tokenised with the model's
  own tokenizer (the `tokenizer.json` of an `hf:` model folder, or the spec's `tokenizer=`) or as
  UTF-8 bytes. For a token model, `sample` is the sample text (held-out and calibration topics).

    >>> data = load_data("imagefolder:val", input_shape=(1, 3, 224, 224), limit=500)
    >>> data.description
    'imagefolder val (500 images, 10 classes)'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from prunecore.errors import UserError

__all__ = ["DataSpecError", "EvalData", "TrainData", "load_data", "load_train"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_RESIZE_RATIO = 256 / 224  # the standard eval transform: resize the shorter side to 256, crop 224
RANDOM_IMAGES = 256  # `random` images when no limit is set
_KINDS = ("'sample' (the bundled held-out digits, or text for a language model), 'random' (Gaussian noise, "
          "label-free), 'imagefolder:PATH' (a folder of images), 'text:PATH' (a .txt or .jsonl file)")  # fmt: skip


class DataSpecError(UserError, ValueError):
    """The data spec cannot be used; the message says why."""


@dataclass(frozen=True, eq=False)
class EvalData:
    evaluation: DataLoader  # what metrics are measured on
    calibration: DataLoader  # what BatchNorm statistics are re-estimated on
    labelled: bool = True  # False: batches are bare input tensors, only label-free metrics apply
    description: str = ""  # one line for reports, e.g. "imagefolder val (1,000 images, 10 classes)"


@dataclass(frozen=True, eq=False)
class TrainData:
    """Shuffled training batches for fine-tuning (the loader's generator is seeded; `finetune` re-seeds it)."""

    loader: DataLoader
    labelled: bool = True  # False: bare inputs, so only distillation from the dense model can train on them
    description: str = ""


class _Images(Dataset):
    """Image files decoded on access; `(image, target)` items when `targets` is given, else bare images."""

    def __init__(self, files: list[Path], targets: list[int] | None, transform: Callable, mode: str) -> None:
        self.files, self.targets, self.transform, self.mode = files, targets, transform, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        try:
            with Image.open(self.files[i]) as im:
                image = self.transform(im.convert(self.mode))  # (C, H, W)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise DataSpecError(f"cannot decode image file {self.files[i]}: {exc}") from exc
        return image if self.targets is None else (image, self.targets[i])


class _Noise(Dataset):
    """Image i is standard Gaussian noise seeded by i: the same images on every run, made when read."""

    def __init__(self, count: int, shape: tuple[int, ...]) -> None:
        self.count, self.shape = count, shape

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(i))  # (C, H, W)


def load_data(
    spec: str,
    batch_size: int = 250,
    input_shape: tuple[int, ...] | None = None,
    limit: int | None = None,
    calibration_spec: str | None = None,
    model: str | None = None,
) -> EvalData:
    """Evaluation and calibration loaders for a data spec (`sample`, `random` or `imagefolder:PATH`).

    `input_shape` is the model's example input shape, `(..., C, H, W)` with C 1 or 3; image folders
    need it because the files have arbitrary sizes and modes. Images are converted to grayscale
    (C=1) or RGB (C=3), resized like the standard eval transform (shorter side to 256/224 of the
    crop, bilinear), centre-cropped to H x W and normalised with the statistics the model was most
    likely trained with: ImageNet's mean/std for RGB, the sample digits' `MEAN`/`STD` for grayscale.

    `limit` keeps the first N images in sorted file order (class by class for a labelled folder),
    so repeated quick sweeps see the same images; for `sample` it caps both splits; for `random` it is
    the number of images (default `RANDOM_IMAGES`), which `input_shape` (required) shapes.

    A user folder has no separate calibration split: calibration and evaluation share the images
    (as separate DataLoaders) unless `calibration_spec` names other data, whose calibration loader
    is used. An undecodable file raises `DataSpecError` when its batch is read, naming the file.

    Token models (`input_shape` (B, T)) take `text:PATH` or `sample` (the sample text); `model` is
    the model's spec, which names its tokenizer; `limit` then counts blocks of T tokens.
    """
    if limit is not None and limit < 1:
        raise DataSpecError(f"limit must be >= 1 (or None for all images), got {limit}")
    kind, _, arg = spec.partition(":")
    if kind == "text" or (spec == "sample" and _tokens(input_shape)):
        data = _text(spec, arg, input_shape, limit, model)
    elif spec == "sample":
        data = _sample(batch_size, input_shape, limit)
    elif spec == "random":
        data = _random(batch_size, input_shape, limit)
    elif kind == "imagefolder" and arg:
        data = _imagefolder(Path(arg).expanduser(), batch_size, input_shape, limit)
    else:
        raise DataSpecError(f"unknown data spec {spec!r}; supported: {_KINDS}")
    if calibration_spec is None:
        return data
    other = load_data(calibration_spec, batch_size, input_shape, limit, model=model)
    return EvalData(
        data.evaluation, other.calibration, data.labelled, f"{data.description}; calibration: {other.description}"
    )


def _sample(batch_size: int, input_shape: tuple[int, ...] | None, limit: int | None) -> EvalData:
    from sample_models.data import mnist_split

    if input_shape is not None and tuple(input_shape[-3:]) != (1, 28, 28):
        raise DataSpecError(f"the sample digits are 1x28x28 but the model takes {_shape(input_shape)}")
    held, calib = (_first(mnist_split(s), limit) for s in ("heldout", "calibration"))
    description = f"sample held-out digits ({len(held):,} images; calibration {len(calib):,})"
    return EvalData(DataLoader(held, batch_size), DataLoader(calib, batch_size), True, description)


def load_train(
    spec: str, batch_size: int = 128, input_shape: tuple[int, ...] | None = None, limit: int | None = None,
    seed: int = 0, model: str | None = None,
) -> TrainData:
    """Training data for fine-tuning a pruned model, from the same specs as `load_data`.

    `sample` is the 4,000 training digits the samples were trained on (none of the held-out
    ones); `imagefolder:PATH` all images of the folder (the eval transform, no augmentation);
    `random` Gaussian noise, label-free, which distillation alone can train on. Shuffled by a
    generator seeded with `seed`; `limit` keeps the first N images before shuffling.
    """
    if limit is not None and limit < 1:
        raise DataSpecError(f"limit must be >= 1 (or None for all images), got {limit}")
    kind, _, arg = spec.partition(":")
    if kind == "text" or (spec == "sample" and _tokens(input_shape)):
        if spec == "sample":  # the training topics of the sample text, never the held-out ones
            from prunecore.samples import text_loader

            dataset = text_loader("train", input_shape[-1], limit).dataset
            labelled, description = True, dataset.description
        else:
            data = _text(spec, arg, input_shape, limit, model)
            dataset, labelled, description = data.evaluation.dataset, True, data.description
        batch_size = _text_batch(input_shape)
    elif spec == "sample":
        from sample_models.data import mnist_split

        if input_shape is not None and tuple(input_shape[-3:]) != (1, 28, 28):
            raise DataSpecError(f"the sample digits are 1x28x28 but the model takes {_shape(input_shape)}")
        dataset, labelled = _first(mnist_split("train"), limit), True
        description = f"sample training digits ({len(dataset):,} images)"
    elif spec in ("random",) or (kind == "imagefolder" and arg):
        data = load_data(spec, batch_size, input_shape, limit)
        dataset, labelled, description = data.evaluation.dataset, data.labelled, data.description
    else:
        raise DataSpecError(f"unknown data spec {spec!r}; supported: {_KINDS}")
    loader = DataLoader(dataset, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return TrainData(loader, labelled, description)


def _tokens(input_shape: tuple[int, ...] | None) -> bool:
    """Whether the model takes token ids, (B, T), rather than images."""
    return input_shape is not None and len(input_shape) == 2


def _text_batch(input_shape: tuple[int, ...]) -> int:
    from prunecore.text import batch_size

    return batch_size(int(input_shape[-1]))


def _text(spec: str, path: str, input_shape: tuple[int, ...] | None, limit: int | None, model: str | None) -> EvalData:
    """Blocks of T tokens of a text file (or of the sample text), for evaluation and calibration."""
    from prunecore.text import TextError, load_text

    if not _tokens(input_shape):
        shape = "unknown" if input_shape is None else _shape(input_shape)
        raise DataSpecError(f"text data is for language models, whose input is (batch, tokens) ids; this model's "
                            f"input shape is {shape}")  # fmt: skip
    length = int(input_shape[-1])
    batch = _text_batch(input_shape)
    if spec == "sample":
        from prunecore.samples import text_loader

        held, calib = text_loader("heldout", length, limit), text_loader("calibration", length, limit)
        description = f"sample text: {len(held.dataset):,} held-out blocks of {length} bytes (calibration " \
                      f"{len(calib.dataset):,})"  # fmt: skip
        return EvalData(held, calib, True, description)
    if not path:
        raise DataSpecError("data spec 'text:' needs a file: text:PATH (a .txt or .jsonl file)")
    try:
        from prunecore.hf import tokenizer_for

        tokenizer, vocab = tokenizer_for(model)
        blocks = load_text(path, length, tokenizer, limit, vocab)
    except TextError as exc:
        raise DataSpecError(str(exc)) from None
    return EvalData(DataLoader(blocks, batch), DataLoader(blocks, batch), True, blocks.description)


def _random(batch_size: int, input_shape: tuple[int, ...] | None, limit: int | None) -> EvalData:
    if input_shape is None or len(input_shape) < 2:
        raise DataSpecError("random data needs input_shape (the model's example input shape, batch first)")
    count = limit or RANDOM_IMAGES
    images = _Noise(count, tuple(input_shape[1:]))
    description = (f"random label-free data ({count:,} Gaussian noise images of {_shape(input_shape[1:])}; "
                   "KL and agreement only)")  # fmt: skip
    loaders = (DataLoader(images, batch_size), DataLoader(images, batch_size))
    return EvalData(*loaders, labelled=False, description=description)


def _imagefolder(root: Path, batch_size: int, input_shape: tuple[int, ...] | None, limit: int | None) -> EvalData:
    if input_shape is None:
        raise DataSpecError("imagefolder data needs input_shape (the model's example input shape)")
    if not root.exists():
        raise DataSpecError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataSpecError(f"data path {root} is not a directory")
    transform, mode = _transform(input_shape)
    files, targets, classes = _scan(root)
    files, targets = files[:limit], (None if targets is None else targets[:limit])
    dataset = _Images(files, targets, transform, mode)
    labels = "unlabelled" if targets is None else f"{len(classes):,} classes"
    description = f"imagefolder {root} ({len(files):,} images, {labels})"
    loaders = (DataLoader(dataset, batch_size), DataLoader(dataset, batch_size))
    return EvalData(*loaders, labelled=targets is not None, description=description)


def _scan(root: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """Image files in sorted order, their class indices (None for a flat folder) and class names.

    Every non-hidden subfolder is a class, indexed in sorted name order as `ImageFolder` does (even
    one without images, so indices match a model trained on the full set); images are found
    recursively inside it. Hidden files and folders (macOS `._x.jpg`, `.ipynb_checkpoints`) are skipped.
    """
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    classes = [p for p in entries if p.is_dir()]
    per_class = [[f for f in sorted(d.rglob("*")) if _is_image(f, d)] for d in classes]
    flat = [p for p in entries if _is_image(p, root)]
    if any(per_class):
        if flat:
            raise DataSpecError(f"data folder {root} mixes image files ({flat[0].name}) with class folders")
        files = [f for fs in per_class for f in fs]
        targets = [i for i, fs in enumerate(per_class) for _ in fs]
        return files, targets, [d.name for d in classes]
    if not flat:
        raise DataSpecError(f"data folder {root} has no images (recognised: {' '.join(IMAGE_EXTENSIONS)})")
    return flat, None, []


def _is_image(path: Path, under: Path) -> bool:
    hidden = any(part.startswith(".") for part in path.relative_to(under).parts)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not hidden and path.is_file()


def _transform(input_shape: tuple[int, ...]) -> tuple[Callable, str]:
    """The eval transform for a model input shape, and the PIL mode to convert images to first."""
    from torchvision import transforms  # here, not at the top: every evaluation imports this module

    if len(input_shape) < 3 or input_shape[-3] not in (1, 3):
        raise DataSpecError(f"image data needs an input shape (..., C, H, W) with C 1 or 3, got {_shape(input_shape)}")
    c, h, w = input_shape[-3:]
    if c == 1:
        from sample_models.data import MEAN, STD

        mean, std = (MEAN,), (STD,)
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    resize = round(max(h, w) * _RESIZE_RATIO)  # shorter side, so the crop fits in both directions
    steps = [transforms.Resize(resize), transforms.CenterCrop((h, w)), transforms.ToTensor()]
    return transforms.Compose([*steps, transforms.Normalize(mean, std)]), ("L" if c == 1 else "RGB")


def _first(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset if limit is None or limit >= len(dataset) else Subset(dataset, range(limit))


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))
