"""Triton python-backend model that serves one ONNX version of a LoopMesh model (onnxruntime).

This file is copied verbatim into every ``<repo>/<model>/<version>/model.py`` by
``loopmesh.mesh.model_repo.write_version`` and runs inside Triton's python backend stub, where
``triton_python_backend_utils`` exists. It must stay self-contained (no ``services`` imports):
the stub's interpreter does not have this repo on its path. It imports onnxruntime and numpy,
never torch: a load is the stub's start plus one onnxruntime session (bench/export_bench.py).
Triton's native ``onnxruntime`` backend (``render_config(backend="onnxruntime")``) serves the
same ``model.onnx`` and ignores this file.

Tensors cross the stub boundary via DLPack, never ``as_numpy()`` / ``Tensor(name, ndarray)``:
the stub's pybind11 predates the numpy 2 ABI, and with numpy 2 installed those silently read
garbage inputs and send empty outputs. ``numpy.from_dlpack(tensor)`` (the stub's Tensor has
``__dlpack__``) and ``Tensor.from_dlpack(name, ndarray)`` (numpy arrays have ``__dlpack__``)
work with numpy 2 (checked against tritonserver 2.45 and numpy 2.4 by
``tests/test_triton_server.py``). onnxruntime takes and returns numpy arrays; its CPU wheel
has no DLPack.

The stub marks a consumed DLPack capsule ``used_dlpack``, not the standard ``used_dltensor``:
numpy's capsule destructor then takes it for unconsumed and fails, printing a traceback per
response (tens of thousands a test run, and Triton's CPU). ``_output`` hands the stub the
capsule itself and renames it to the standard name once the stub has taken it.

Errors are loud by design: a checksum mismatch refuses to load, and a bad request or a model
output of the wrong shape yields an error response, never an empty tensor.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUT_NAME = "INPUT__0"
OUTPUT_NAME = "OUTPUT__0"
_USED = b"used_dltensor"
"""The DLPack name of a consumed capsule (kept alive here: the capsule points at it)."""
_set_capsule_name = ctypes.pythonapi.PyCapsule_SetName
_set_capsule_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_set_capsule_name.restype = ctypes.c_int
MODEL_FILE = "model.onnx"


def _session_options(config: dict[str, Any]) -> ort.SessionOptions:
    """One intra-op thread and no spinning unless config.pbtxt's parameters say otherwise:
    Triton batches requests and runs instances side by side, and onnxruntime's spinning
    threads would burn a core each between requests."""
    params = config.get("parameters") or {}

    def param(name: str, default: str) -> str:
        value = params.get(name)
        return str(value.get("string_value", default)) if isinstance(value, dict) else default

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(param("intra_op_thread_count", "1"))
    options.inter_op_num_threads = 1
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", param("allow_spinning", "0")
    )
    return options


class TritonPythonModel:
    """One instance per Triton model instance; ``execute`` gets a dynamic batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        # args["model_repository"] is the model's directory, not the repository root.
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.name = f"{args['model_name']}/{args['model_version']}"
        metadata = json.loads((version_dir / "metadata.json").read_text())
        if metadata.get("format", "onnx") != "onnx":
            raise pb_utils.TritonModelException(
                f"{version_dir}: format {metadata.get('format')!r} is not onnx; refusing to load"
            )
        expected = metadata.get("sha256")
        if not isinstance(expected, str) or len(expected) != 64:
            raise pb_utils.TritonModelException(
                f"{version_dir}/metadata.json has no valid sha256; refusing to load"
            )
        path = version_dir / MODEL_FILE
        # Read once: what runs is exactly what was hashed.
        payload = path.read_bytes()
        actual = hashlib.sha256(payload).hexdigest()
        if actual != expected:
            raise pb_utils.TritonModelException(
                f"sha256 mismatch for {path}: metadata says {expected}, "
                f"file is {actual}; refusing to load"
            )
        self.n_features = int(metadata["n_features"])
        self.n_outputs = int(metadata.get("n_outputs", 1))
        config = json.loads(args.get("model_config") or "{}")
        providers: list[Any] = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(args.get("model_instance_device_id") or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self.session = ort.InferenceSession(payload, _session_options(config), providers=providers)
        used = self.session.get_providers()
        pb_utils.Logger.log_info(
            f"{self.name}: loaded sha256={actual[:12]} with onnxruntime {ort.__version__} "
            f"on {used[0]}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        # Validate every request first so one bad request fails alone, not the whole batch.
        inputs: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
            if tensor is None:
                inputs.append(None)
                errors.append(f"{self.name}: request has no {INPUT_NAME}")
                continue
            try:
                x = self._host_array(tensor)
            except Exception as exc:
                inputs.append(None)
                errors.append(f"{self.name}: {INPUT_NAME} unreadable: {type(exc).__name__}: {exc}")
                continue
            if x.ndim != 2 or x.shape[1] != self.n_features or x.shape[0] == 0:
                inputs.append(None)
                errors.append(
                    f"{self.name}: {INPUT_NAME} has shape {list(x.shape)}, "
                    f"expected [batch>0, {self.n_features}]"
                )
                continue
            if x.dtype != np.float32:
                inputs.append(None)
                errors.append(f"{self.name}: {INPUT_NAME} is {x.dtype}, expected float32")
                continue
            inputs.append(x)
            errors.append(None)

        good = [x for x in inputs if x is not None]
        outputs: np.ndarray | None = None
        batch_error: str | None = None
        if good:
            try:
                outputs = self._forward(np.concatenate(good, axis=0))
            except Exception as exc:
                batch_error = f"{self.name}: inference failed: {type(exc).__name__}: {exc}"
                pb_utils.Logger.log_error(batch_error)

        responses = []
        offset = 0
        for batch_part, error in zip(inputs, errors, strict=True):
            if batch_part is None or outputs is None:
                message = error or batch_error or f"{self.name}: no output"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
                continue
            rows = np.ascontiguousarray(outputs[offset : offset + batch_part.shape[0]])
            offset += batch_part.shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[self._output(rows)]))
        return responses

    @staticmethod
    def _output(rows: np.ndarray) -> Any:
        """The output tensor through DLPack (see the module doc for the capsule's name)."""
        capsule = rows.__dlpack__()
        out = pb_utils.Tensor.from_dlpack(OUTPUT_NAME, capsule)
        _set_capsule_name(capsule, _USED)
        return out

    @staticmethod
    def _host_array(tensor: Any) -> np.ndarray:
        """The request tensor as a host numpy array, through DLPack (see the module doc).
        The python backend hands inputs over in CPU memory unless the config sets
        FORCE_CPU_ONLY_INPUT_TENSORS to "no", which ours never does."""
        if not tensor.is_cpu():
            raise ValueError("the input is not in CPU memory (FORCE_CPU_ONLY_INPUT_TENSORS)")
        return np.from_dlpack(tensor)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        result = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        out = np.asarray(result, dtype=np.float32)
        if out.ndim == 1:
            out = out.reshape(-1, 1)
        if out.shape != (batch.shape[0], self.n_outputs):
            raise ValueError(
                f"model output shape {list(out.shape)}, "
                f"expected [{batch.shape[0]}, {self.n_outputs}]"
            )
        if not bool(np.isfinite(out).all()):
            raise ValueError("model output contains NaN or Inf")
        return out

    def finalize(self) -> None:
        pb_utils.Logger.log_info(f"{self.name}: unloaded")
