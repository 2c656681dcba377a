"""Deployment: the pruned model as an ONNX graph checked by ONNX Runtime, and its INT8 version.

Structured pruning leaves an ordinary dense model, so it deploys like any other; ONNX is the usual
road out of PyTorch. `export_onnx` exports through `torch.export` with the batch dimension
symbolic (one symbol per distinct batch size of the inputs), then runs the file in ONNX Runtime on
the example and on another batch size and compares with PyTorch, so a file that loads but computes
something else is never handed over. A model whose code fixes its batch size exports for the
example's shapes, and says so. `quantize_int8` quantises the checked file with ONNX Runtime's
static quantisation (activation ranges calibrated on real batches) or dynamic quantisation
(weights only), the INT8 on top of structured sparsity that production stacks combine.
`deploy_onnx` does both with the one rule the CLI and `measure_plan` share: static for image models
calibrated on the data's calibration batches, dynamic for language models and without data.

    >>> exported = export_onnx(pruned, example, "pruned.onnx")       # checked against PyTorch
    >>> exported.max_abs_diff, exported.dynamic_batch
    (1.9e-06, True)
    >>> quantize_int8("pruned.onnx", "pruned.int8.onnx", calibration_loader)
    >>> deploy_onnx(pruned, example, "pruned.onnx", "pruned.int8.onnx", data).mode
    'static, calibrated on sample held-out digits (250 images; calibration 250)'

Needs `onnx`, `onnxscript` and `onnxruntime` (`pip install 'prunecore[deploy]'`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from prunecore._modes import working_copy
from prunecore.errors import UserError
from prunecore.evaluate import split_batch
from prunecore.files import check_output_path, write_atomic

if TYPE_CHECKING:
    from prunecore.datasets import EvalData

__all__ = [
    "DeployError", "Deployment", "OnnxExport", "OnnxModule", "deploy_onnx", "dynamic_batch", "export_onnx",
    "onnx_session", "onnxruntime", "quantize_int8",
]  # fmt: skip


class DeployError(UserError, RuntimeError):
    """The model does not export, its export computes something else, or a runtime is missing."""


@dataclass(frozen=True)
class OnnxExport:
    """A written, checked ONNX file: the largest |ONNX Runtime - PyTorch| output difference over the batch
    sizes it was run at, and whether its batch size is symbolic."""

    path: Path
    max_abs_diff: float
    batch_sizes: tuple[int, ...]
    dynamic_batch: bool
    opset: int


@dataclass(frozen=True)
class Deployment:
    """What `deploy_onnx` wrote: the checked float export and, when asked for, its INT8 version and how it
    was quantised (`mode`, one line for reports; empty without INT8)."""

    onnx: OnnxExport
    int8: Path | None = None
    mode: str = ""

    @property
    def max_abs_diff(self) -> float:
        """The float export's largest |ONNX Runtime - PyTorch| output difference (the INT8 file is not checked)."""
        return self.onnx.max_abs_diff


def dynamic_batch(example: Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple]:
    """Inputs and `dynamic_shapes` that make dim 0 of every input symbolic (one symbol per distinct size).

    An example batch of 1 is repeated to 2 for the trace: torch.export specialises a dim of size 1.
    """
    dims: dict[int, torch.export.Dim] = {}
    inputs, shapes = [], []
    for x in example:
        if x.dim() == 0:
            inputs.append(x)
            shapes.append(None)
            continue
        dim = dims.setdefault(x.shape[0], torch.export.Dim(f"batch{len(dims)}", min=1))
        inputs.append(x.expand(2, *x.shape[1:]).clone() if x.shape[0] == 1 else x)
        shapes.append({0: dim})
    return tuple(inputs), tuple(shapes)


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | Path,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    opset: int | None = None,
) -> OnnxExport:
    """Write `model` (in eval mode; not changed) as ONNX to `path`, batch size symbolic where it can be.

    With `check`, ONNX Runtime runs the file on the example and on a batch of another size and every
    output must equal PyTorch's within `rtol`/`atol`, else `DeployError` and nothing is written. An
    op the exporter cannot translate is a `DeployError` naming it.
    """
    path = check_output_path(path, "ONNX file")
    _exporter()  # a missing package is said once, not again by the retry with fixed shapes
    example = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    model = working_copy(model).eval()  # the caller's model keeps its training flags (shared tensors, no copy)
    inputs, shapes = dynamic_batch(example)
    with tempfile.TemporaryDirectory() as tmp:
        written = Path(tmp) / "model.onnx"
        dynamic = True
        try:
            program = _export(model, inputs, written, shapes, opset)
        except DeployError as dynamic_error:
            if "unsupported" in str(dynamic_error):
                raise
            dynamic, inputs = False, example
            try:
                program = _export(model, example, written, None, opset)
            except DeployError as exc:
                raise DeployError(f"{exc} (with a symbolic batch size: {dynamic_error})") from None
        dynamic = dynamic and _symbolic_batch(written)  # the exporter may have fixed it where the code does
        batches = (inputs[0].shape[0], inputs[0].shape[0] + 3) if dynamic and inputs[0].dim() else (None,)
        diff = _check(model, written, inputs, batches, rtol, atol) if check else float("nan")
        write_atomic(path, written.read_bytes(), "ONNX file")
    sizes = tuple(b for b in batches if b is not None) or (int(example[0].shape[0]),)
    return OnnxExport(path, diff, sizes, dynamic, program)


