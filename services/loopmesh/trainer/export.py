"""From a trained module to what Triton serves: an ONNX graph, checked, plus its weights.

The artefact of a version is ``model.onnx`` (run by onnxruntime: Triton's python backend with
``mesh/triton_python_model.py`` locally, Triton's native ``onnxruntime`` backend in the NVIDIA
container) and ``weights.safetensors`` (the module's state dict, for the next run's warm
start: no pickle is ever loaded). ``bench/export_bench.py`` measured ONNX against TorchScript
in the python backend; docs/architecture.md has the figures.

Export is generic over any module that takes one ``[batch, n]`` float32 tensor and returns
``[batch, k]`` (or ``[batch]``, read as k = 1). It happens in the trainer, before anything is
published, and fails loudly:

- the module is captured with ``torch.export`` (non-strict, batch dimension dynamic) and then
  converted. ``torch.onnx.export`` given a module would fall back to a draft export that
  specialises data-dependent Python control flow on the sample, silently; given the
  ``ExportedProgram`` it cannot.
- the ONNX graph then runs in onnxruntime on a sample batch (the holdout rows, NaNs
  included) and must reproduce the torch module's outputs within ``tolerance`` (max abs
  diff), else ``ExportError``.

A failure of either is an ``ExportError``, which ends the training run as failed with the
reason (``core`` records any exception of the run that way).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from loopmesh.mesh import model_repo

StateDict = dict[str, torch.Tensor]
FloatArray = npt.NDArray[np.float64]

TOLERANCE = 1e-4
"""Max abs difference between the torch module and its ONNX graph on the sample batch
(float32 arithmetic in another order; probabilities and logits of tabular models)."""
OPSET = 18
"""The ONNX opset written: 18 is the lowest the torch exporter emits, and onnxruntime has run
it since 1.14, so older Triton containers load the same file."""
_REASON_LIMIT = 400


class ExportError(RuntimeError):
    """The module cannot be exported to ONNX, or its ONNX graph does not reproduce it."""


@dataclass(frozen=True)
class ExportedModel:
    """What a version directory gets: the graph, the weights, and what was checked."""

    onnx: bytes
    weights: bytes
    n_features: int
    n_outputs: int
    max_abs_diff: float
    """Between torch and onnxruntime on the sample batch (at most ``TOLERANCE``)."""


class _Batched(nn.Module):
    """The user's module with its output made ``[batch, k]`` (a ``[batch]`` output is k = 1)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out.reshape(x.shape[0], -1)


