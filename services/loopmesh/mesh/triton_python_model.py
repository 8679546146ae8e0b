"""Triton python-backend model that serves one TorchScript version of a LoopMesh model.

This file is copied verbatim into every ``<repo>/<model>/<version>/model.py`` by
``loopmesh.mesh.model_repo.write_version`` and runs inside Triton's python backend stub, where
``triton_python_backend_utils`` exists. It must stay self-contained (no ``services`` imports):
the stub's interpreter does not have this repo on its path.

Tensors cross the stub boundary via DLPack, never numpy: the stub's pybind11 predates the
numpy 2 ABI, and with numpy 2 installed ``as_numpy()``/``Tensor(name, ndarray)`` silently read
garbage inputs and send empty outputs.

Errors are loud by design: a checksum mismatch refuses to load, and a bad request or a model
output of the wrong shape yields an error response, never an empty tensor.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils

INPUT_NAME = "INPUT__0"
OUTPUT_NAME = "OUTPUT__0"
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class TritonPythonModel:
    """One instance per Triton model instance; ``execute`` gets a dynamic batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        # args["model_repository"] is the model's directory, not the repository root.
        version_dir = Path(args["model_repository"]) / args["model_version"]
        metadata = json.loads((version_dir / "metadata.json").read_text())
        expected = metadata.get("sha256")
        if not isinstance(expected, str) or len(expected) != 64:
            raise pb_utils.TritonModelException(
                f"{version_dir}/metadata.json has no valid sha256; refusing to load"
            )
        actual = _sha256(version_dir / "model.pt")
        if actual != expected:
            raise pb_utils.TritonModelException(
                f"sha256 mismatch for {version_dir}/model.pt: metadata says {expected}, "
                f"file is {actual}; refusing to load"
            )
        self.n_features = int(metadata["n_features"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module = torch.jit.load(str(version_dir / "model.pt"), map_location=self.device)
        self.module.eval()
        self.name = f"{args['model_name']}/{args['model_version']}"
        pb_utils.Logger.log_info(f"{self.name}: loaded sha256={actual[:12]} on {self.device}")

    def execute(self, requests: list[Any]) -> list[Any]:
        # Validate every request first so one bad request fails alone, not the whole batch.
        inputs: list[torch.Tensor | None] = []
        errors: list[str | None] = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
            if tensor is None:
                inputs.append(None)
                errors.append(f"{self.name}: request has no {INPUT_NAME}")
                continue
            x = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
            if x.dim() != 2 or x.shape[1] != self.n_features or x.shape[0] == 0:
                inputs.append(None)
                errors.append(
                    f"{self.name}: {INPUT_NAME} has shape {list(x.shape)}, "
                    f"expected [batch>0, {self.n_features}]"
                )
                continue
            inputs.append(x)
            errors.append(None)

        good = [x for x in inputs if x is not None]
        outputs: torch.Tensor | None = None
        batch_error: str | None = None
        if good:
            try:
                outputs = self._forward(torch.cat(good, dim=0))
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
            rows = outputs[offset : offset + batch_part.shape[0]].contiguous()
            offset += batch_part.shape[0]
            out = pb_utils.Tensor.from_dlpack(OUTPUT_NAME, torch.utils.dlpack.to_dlpack(rows))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            result = self.module(batch.to(self.device, torch.float32))
        if not isinstance(result, torch.Tensor):
            raise TypeError(f"model returned {type(result).__name__}, expected a Tensor")
        out = result.detach().to("cpu", torch.float32)
        if out.dim() == 1:
            out = out.reshape(-1, 1)
        if tuple(out.shape) != (batch.shape[0], 1):
            raise ValueError(
                f"model output shape {list(out.shape)}, expected [{batch.shape[0]}, 1]"
            )
        if not bool(torch.isfinite(out).all()):
            raise ValueError("model output contains NaN or Inf")
        return out

    def finalize(self) -> None:
        pb_utils.Logger.log_info(f"{self.name}: unloaded")
