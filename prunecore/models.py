"""Model specs shared by the CLI and the dashboard, and pruned-model files.

`sample:NAME` (a trained sample model), `torchvision:NAME` or `timm:NAME` (random init unless
weights are given; nothing is downloaded) or `package.module:function` (any factory returning an
`nn.Module`).

    >>> model = load_model("sample:resnet20")
    >>> model = load_model("torchvision:resnet18", weights="resnet18.pt")
    >>> model = load_model("timm:convnext_atto")
    >>> model = load_model("mypkg.nets:build_net")

A pruned model has new layer shapes, so its state_dict alone fits no class; a pruned-model file
keeps the model spec and the plan beside it, enough to rebuild the architecture and load it:

    >>> save_pruned("pruned.pt", apply_plan(model, plan), plan, "sample:resnet20")
    >>> pruned, plan = load_pruned("pruned.pt")

What loading a pruned-model file runs: the file is read with `weights_only=True` (no pickled code),
and a spec of a data kind (`DATA_SPEC_KINDS`: `sample:`, `torchvision:`, `timm:`) builds a registered
architecture. A `package.module:function` spec in a file is code and never runs (not even its module
is imported) unless the caller names that same spec (`model=`; the CLI's `--model`) or trusts the
file (`trust_code=True`; the CLI's `--trust-model-code`). Format /2 files also carry a SHA-256 over
spec, plan and weights, so a file edited or corrupted after saving is refused; it is a checksum, not
a signature (whoever edits a file can recompute it), so it never makes a file trusted.

    >>> load_pruned("downloaded.pt")  # it names 'mypkg.nets:build_net': ModelSpecError, nothing imported
    >>> load_pruned("downloaded.pt", model="mypkg.nets:build_net")  # the caller names it: it runs
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from prunecore.errors import UserError
from prunecore.files import write_atomic
from prunecore.graph import trace
from prunecore.plan import Plan, PlanError
from prunecore.surgery import apply_plan

__all__ = [
    "DATA_SPEC_KINDS",
    "PRUNED_FORMAT",
    "ModelSpecError",
    "default_input_shape",
    "load_model",
    "load_pruned",
    "load_weights_",
    "save_pruned",
    "write_atomic",
]

PRUNED_FORMAT = "prunecore.pruned/2"
_PRUNED_KEYS = {  # the keys of each format this prunecore reads; /1 files predate the hash
    "prunecore.pruned/1": ("format", "model", "plan", "state_dict"),
    PRUNED_FORMAT: ("format", "model", "plan", "state_dict", "sha256"),
}


class ModelSpecError(UserError, ValueError):
    """The model spec, its factory or its weights file cannot be used; the message says why."""


def load_model(spec: str, weights: str | Path | None = None) -> nn.Module:
    """Build the model a spec names (random init unless `weights` is given), in eval mode.

    A `package.module:function` spec imports and calls that function: pass only specs the user
    typed, never one read from a file (`load_pruned` checks that first).
    """
    kind, name = _split(spec)
    build = _DATA_KINDS.get(kind)
    model = build(name) if build is not None else _factory(kind, name)
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
    if kind == "timm":
        import timm

        cfg = timm.get_pretrained_cfg(name)
        return (1, *cfg.input_size) if cfg is not None and cfg.input_size else (1, 3, 224, 224)
    return None


def _split(spec: str) -> tuple[str, str]:
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ModelSpecError(
            f"model spec {spec!r} must look like 'sample:NAME', 'torchvision:NAME', 'timm:NAME' or "
            "'package.module:function'"
        )
    return kind, name


def _sample(name: str) -> nn.Module:
    from prunecore.samples import SampleError, load_sample

    try:
        return load_sample(name).model
    except SampleError as exc:
        raise ModelSpecError(str(exc)) from None


def _torchvision(name: str) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = [n for n in available if name.split("_")[0] in n][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelSpecError(f"torchvision has no classification model {name!r}{hint}")
    return torchvision.models.get_model(name, weights=None)


def _timm(name: str) -> nn.Module:
    """A timm architecture with random init: `pretrained=False`, so nothing is downloaded."""
    try:
        import timm
    except ImportError:
        raise ModelSpecError("model spec 'timm:...' needs timm: pip install 'prunecore[timm]'") from None
    available = timm.list_models()
    if name not in available:
        close = [n for n in available if n.startswith(name.split("_")[0])][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelSpecError(f"timm has no model {name!r}{hint}")
    return timm.create_model(name, pretrained=False)


_DATA_KINDS: Mapping[str, Callable[[str], nn.Module]] = {
    "sample": _sample,
    "torchvision": _torchvision,
    "timm": _timm,
}
DATA_SPEC_KINDS = frozenset(_DATA_KINDS)
"""Spec kinds that name a registered architecture, not code: a pruned-model file may name them.

