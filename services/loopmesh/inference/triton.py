"""The gateway's Triton client: a small pool of grpc.aio channels with tritonclient's stubs.

tritonclient's own aio ``InferenceServerClient`` only builds requests from ``InferInput``
objects; the gateway must also forward a caller's ``ModelInferRequest`` untouched, so it keeps
its own channels and uses tritonclient's generated ``GRPCInferenceServiceStub`` on them (plus
a bytes-in, bytes-out ModelInfer method: a forwarded request or answer is never decoded and
re-encoded). Answers to Predict are decoded with tritonclient's ``InferResult``.

Channels come from ``loopmesh.mesh.channels`` (TLS as ``LOOPMESH_TRITON_CLIENT__*`` says, off
by default; a CLIENT span per call so a Predict's trace reaches Triton; no token: Triton does
not check LoopMesh's). They reconnect quickly (Triton restarts come back within a second or
two) and never wait for readiness: a call while Triton is down fails at once with UNAVAILABLE.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc

from loopmesh.inference import instruments
from loopmesh.inference.core import BackendError
from loopmesh.mesh.channels import aio_channel
from loopmesh.mesh.model_repo import INPUT_NAME, OUTPUT_NAME
from loopmesh.mesh.settings import GrpcClientSettings, TritonClientSettings

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

# Codes after which another version or a later retry may succeed.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    # Default backoff grows to minutes; Triton restarts should be noticed in ~1 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # Without a local pool, channels with equal arguments share one TCP connection.
    ("grpc.use_local_subchannel_pool", 1),
]
"""Channel arguments of the gateway's clients, on top of the channel factory's."""


class TritonPool:
    """Round-robin over ``size`` channels to one tritonserver."""

    def __init__(
        self,
        url: str,
        *,
        size: int,
        timeout_s: float,
        client: GrpcClientSettings | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.url = url
        self.timeout_s = timeout_s
        settings = client or TritonClientSettings()
        self._channels = [
            aio_channel(url, settings, options=RECONNECT_OPTIONS) for _ in range(size)
        ]
        self._stubs = [service_pb2_grpc.GRPCInferenceServiceStub(c) for c in self._channels]
        self._raw_infer = [
            c.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
            for c in self._channels
        ]
        self._next = itertools.cycle(range(size))
        self._index_ttl_s = 2.0
        self._index_at = -1e9
        self._ready: dict[str, list[int]] = {}

    def stub(self) -> Any:
        """A tritonclient GRPCInferenceServiceStub (typed requests and answers)."""
        return self._stubs[next(self._next)]

    def timeout(self, remaining: float | None) -> float:
        """This call's deadline: the configured one, shortened to the caller's remaining time."""
        if remaining is None:
            return self.timeout_s
        return max(0.001, min(self.timeout_s, remaining))

    async def forward_infer(self, request: bytes, timeout: float) -> bytes:
        """Send a serialized ModelInferRequest, return the serialized answer (AioRpcError)."""
        answer: bytes = await self._raw_infer[next(self._next)](request, timeout=timeout)
        return answer

    async def score_rows(
        self, model_name: str, version: int, rows: Sequence[Sequence[float]]
    ) -> Sequence[Sequence[float]]:
        """The outputs of each row from that version, ``[rows][k]`` (ScoreBackend);
        BackendError on failure. Whether k is the version's is the caller's check."""
        x = np.asarray(rows, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise BackendError(f"rows must be a non-empty matrix, not {x.shape}", unavailable=False)
        request = service_pb2.ModelInferRequest(model_name=model_name, model_version=str(version))
        tensor = request.inputs.add()
        tensor.name = INPUT_NAME
        tensor.datatype = "FP32"
        tensor.shape.extend(x.shape)
        request.raw_input_contents.append(x.tobytes())
        request.outputs.add().name = OUTPUT_NAME
        try:
            response = await self.stub().ModelInfer(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as err:
            instruments.record_triton_error(model_name, version, err.code().name)
            raise BackendError(
                f"triton {model_name}/{version}: {err.code().name}: {err.details()}",
                unavailable=err.code() in RETRYABLE,
            ) from err
        scores = InferResult(response).as_numpy(OUTPUT_NAME)
        if scores is None or scores.ndim == 0 or scores.shape[0] != x.shape[0] or not scores.size:
            instruments.record_triton_error(model_name, version, "BAD_ANSWER")
            raise BackendError(
                f"triton {model_name}/{version} answered {None if scores is None else scores.shape}"
                f" for {x.shape[0]} rows",
                unavailable=False,
            )
        result: list[list[float]] = scores.reshape(x.shape[0], -1).astype(np.float64).tolist()
        return result

    async def ready_versions(self, model_name: str) -> list[int]:
        """Versions of ``model_name`` Triton has READY (cached briefly); [] when unknown."""
        now = time.monotonic()
        if now - self._index_at > self._index_ttl_s:
            request = service_pb2.RepositoryIndexRequest(ready=True)
            try:
                index = await self.stub().RepositoryIndex(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError:
                return []
            ready: dict[str, list[int]] = {}
            for entry in index.models:
                if entry.state == "READY" and entry.version.isdigit():
                    ready.setdefault(entry.name, []).append(int(entry.version))
            self._ready = {name: sorted(versions) for name, versions in ready.items()}
            self._index_at = now
        return self._ready.get(model_name, [])

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
