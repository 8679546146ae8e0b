"""Shared parts of the inference gateway tests (no tests here).

``FixedFeatureService`` is a real grpc.aio server speaking the FeatureService API
(protos/loopmesh/v1/features.proto) with fixed, computable values: the peer's contract, served
on a real port, so the gateway is exercised only through the proto.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import torch
import tritonclient.grpc.aio as aioclient

from loopmesh.gen.loopmesh.v1 import common_pb2, features_pb2, features_pb2_grpc
from loopmesh.inference.app import InferenceGateway
from loopmesh.inference.settings import InferenceScope, InferenceSettings
from loopmesh.mesh import model_repo
from loopmesh.mesh.settings import GrpcServerSettings, KafkaSettings
from loopmesh.trainer.export import export_module

FEATURES = [
    "entity_activity:events_24h",
    "entity_numeric:value_mean",
    "hour",  # plain name: only the request's context can supply it
    "entity_activity:events_total",
]
DEFAULTS = {"entity_activity:events_24h": 1.5, "hour": 12.0}
LOAD_TIMEOUT = 120.0
CALL_TIMEOUT = 30.0


def stored_value(entity_id: str, ref: str) -> float | str | None:
    """What the fixed feature service holds; entities named ``new-*`` have nothing yet."""
    if entity_id.startswith("new-"):
        return None
    h = zlib.crc32(entity_id.encode())
    return {
        "entity_activity:events_24h": (h % 17) / 8.0,
        "entity_numeric:value_mean": (h % 1000) / 250.0 - 2.0,
        "entity_activity:events_total": (h % 101) / 50.0,
        "entity_numeric:last_event_type": "click",
    }.get(ref)


class FixedFeatureService(features_pb2_grpc.FeatureServiceServicer):
    """GetOnlineFeatures from ``stored_value``; ``down`` makes every call UNAVAILABLE."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0
        self.entities = 0

    async def GetOnlineFeatures(
        self, request: features_pb2.GetOnlineFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.GetOnlineFeaturesResponse:
        self.calls += 1
        self.entities += len(request.entity_ids)
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "feature store is down")
        response = features_pb2.GetOnlineFeaturesResponse(feature_refs=request.feature_refs)
        for entity_id in request.entity_ids:
            entity = response.entities.add(entity_id=entity_id)
            for ref in request.feature_refs:
                value = stored_value(entity_id, ref)
                if value is None:
                    entity.values.add(status=features_pb2.FEATURE_STATUS_MISSING)
                elif isinstance(value, str):
                    entity.values.add(
                        value=common_pb2.Value(text=value),
                        status=features_pb2.FEATURE_STATUS_PRESENT,
                    )
                else:
                    entity.values.add(
                        value=common_pb2.Value(number=value),
                        status=features_pb2.FEATURE_STATUS_PRESENT,
                    )
        return response


@contextlib.asynccontextmanager
async def feature_server() -> AsyncIterator[tuple[FixedFeatureService, str]]:
    server = grpc.aio.server()
    servicer = FixedFeatureService()
    features_pb2_grpc.add_FeatureServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def onnx_model(seed: int, n_features: int = len(FEATURES)) -> bytes:
    """A small model.onnx, as the trainer exports it."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(n_features, 1), torch.nn.Sigmoid()).eval()
    sample = np.random.default_rng(seed).normal(size=(8, n_features))
    return export_module(module, sample).onnx


def publish(repo: Path, model: str, versions: Sequence[int], features: list[str]) -> None:
    for version in versions:
        model_repo.write_version(
            repo,
            model,
            version,
            onnx_model(version),
            {"feature_names": features, "feature_defaults": DEFAULTS},
            n_features=len(features),
        )


async def load(triton_url: str, model: str) -> None:
    async with aioclient.InferenceServerClient(triton_url) as client:
        await client.load_model(model, client_timeout=LOAD_TIMEOUT)


async def direct_scores(triton_url: str, model: str, version: int, rows: np.ndarray) -> np.ndarray:
    """Triton's own answer for ``rows`` (what the gateway must reproduce)."""
    x = np.asarray(rows, dtype=np.float32)
    inp = aioclient.InferInput(model_repo.INPUT_NAME, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    async with aioclient.InferenceServerClient(triton_url) as client:
        result = await client.infer(
            model, [inp], model_version=str(version), client_timeout=CALL_TIMEOUT
        )
    out = result.as_numpy(model_repo.OUTPUT_NAME)
    assert out is not None
    return out.reshape(-1)


def expected_row(entity_id: str, context: dict[str, float], features: list[str]) -> list[float]:
    row = []
    for name in features:
        if name in context:
            row.append(context[name])
            continue
        value = stored_value(entity_id, name) if ":" in name else None
        row.append(float(value) if isinstance(value, float) else DEFAULTS.get(name, 0.0))
    return row


def settings_for(
    kafka: KafkaSettings,
    triton_url: str,
    repository: Path,
    features_url: str,
    *,
    predictions_topic: str,
    rollouts_topic: str,
    **scope: object,
) -> InferenceSettings:
    return InferenceSettings(
        kafka=kafka,
        triton_url=triton_url,
        model_repository=repository,
        inference=InferenceScope(
            server=GrpcServerSettings(port=0, grace_seconds=1),
            features_url=features_url,
            predictions_topic=predictions_topic,
            rollouts_topic=rollouts_topic,
            triton_timeout_s=5.0,
            **scope,  # type: ignore[arg-type]
        ),
    )


@contextlib.asynccontextmanager
async def running(settings: InferenceSettings) -> AsyncIterator[InferenceGateway]:
    gateway = InferenceGateway(settings)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()