Every other `kind:name` is `package.module:function`, which imports and calls code.
"""


def _factory(module_name: str, attr: str) -> nn.Module:
    spec = f"{module_name}:{attr}"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while it runs
        raise ModelSpecError(f"cannot import {module_name!r} for model spec {spec!r}: {_reason(exc)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"{module_name!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as exc:  # the user's code: any error is the spec's failure, reported on one line
        raise ModelSpecError(f"model factory {spec}() raised {_reason(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{module_name}:{attr}() returned {type(model).__name__}, not an nn.Module")
    return model


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_weights_(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a `state_dict` file into `model` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelSpecError(
            f"weights file {str(path)!r} is not a readable PyTorch weights file (corrupt, truncated, or not "
            f"saved with torch.save; loading is restricted to weights_only=True): {_load_failure(exc)}"
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


# -- pruned-model files ---------------------------------------------------------------------------
def save_pruned(path: str | Path, pruned: nn.Module, plan: Plan, model_spec: str) -> Path:
    """Save `pruned` (the result of applying `plan` to `load_model(model_spec)`) so it can be rebuilt.

    The file is a `torch.save` of plain data (format tag, spec, plan JSON, state_dict and their
    SHA-256), readable with `weights_only=True`: loading it never unpickles code.
    """
    payload: dict[str, Any] = {
        "format": PRUNED_FORMAT,
        "model": model_spec,
        "plan": plan.to_json(),
        "state_dict": pruned.state_dict(),
    }
    payload["sha256"] = _pruned_digest(payload)
    return write_atomic(path, lambda f: torch.save(payload, f))


def load_pruned(path: str | Path, trust_code: bool = False, model: str | None = None) -> tuple[nn.Module, Plan]:
    """Rebuild the model `save_pruned` wrote: its architecture, the plan applied, then its weights.

    The architecture comes from the recorded spec (its own weights are overwritten), is re-traced
    on the plan's inputs and pruned by the plan, so the state_dict must fit exactly (strict load).
    A recorded `package.module:function` spec is code, run only when `model` (the spec the caller
    itself names) is that same spec or `trust_code` is set; nothing is imported before that check.
    Raises `ModelSpecError` for an unreadable, foreign, edited or untrusted file, `PlanError` for a
    plan that does not fit the model.
    """
    payload = _read_pruned(Path(path))
    where = f"pruned-model file {str(path)!r}"
    spec = payload["model"]
    try:
        _check_runnable(spec, trust_code, model)
        plan = Plan.from_json(payload["plan"])
        built = load_model(spec)
    except (ModelSpecError, PlanError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
    graph = trace(built, tuple(s.example() for s in plan.inputs))
    try:
        plan.check(graph)
    except PlanError as exc:
        raise PlanError(f"{where}: {exc}") from None
    pruned = apply_plan(built, plan, graph=graph)
    try:
        pruned.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:3])
        raise ModelSpecError(f"{where}: its weights do not fit {spec} pruned by its plan: {detail}") from None
    return pruned.eval(), plan


def _check_runnable(spec: str, trust_code: bool, model: str | None) -> None:
    """Refuse a code spec read from a file unless the caller named it or trusts the file; imports nothing."""
    kind, _ = _split(spec)
    if kind in DATA_SPEC_KINDS or trust_code or model == spec:
        return
    other = f" (the model you named is {model!r})" if model is not None else ""
    raise ModelSpecError(
        f"it names code {spec!r} as its model{other} and prunecore does not run code named in a file; "
        f"if you trust the file, pass that same spec (model={spec!r}, --model {spec} on the CLI) or "
        "trust_code=True (--trust-model-code on the CLI)"
    )


def _read_pruned(path: Path) -> dict[str, Any]:
    """The validated payload of a pruned-model file; `ModelSpecError` saying what is wrong otherwise."""
    where = f"pruned-model file {str(path)!r}"
    if not path.is_file():
        raise ModelSpecError(f"{where} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        message = f"{where} is not readable (corrupt, truncated, or not saved with torch.save): {_load_failure(exc)}"
        raise ModelSpecError(message) from None
    if not isinstance(payload, dict) or "format" not in payload:
        plain = isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values())
        what = "a plain state_dict" if plain else f"a {type(payload).__name__}"
        raise ModelSpecError(f"{where} holds {what}, not a pruned model ({PRUNED_FORMAT}, written by "
                             "`prunecore apply` or save_pruned)")  # fmt: skip
    keys = _PRUNED_KEYS.get(payload["format"]) if isinstance(payload["format"], str) else None
    if keys is None:
        readable = " or ".join(map(repr, _PRUNED_KEYS))
        raise ModelSpecError(f"{where} has format {payload['format']!r}; this prunecore reads {readable}")
    missing, unknown = set(keys) - set(payload), set(payload) - set(keys)
    if missing or unknown:
        problem = f"lacks {sorted(missing)}" if missing else f"has unknown keys {sorted(map(str, unknown))}"
        raise ModelSpecError(f"{where} {problem}")
    for key, kind in (("model", str), ("plan", str), ("state_dict", dict), ("sha256", str)):
        if key in keys and not isinstance(payload[key], kind):
            raise ModelSpecError(f"{where}: {key!r} must be a {kind.__name__}, got {type(payload[key]).__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()):
        raise ModelSpecError(f"{where}: 'state_dict' must map names to tensors")
    if "sha256" in keys and payload["sha256"] != _pruned_digest(payload):
        raise ModelSpecError(f"{where} does not match its SHA-256: its plan or weights were changed after saving")
    return payload


def _pruned_digest(payload: Mapping[str, Any]) -> str:
    """SHA-256 over format, spec, plan JSON and each tensor's name, dtype, shape and bytes, by name.

    Every field is length-prefixed, so no two different payloads hash the same bytes.
    """
    digest = hashlib.sha256()

    def field(data: bytes | memoryview) -> None:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for key in ("format", "model", "plan"):
        field(payload[key].encode())
    state = payload["state_dict"]
    for name in sorted(state):
        tensor = state[name].detach().cpu().resolve_conj().resolve_neg().contiguous()
        field(name.encode())
        field(str(tensor.dtype).encode())
        field(",".join(map(str, tensor.shape)).encode())
        field(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # raw bytes, any dtype
    return digest.hexdigest()


def _load_failure(exc: BaseException) -> str:
    """The informative line of a `torch.load` error: the unpickler's reason, not its weights_only advice."""
    text = str(exc)
    _, found, reason = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (reason if found else text).splitlines() if line.strip()]
    return lines[0].split(" was not an allowed global")[0][:200] if lines else type(exc).__name__
