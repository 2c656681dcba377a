"""`finetune` under `accelerate launch` with 2 CPU processes (gloo) equals the same call in one process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
SCRIPT = Path(__file__).resolve().parent / "accelerate_script.py"
ROOT = SCRIPT.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_to_the_weights_of_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one.pt")], env=env, check=True, timeout=600)
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    # --multi_gpu picks the torchrun launcher; on a machine without GPUs Accelerate then runs on CPU with gloo
    launch = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]  # fmt: skip
    checkpoint = tmp_path / "two.finetune.pt"
    subprocess.run([*launch, str(SCRIPT), str(tmp_path / "two.pt"), str(checkpoint)], env=env, check=True,
                   timeout=600, capture_output=True)  # fmt: skip
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for name, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][name], value, rtol=1e-5, atol=1e-6)
    assert checkpoint.exists()  # written by the main process alone, atomically
    assert not list(tmp_path.glob(".*.tmp"))
