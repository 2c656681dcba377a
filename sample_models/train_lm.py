"""Train the `tinylm` sample: `python -m sample_models.train_lm` (or `python -m sample_models.train --model tinylm`).

A byte-level Llama decoder trained on the `train` split of the sample text (sample_models/text.py)
with AdamW, linear warm-up and a cosine decay, on random 129-byte windows of the training stream
(seeded), so every step sees new offsets. About 10 minutes on 2 CPU cores. Writes
`weights/tinylm.pt` and its manifest entry: held-out loss (nats per byte), perplexity and
next-byte accuracy, measured on the `heldout` split in fixed blocks of 128 bytes.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from prunecore.evaluate import evaluate
from prunecore.samples import get_spec
from prunecore.text import load_text
from sample_models.text import documents
from sample_models.train import save_trained, write_manifest

NAME = "tinylm"
BLOCK = 128  # tokens per example: the sample's input shape is (1, BLOCK)


@dataclass(frozen=True)
class LMRecipe:
    steps: int = 700
    batch_size: int = 32  # windows of BLOCK + 1 bytes per step
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 40
    min_lr_ratio: float = 0.1  # the cosine decays to lr * this


def heldout_loader(batch_size: int = 32) -> DataLoader:
    return DataLoader(load_text("sample:heldout", BLOCK, documents=documents("heldout")), batch_size)


def train_lm(seed: int = 0, steps: int | None = None) -> dict:
    recipe = LMRecipe()
    steps = steps or recipe.steps
    torch.manual_seed(seed)
    model = get_spec(NAME).builder()
    stream = load_text("sample:train", BLOCK, documents=documents("train")).blocks  # (N, BLOCK + 1)
    tokens = torch.cat([stream[:, :-1].reshape(-1), stream[-1:, -1]])  # the whole training stream
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)

    def rate(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        t = (step - recipe.warmup_steps) / max(1, steps - recipe.warmup_steps)
        return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    gen = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    model.train()
    for step in (bar := tqdm(range(steps), desc=f"training {NAME}", unit="step")):
        offsets = torch.randint(0, tokens.numel() - BLOCK - 1, (recipe.batch_size,), generator=gen)
        window = torch.stack([tokens[o: o + BLOCK + 1] for o in offsets.tolist()])  # (batch, BLOCK + 1)
        logits = model(window[:, :-1]).logits  # (batch, BLOCK, 256)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    metrics = evaluate(model, heldout_loader(), ["accuracy", "loss", "perplexity"])
    example = torch.zeros(get_spec(NAME).input_shape, dtype=torch.long)
    epochs = round(steps * recipe.batch_size * BLOCK / tokens.numel(), 1)
    return save_trained(NAME, model, example, metrics, seconds, seed, steps=steps, epochs=epochs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="override the recipe's step count")
    args = parser.parse_args(argv)
    entry = train_lm(args.seed, args.steps)
    write_manifest({NAME: entry})
    print(f"{NAME}: held-out perplexity {entry['heldout_perplexity']:.2f} (next-byte accuracy "
          f"{entry['heldout_accuracy']:.1f} %), {entry['train_seconds']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
