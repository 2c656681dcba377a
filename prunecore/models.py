"""Model specs shared by the CLI and the dashboard.

`sample:NAME` (a trained sample model), `torchvision:NAME` (random init unless weights are given)
or `package.module:function` (any factory returning an `nn.Module`).

    >>> model = load_model("sample:resnet20")
    >>> model = load_model("torchvision:resnet18", weights="resnet18.pt")
    >>> model = load_model("mypkg.nets:build_net")
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

__all__ = ["ModelSpecError", "default_input_shape", "load_model", "load_weights_"]


class ModelSpecError(ValueError):
    """The model spec, its factory or its weights file cannot be used; the message says why."""


def load_model(spec: str, weights: str | Path | None = None) -> nn.Module:
    """Build the model a spec names (random init unless `weights` is given), in eval mode."""
    kind, name = _split(spec)
    if kind == "sample":
        from prunecore.samples import SampleError, load_sample

        try:
            model = load_sample(name).model
        except SampleError as exc:
            raise ModelSpecError(str(exc)) from None
    elif kind == "torchvision":
        model = _torchvision(name)
    else:
        model = _factory(kind, name)
    if weights is not None:
        load_weights_(model, weights)
    return model.eval()


def default_input_shape(spec: str) -> tuple[int, ...] | None:
    """The example input a spec's model expects, where it is known (None for arbitrary factories)."""
    kind, name = _split(spec)
    if kind == "sample":
        from prunecore.samples import SampleError, get_spec

        try:
            return get_spec(name).input_shape
        except SampleError as exc:
            raise ModelSpecError(str(exc)) from None
    if kind == "torchvision":
        return (1, 3, 299, 299) if name == "inception_v3" else (1, 3, 224, 224)
    return None


def _split(spec: str) -> tuple[str, str]:
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ModelSpecError(
            f"model spec {spec!r} must look like 'sample:NAME', 'torchvision:NAME' or 'package.module:function'"
        )
    return kind, name


def _torchvision(name: str) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = [n for n in available if name.split("_")[0] in n][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelSpecError(f"torchvision has no classification model {name!r}{hint}")
    return torchvision.models.get_model(name, weights=None)


def _factory(module_name: str, attr: str) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {module_name!r} for model spec: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"{module_name!r} has no callable {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{module_name}:{attr}() returned {type(model).__name__}, not an nn.Module")
    return model


def load_weights_(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a `state_dict` file into `model` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSpecError(
            f"weights file {str(path)!r} is not a readable PyTorch weights file (corrupt, truncated, or not "
            f"saved with torch.save; loading is restricted to weights_only=True): {detail[:200]}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSpecError(f"weights file {str(path)!r} does not hold a state_dict of tensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ModelSpecError(f"weights file {str(path)!r} does not fit {type(model).__name__}: {detail}") from None
    return model
