"""Fine-tune a model without BatchNorm or dropout and save its weights: run once alone, once under `accelerate launch`.

`python tests/accelerate_script.py OUT.pt [CHECKPOINT.pt]`; with several processes only the main one writes.
"""

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_recover import digits  # noqa: E402

from prunecore.recover import finetune  # noqa: E402


class Plain(nn.Module):
    """Nothing whose state depends on how a batch is split across processes (no BatchNorm, no dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 2).flatten(1))  # (B, 4)


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    checkpoint = sys.argv[2] if len(sys.argv) > 2 else None
    result = finetune(Plain(), digits(), epochs=2, lr=0.1, device="cpu", checkpoint=checkpoint,
                      eval_data=digits(64, seed=1, shuffle=False))  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"state_dict": result.model.state_dict(), "losses": [e.loss for e in result.history],
                    "processes": int(os.environ.get("WORLD_SIZE", "1"))}, sys.argv[1])  # fmt: skip