def export_module(
    module: nn.Module,
    sample: FloatArray | npt.NDArray[np.float32],
    *,
    tolerance: float = TOLERANCE,
) -> ExportedModel:
    """ONNX of ``module`` (CPU, eval mode), verified on ``sample`` rows ``[m, n]``.

    Raises ExportError with the reason when the module cannot be captured or converted, when
    its output is not one float tensor of ``[batch, k]``, or when onnxruntime's answers differ
    from the module's by more than ``tolerance``.
    """
    x = np.asarray(sample, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ExportError(f"the sample batch must be [rows>0, features>0], got {list(x.shape)}")
    n_features = int(x.shape[1])
    module = module.cpu().eval()
    wrapped = _Batched(module).eval()
    example = torch.from_numpy(x[: min(len(x), 2)].copy())
    if len(example) < 2:  # a batch of 1 would be specialised to a constant 1
        example = torch.cat([example, example])
    with torch.no_grad():
        try:
            expected = wrapped(torch.from_numpy(x))
        except Exception as exc:
            raise ExportError(f"the module fails on the sample batch: {_reason(exc)}") from exc
    if not isinstance(expected, torch.Tensor) or expected.dtype != torch.float32:
        raise ExportError(f"the module must return a float32 tensor, got {_kind(expected)}")
    n_outputs = int(expected.shape[1])
    with _quiet_exporter():
        try:
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(
                wrapped, (example,), dynamic_shapes=({0: batch},), strict=False
            )
        except Exception as exc:
            raise ExportError(
                f"torch.export cannot capture the module (data-dependent Python control "
                f"flow, numpy, or an untraceable op?): {_reason(exc)}"
            ) from exc
        try:
            onnx_program = torch.onnx.export(
                program,
                (example,),
                input_names=[model_repo.INPUT_NAME],
                output_names=[model_repo.OUTPUT_NAME],
                opset_version=OPSET,
                dynamo=True,
                optimize=True,
                external_data=False,
                verbose=False,
            )
            if onnx_program is None:
                raise RuntimeError("torch.onnx.export returned no program")
            payload = onnx_program.model_proto.SerializeToString()
        except Exception as exc:
            raise ExportError(f"the module cannot be converted to ONNX: {_reason(exc)}") from exc
    got = run_onnx(payload, x)
    want = expected.numpy()
    if got.shape != want.shape:
        raise ExportError(
            f"the ONNX graph answers shape {list(got.shape)}, the module {list(want.shape)}"
        )
    diff = _max_abs_diff(got, want)
    if not diff <= tolerance:
        raise ExportError(
            f"the ONNX graph does not reproduce the module: max abs diff {diff:.3g} > "
            f"{tolerance:g} on {len(x)} sample rows"
        )
    return ExportedModel(
        onnx=payload,
        weights=weights_bytes(module),
        n_features=n_features,
        n_outputs=n_outputs,
        max_abs_diff=diff,
    )


def run_onnx(
    payload_or_path: bytes | Path, x: FloatArray | npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """The graph's answers to rows ``x`` in onnxruntime (CPU), ``[rows, k]`` float32."""
    session = _session(payload_or_path)
    out = session.run([model_repo.OUTPUT_NAME], {model_repo.INPUT_NAME: np.asarray(x, np.float32)})
    return np.asarray(out[0], dtype=np.float32)


class OnnxScoring:
    """A published ``model.onnx`` as a callable on float tensors (the stable version's answers
    on the holdout, exactly as Triton computes them)."""

    def __init__(self, path: Path) -> None:
        self._session = _session(path)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().to("cpu", torch.float32).numpy()
        out = self._session.run([model_repo.OUTPUT_NAME], {model_repo.INPUT_NAME: rows})
        return torch.from_numpy(np.asarray(out[0], dtype=np.float32))


def weights_bytes(module: nn.Module) -> bytes:
    """The module's state dict as safetensors (plain tensors, no pickle)."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    return save(state, metadata={"format": "pt"})


def load_weights(path: Path, expected_sha256: str | None) -> StateDict:
    """A version's ``weights.safetensors``, refused unless it matches ``expected_sha256``."""
    from safetensors.torch import load

    data = Path(path).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if expected_sha256 is None or actual != expected_sha256:
        raise ValueError(
            f"{path}: sha256 {actual} is not the recorded {expected_sha256}; refusing to load"
        )
    return dict(load(data))


def _session(payload_or_path: bytes | Path) -> Any:
    """An onnxruntime session on one CPU thread, not spinning (as Triton's model.py runs it)."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = payload_or_path if isinstance(payload_or_path, bytes) else str(payload_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _max_abs_diff(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    same_nan = np.isnan(a) & np.isnan(b)
    if (np.isnan(a) != np.isnan(b)).any():
        return float("inf")
    if a.size == 0 or same_nan.all():
        return 0.0
    return float(np.max(np.abs(np.where(same_nan, 0.0, a - b))))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _reason(exc: BaseException) -> str:
    """The first lines of an exporter's message and of its innermost cause (they run to
    pages of graph dumps), cut short."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 8:
        lines = [ln.strip() for ln in _ANSI.sub("", str(seen)).splitlines() if ln.strip()]
        parts.append(f"{type(seen).__name__}: {lines[0] if lines else ''}".strip())
        seen = seen.__cause__
    text = parts[0] if len(parts) == 1 else f"{parts[0]} (cause: {parts[-1]})"
    return text if len(text) <= _REASON_LIMIT else text[:_REASON_LIMIT] + "..."


def _kind(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return type(value).__name__


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs warnings about optional packages (torchvision) and deprecations that
    say nothing about this model; failures still raise."""
    loggers = [
        logging.getLogger(n)
        for n in (
            "torch.onnx",
            "torch.export",
            "torch._export",
            "torch.fx",
            "onnx_ir",
            "onnxscript",
        )
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