def onnx_session(model: str | Path | bytes, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU inference session for a file or a serialised model (`threads`: intra-op threads,
    default torch's)."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only: no optimiser chatter on stdout
    # idle threads sleep instead of spinning: spinning ones slowed whatever ran next in interleaved timing rounds
    # (another session, a PyTorch model) by up to 40 %, at no cost to this session's own latency
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class OnnxModule(nn.Module):
    """An ONNX file behind the `nn.Module` interface, so `evaluate` and `compare_latency` measure it as they
    measure PyTorch models (the same data, metrics and timing rounds). CPU, no gradients, no parameters."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = onnx_session(self.path, threads)
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        feed = {n: x.detach().cpu().numpy() for n, x in zip(self.names, inputs)}
        out = [torch.from_numpy(o) for o in self.session.run(None, feed)]
        return out[0] if len(out) == 1 else tuple(out)

    def __deepcopy__(self, memo: dict) -> OnnxModule:
        return self  # the session is immutable and cannot be copied; working copies share it

    def extra_repr(self) -> str:
        return str(self.path)


def quantize_int8(
    onnx_path: str | Path,
    out: str | Path,
    calibration: Iterable[Any] | None = None,
    batches: int = 16,
    per_channel: bool = True,
) -> Path:
    """INT8 version of a float ONNX file: static quantisation calibrated on `calibration`, else dynamic.

    Static (QDQ, activations and weights INT8, ranges from up to `batches` batches of real inputs)
    is what CNNs need to run faster; dynamic (weights INT8, activations quantised on the fly)
    needs no data and suits Linear-heavy models. Written atomically.
    """
    onnxruntime()
    from onnxruntime import quantization as q

    out = check_output_path(out, "INT8 ONNX file")
    source = Path(onnx_path)
    if not source.is_file():
        raise DeployError(f"ONNX file {str(source)!r} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        prepared, written = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        with _quiet():
            q.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            if calibration is None:
                q.quantize_dynamic(str(prepared), str(written), weight_type=q.QuantType.QInt8,
                                   per_channel=per_channel)  # fmt: skip
            else:
                reader = _Reader(onnx_session(source), calibration, batches)
                q.quantize_static(str(prepared), str(written), reader, quant_format=q.QuantFormat.QDQ,
                                  per_channel=per_channel, activation_type=q.QuantType.QInt8,
                                  weight_type=q.QuantType.QInt8)  # fmt: skip
        write_atomic(out, written.read_bytes(), "INT8 ONNX file")
    return out


def deploy_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    onnx: str | Path,
    int8: str | Path | None = None,
    data: EvalData | None = None,
) -> Deployment:
    """`export_onnx` of `model` to `onnx`, then (with `int8`) `quantize_int8` of that file to `int8`.

    Static INT8 calibrated on `data.calibration` for a model that takes float inputs (images), since
    CNNs need INT8 activations to run faster; dynamic for a language model (token ids in: activation
    outliers defeat static ranges) or when there is no `data`.
    """
    exported = export_onnx(model, example_inputs, onnx)
    if int8 is None:
        return Deployment(exported)
    first = example_inputs if isinstance(example_inputs, torch.Tensor) else example_inputs[0]
    tokens = not first.dtype.is_floating_point
    calibration = None if data is None or tokens else data.calibration
    quantised = quantize_int8(exported.path, int8, calibration)
    mode = (f"static, calibrated on {data.description}" if calibration is not None else
            "dynamic: weights INT8, activations quantised per batch" + (" (a language model)" if tokens else ""))
    return Deployment(exported, quantised, mode)


def onnxruntime() -> Any:
    """The `onnxruntime` module, or a `DeployError` saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise DeployError("ONNX export and INT8 need onnx, onnxscript and onnxruntime: "
                          "pip install 'prunecore[deploy]'") from None  # fmt: skip
    return onnxruntime


# -- helpers ----------------------------------------------------------------------------------------
def _exporter() -> None:
    """`DeployError` unless ONNX Runtime (to check the file) and onnxscript (the dynamo exporter's) are there."""
    onnxruntime()
    try:
        import onnxscript  # noqa: F401  # the dynamo exporter's dependency: say so before torch does
    except ImportError:
        raise DeployError("ONNX export needs onnxscript: pip install 'prunecore[deploy]'") from None


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporter and the quantiser print progress to stdout and log at INFO: keep the caller's output clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, shapes: tuple | None,
            opset: int | None) -> int:  # fmt: skip
    """Export with the dynamo exporter; the opset written. `DeployError` with the first line of the reason."""
    kwargs = {} if opset is None else {"opset_version": opset}
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(model, inputs, str(path), dynamo=True, dynamic_shapes=shapes, verbose=False,
                                        external_data=False, **kwargs)  # fmt: skip
    except Exception as exc:  # the exporter fails in many ways: keep what names the op
        raise DeployError(f"{type(model).__name__} does not export to ONNX: {_reason(exc)}") from None
    return int(program.model.opset_imports.get("", 0)) if program is not None else int(opset or 0)


def _reason(exc: BaseException) -> str:
    """The exporter's long message reduced to what failed: the op it could not translate, and why."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # no terminal colours in an error line
    op = re.search(r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]", text) or re.search(r"\b(aten\.\w+)", text)
    summary = text.split("## Exception summary", 1)[1] if "## Exception summary" in text else ""
    causes = [ln.split(">: ", 1)[1] for ln in summary.splitlines() if ln.startswith("<class") and ">: " in ln]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    why = causes[0] if causes else lines[0] if lines else type(exc).__name__
    if op and re.search(r"(?i)unsupported|not supported|no (decomposition|symbolic|onnx function)|translat", text):
        return f"op {op.group(1)} cannot be translated (unsupported): {why[:200]}"
    return why[:300]


def _check(model: nn.Module, path: Path, inputs: tuple[torch.Tensor, ...], batches: Sequence[int | None],
           rtol: float, atol: float) -> float:  # fmt: skip
    """Run the file in ONNX Runtime at each batch size (None: the inputs as they are); the largest difference."""
    session = onnx_session(path)
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    for batch in batches:
        feed = inputs if batch is None else tuple(_resized(x, batch) for x in inputs)
        with torch.no_grad():
            expected = _flat(model(*feed))
        got = session.run(None, {n: x.numpy() for n, x in zip(names, feed)})
        if len(got) != len(expected):
            raise DeployError(f"the ONNX file has {len(got)} outputs, the model {len(expected)}")
        for i, (want, have) in enumerate(zip(expected, got)):
            want = want.detach().cpu().numpy()
            if want.shape != have.shape:
                raise DeployError(f"output {i} of the ONNX file has shape {have.shape}, PyTorch's {want.shape} "
                                  f"(batch {batch})")  # fmt: skip
            diff = float(np.max(np.abs(want - have))) if want.size else 0.0
            if not np.allclose(have, want, rtol=rtol, atol=atol):
                raise DeployError(f"the ONNX file computes another function: output {i} differs from PyTorch's by "
                                  f"up to {diff:.3g} at batch {batch} (rtol {rtol}, atol {atol})")  # fmt: skip
            worst = max(worst, diff)
    return worst


def _symbolic_batch(path: Path) -> bool:
    """Whether dim 0 of every batched input of the ONNX file is a symbol, not a number."""
    shapes = [i.shape for i in onnx_session(path).get_inputs()]
    return all(not s or isinstance(s[0], str) for s in shapes) and any(s for s in shapes)


def _resized(x: torch.Tensor, batch: int) -> torch.Tensor:
    """`x` with `batch` rows (seeded random rows of its own kind), other dims kept."""
    if x.dim() == 0 or x.shape[0] == batch:
        return x
    g = torch.Generator().manual_seed(batch)
    if x.dtype.is_floating_point:
        return torch.randn((batch, *x.shape[1:]), generator=g, dtype=x.dtype)
    return x[torch.randint(0, x.shape[0], (batch,), generator=g)]


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat(o)]
    raise DeployError(f"the model returns a {type(out).__name__}; ONNX export needs tensors (or tuples of them)")


class _Reader:
    """ONNX Runtime's calibration data reader over the first `batches` batches of a loader."""

    def __init__(self, session: Any, data: Iterable[Any], batches: int) -> None:
        self.name = session.get_inputs()[0].name
        self.batches = iter(islice(data, batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.name: split_batch(batch)[0].numpy()}

    def rewind(self) -> None:  # the quantiser reads once
        pass
