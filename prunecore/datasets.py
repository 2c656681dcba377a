"""Data specs shared by the CLI and the dashboard.

`sample` is the held-out split of the bundled digits (evaluation) with the calibration split (for
BatchNorm re-estimation). More sources (image folders) come with the sensitivity sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import DataLoader

__all__ = ["DataSpecError", "EvalData", "load_data"]


class DataSpecError(ValueError):
    """The data spec cannot be used; the message says why."""


@dataclass(frozen=True, eq=False)
class EvalData:
    evaluation: DataLoader  # what metrics are measured on
    calibration: DataLoader  # what BatchNorm statistics are re-estimated on (disjoint from evaluation)
    labelled: bool = True


def load_data(spec: str, batch_size: int = 250) -> EvalData:
    if spec == "sample":
        from sample_models.data import mnist_loader

        return EvalData(mnist_loader("heldout", batch_size), mnist_loader("calibration", batch_size))
    raise DataSpecError(f"unknown data spec {spec!r}; supported: 'sample' (the bundled held-out digits)")
