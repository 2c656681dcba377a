"""Train the sample models: `python -m sample_models.train --model resnet20` (or `--all`).

Seeded and reproducible on one machine; each model trains in under ~5 minutes on 2 CPU cores.
Writes `weights/NAME.pt` (a state_dict), records its SHA-256, size, cost and held-out accuracy
in `manifest.json`, and rewrites the table in this folder's README from the manifest.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from prunecore.cost import count
from prunecore.evaluate import evaluate
from prunecore.samples import get_spec, list_samples, samples_dir, sha256, weights_path
from sample_models.data import MEAN, STD, mnist_loader


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    weight_decay: float
    optimizer: str = "sgd"  # sgd (nesterov) or adamw
    warmup_epochs: int = 1
    batch_size: int = 128
    label_smoothing: float = 0.05


RECIPES = {
    "resnet20": Recipe(epochs=15, lr=0.1, weight_decay=5e-4),
    "mobilenet_v2": Recipe(epochs=16, lr=0.1, weight_decay=4e-5),
    "vit": Recipe(epochs=80, lr=2e-3, weight_decay=0.05, optimizer="adamw", warmup_epochs=5),
}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation (+-10 deg), scale (0.9-1.1) and shift (+-2 px) of a normalised batch."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    scale = 0.9 + torch.rand(n, generator=gen) * 0.2
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 / 14)  # affine_grid units: 14 px per 1.0
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    pixels = x * STD + MEAN  # back to [0, 1] so that padding is black background
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, 28, 28, 2)
    return (F.grid_sample(pixels, grid, align_corners=False) - MEAN) / STD


def train(name: str, seed: int = 0, epochs: int | None = None) -> dict:
    if name == "tinylm":  # a language model: its own recipe in steps (sample_models/train_lm.py)
        from sample_models.train_lm import train_lm

        return train_lm(seed)
    recipe = RECIPES[name]
    epochs = epochs or recipe.epochs
    torch.manual_seed(seed)
    model = get_spec(name).builder()
    loader = mnist_loader("train", recipe.batch_size, shuffle=True, seed=seed)
    if recipe.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True,
                              weight_decay=recipe.weight_decay)  # fmt: skip
    steps = epochs * len(loader)
    warmup = recipe.warmup_epochs * len(loader)
    def rate(s: int) -> float:
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    gen = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    model.train()
    for epoch in (bar := tqdm(range(epochs), desc=f"training {name}", unit="epoch")):
        total = 0.0
        for x, y in loader:
            loss = F.cross_entropy(model(augment(x, gen)), y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.item() * x.shape[0]
        bar.set_postfix(loss=f"{total / len(loader.dataset):.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    metrics = evaluate(model, mnist_loader("heldout"), ["accuracy", "loss"])
    return save_trained(name, model, torch.zeros(get_spec(name).input_shape), metrics, seconds, seed, epochs=epochs)


def save_trained(name: str, model: nn.Module, example: torch.Tensor, metrics: dict[str, float], seconds: float,
                 seed: int, **extra: Any) -> dict:  # fmt: skip
    """Write the trained weights and return their manifest entry: checksum, size, cost, held-out metrics."""
    path = weights_path(name)
    path.parent.mkdir(exist_ok=True)
    torch.save(model.state_dict(), path)
    cost = count(model, example)
    held = {"heldout_accuracy": round(100 * metrics["accuracy"], 2), "heldout_loss": round(metrics["loss"], 4)}
    if "perplexity" in metrics:
        held["heldout_perplexity"] = round(metrics["perplexity"], 3)
    return {
        "weights": f"weights/{name}.pt", "sha256": sha256(path), "params": cost.params, "flops": cost.flops, **held,
        **extra, "seed": seed, "train_seconds": round(seconds, 1), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }  # fmt: skip


def write_manifest(entries: dict[str, dict]) -> None:
    path = samples_dir() / "manifest.json"
    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update(entries)
    path.write_text(json.dumps(dict(sorted(current.items())), indent=2) + "\n")
    write_readme_table(current)


TABLE_START, TABLE_END = "<!-- samples-table:start -->", "<!-- samples-table:end -->"


def readme_table(manifest: dict[str, dict]) -> str:
    rows = [
        "| model | parameters | MACs per example | held-out | epochs | training time |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, e in sorted(manifest.items()):
        if "heldout_perplexity" in e:  # a language model: per-byte perplexity on the held-out text
            score = f"perplexity {e['heldout_perplexity']:.2f} (next byte {e['heldout_accuracy']:.1f} %)"
        else:
            score = f"accuracy {e['heldout_accuracy']:.2f} %"
        rows.append(
            f"| `{name}` | {e['params']:,} | {e['flops']:,} | {score} | {e['epochs']} | {e['train_seconds']:.0f} s |"
        )
    return "\n".join(rows)


def write_readme_table(manifest: dict[str, dict]) -> None:
    path = samples_dir() / "README.md"
    text = path.read_text()
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    path.write_text(f"{head}{TABLE_START}\n{readme_table(manifest)}\n{TABLE_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", choices=list_samples())
    which.add_argument("--all", action="store_true", help="train every sample model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    args = parser.parse_args(argv)
    names = list_samples() if args.all else [args.model]
    for name in names:
        entry = train(name, args.seed, args.epochs)
        write_manifest({name: entry})
        print(f"{name}: held-out accuracy {entry['heldout_accuracy']:.2f} %, {entry['train_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
