"""Registry of sample models: small models trained on real data, shipped with their weights.

Three image classifiers trained on real digits, and `tinylm`, a byte-level language model trained
on English prose (sample_models/text.py says where the text comes from):

    >>> list_samples()
    ['mobilenet_v2', 'resnet20', 'tinylm', 'vit']
    >>> s = load_sample("resnet20")
    >>> evaluate(s.model, s.heldout)                 # {'accuracy': 0.99...}
    >>> recalibrate_bn_(pruned, s.calibration)       # calibration images are not in held-out

The weights' SHA-256 is recorded in `sample_models/manifest.json` and checked on every load, so a
corrupted or replaced file raises `SampleError` instead of silently giving a bad model.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from prunecore.errors import UserError

__all__ = ["Sample", "SampleError", "SampleSpec", "list_samples", "load_sample", "register_sample"]


class SampleError(UserError, RuntimeError):
    """A sample model is unknown, or its weights are missing or corrupt; the message says which."""


@dataclass(frozen=True)
class SampleSpec:
    name: str
    builder: Callable[[], nn.Module]
    description: str
    input_shape: tuple[int, ...] = (1, 1, 28, 28)  # the example input; the data loaders match it
    data: str = "digits"  # "digits" (images, labels) or "text" (byte blocks, next-byte targets)


@dataclass(frozen=True, eq=False)
class Sample:
    """A loaded sample: the trained model (eval mode), an example input and its data."""

    name: str
    model: nn.Module
    example: torch.Tensor
    heldout: DataLoader  # 1,000 images (or text blocks) never trained on: sweeps, validation
    calibration: DataLoader  # 500 training images (or text blocks of their own): BatchNorm re-estimation
    train: DataLoader  # the 4,000 training images (or the training text), shuffled (seeded): fine-tuning
    info: Mapping[str, Any] = field(default_factory=dict)  # the manifest entry: accuracy, params, ...


TRAIN_BATCH = 128  # the batch the samples were trained with (sample_models/train.py), for fine-tuning them

_SAMPLES: dict[str, SampleSpec] = {}


def register_sample(spec: SampleSpec) -> SampleSpec:
    _SAMPLES[spec.name] = spec
    return spec


def list_samples() -> list[str]:
    return sorted(_SAMPLES)


def get_spec(name: str) -> SampleSpec:
    if name not in _SAMPLES:
        raise SampleError(f"unknown sample model {name!r}; choose one of {', '.join(list_samples())}")
    return _SAMPLES[name]


def samples_dir() -> Path:
    return Path(importlib.import_module("sample_models").__file__).parent


def manifest() -> dict[str, Any]:
    path = samples_dir() / "manifest.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def weights_path(name: str) -> Path:
    return samples_dir() / "weights" / f"{name}.pt"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_sample(name: str, batch_size: int = 250) -> Sample:
    """The trained sample model with its checked weights, example input and data loaders."""
    from sample_models.data import mnist_loader, mnist_split

    spec = get_spec(name)
    entry = manifest().get(name)
    path = weights_path(name)
    if entry is None or not path.is_file():
        raise SampleError(
            f"sample model {name!r} has no trained weights at {path}; train them with "
            f"`python -m sample_models.train --model {name}`"
        )
    digest = sha256(path)
    if digest != entry["sha256"]:
        raise SampleError(
            f"weights of sample model {name!r} ({path}) are corrupt or were changed: SHA-256 {digest[:12]}... "
            f"does not match the recorded {entry['sha256'][:12]}...; restore the file (git checkout) or retrain "
            f"with `python -m sample_models.train --model {name}`"
        )
    model = spec.builder()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    if spec.data == "text":
        loaders = {split: text_loader(split, spec.input_shape[-1]) for split in ("heldout", "calibration", "train")}
        example = loaders["heldout"].dataset[0][0][None]  # (1, T): real held-out text
    else:
        example = mnist_split("heldout").tensors[0][:1]  # (1, 1, 28, 28): a real held-out digit
        loaders = {split: mnist_loader(split, batch_size) for split in ("heldout", "calibration")}
        loaders["train"] = mnist_loader("train", TRAIN_BATCH, shuffle=True)
    return Sample(name=name, model=model, example=example, info=entry, **loaders)


def text_loader(split: str, length: int, limit: int | None = None) -> DataLoader:
    """Blocks of `length` bytes of the sample text's `split`; the training split shuffled (seeded)."""
    from prunecore.text import batch_size, load_text
    from sample_models.text import documents

    blocks = load_text(f"sample text ({split})", length, documents=documents(split), limit=limit)
    blocks.description = f"sample text, {split} ({len(blocks):,} blocks of {length} bytes)"
    batch = batch_size(length)
    if split == "train":
        return DataLoader(blocks, batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    return DataLoader(blocks, batch)


def _builtin(attr: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return getattr(importlib.import_module("sample_models.nets"), attr)()

    return build


for _name, _description in [
    ("resnet20", "CIFAR-style ResNet-20 (BasicBlocks, BatchNorm, residual stages), 0.27 M params"),
    ("mobilenet_v2", "torchvision MobileNetV2 x0.5, 1-channel stem: depthwise convs, inverted residuals"),
    ("vit", "small torchvision VisionTransformer (patch 7, 4 layers, 4 heads, width 64)"),
]:
    register_sample(SampleSpec(_name, _builtin(_name), _description))
register_sample(SampleSpec(
    "tinylm", _builtin("tinylm"), "byte-level Llama decoder (6 layers, width 128, 4 query heads over 2 KV heads, "
    "gated MLP of 512) trained on Python documentation prose, 1.5 M params", input_shape=(1, 128), data="text",
))  # fmt: skip
