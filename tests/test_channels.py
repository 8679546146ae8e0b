"""The client-channel factory (loopmesh.mesh.channels): TLS, tokens and trace context.

Unit tests build channels against in-process gRPC servers (no Kafka, Triton or Feast); the
integration test runs Predict through a gateway whose port and feature service both have
TLS and token auth on, and follows its trace from the gateway to the features and Triton.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc._aio_client import UnaryUnaryAioClientInterceptor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import (
    features_pb2,
    features_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)
from loopmesh.mesh import healthcheck
from loopmesh.mesh.auth import AuthSettings, TokenSpec
from loopmesh.mesh.channels import aio_channel, aio_interceptors, sync_channel
from loopmesh.mesh.errors import InvalidArgument, SetupError
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.mesh.settings import (
    GrpcClientSettings,
    GrpcServerSettings,
    KafkaSettings,
    TelemetrySettings,
)
from loopmesh.mesh.topics import PREDICTIONS, ROLLOUTS
from loopmesh.rollout.cli import add_rollout_commands
from tests.helpers import eventually, unique_topic
from tests.support.certs import Pki, make_pki
from tests.support.otlp import Receiver, otlp_receiver
from tests.test_inference_support import (
    CALL_TIMEOUT,
    FEATURES,
    FixedFeatureService,
    direct_scores,
    expected_row,
    load,
    publish,
    running,
    settings_for,
)
from tests.test_rollout_support import unload_models

FEATURE_SERVICE = "loopmesh.v1.FeatureService"
GET_FEATURES = f"/{FEATURE_SERVICE}/GetOnlineFeatures"
PREDICT = "/loopmesh.v1.InferenceService/Predict"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@contextlib.asynccontextmanager
async def secured_features(
    pki: Pki, token: str, *, mutual: bool = False
) -> AsyncIterator[tuple[FixedFeatureService, str]]:
    """The fixed FeatureService behind TLS (mutual when asked) and token auth."""
    settings = GrpcServerSettings(
        port=0,
        grace_seconds=0,
        tls_certfile=pki.server_cert,
        tls_keyfile=pki.server_key,
        tls_client_cafile=pki.ca if mutual else None,
    )
    auth = AuthSettings(tokens=[TokenSpec(name="gateway", token=token, roles=["features"])])
    server = GrpcServer(
        "features-tls", settings, auth=auth, method_roles={GET_FEATURES: "features"}
    )
    servicer = FixedFeatureService()
    features_pb2_grpc.add_FeatureServiceServicer_to_server(servicer, server.server)
    await server.start([FEATURE_SERVICE])
    try:
        yield servicer, server.address
    finally:
        await server.stop()


def mutual(pki: Pki) -> GrpcClientSettings:
    return GrpcClientSettings(
        tls_cafile=pki.ca, tls_certfile=pki.client_cert, tls_keyfile=pki.client_key
    )


async def exported(receiver: Receiver, trace_id: int, name: str, kind: SpanKind) -> bool:
    """Whether a child process exported a span of that trace, name and kind."""
    return any(s.trace_id == trace_id and s.name == name and s.kind == kind for s in receiver.spans)


async def in_trace(
    exporter: InMemorySpanExporter, trace_id: int, name: str, kind: SpanKind
) -> bool:
    """Whether that trace has a finished span of that name and kind (for ``eventually``)."""
    return any(
        s.context.trace_id == trace_id and s.name == name and s.kind == kind
        for s in exporter.get_finished_spans()
    )


# -- unit: the factory on its own -----------------------------------------------------------


def test_half_configured_tls_is_refused_naming_the_setting(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    for factory in (aio_channel, sync_channel):
        with pytest.raises(InvalidArgument, match="tls_keyfile") as err:
            factory("127.0.0.1:1", GrpcClientSettings(tls_certfile=pki.client_cert))
        assert err.value.field == "tls_keyfile"
        with pytest.raises(InvalidArgument) as err:
            factory("127.0.0.1:1", GrpcClientSettings(tls_keyfile=pki.client_key))
        assert err.value.field == "tls_certfile"
        with pytest.raises(InvalidArgument) as err:
            factory("127.0.0.1:1", GrpcClientSettings(server_name_override="localhost"))
        assert err.value.field == "server_name_override"
        with pytest.raises(SetupError) as failed:
            factory("127.0.0.1:1", GrpcClientSettings(tls_cafile=tmp_path / "absent.pem"))
        assert failed.value.field == "tls_cafile"
    # The sync users refuse it as bad usage (exit 2): the health probe and `loopmesh rollout`.
    assert healthcheck.main(["--quiet", "--cert", str(pki.client_cert), "127.0.0.1:1"]) == 2
    parser = argparse.ArgumentParser()
    add_rollout_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["rollout", "status", "--cert-file", str(pki.client_cert)])
    assert args.func(args) == 2


def test_interceptors_trace_and_carry_the_token() -> None:
    auth = AuthSettings(client_token="s3cret-s3cret-s3cret")
    chain = aio_interceptors(GrpcClientSettings(), auth=auth)
    assert isinstance(chain[0], UnaryUnaryAioClientInterceptor)  # tracing, outermost
    assert len(chain) == 8  # four kinds of call, traced, then the token
    assert aio_interceptors(GrpcClientSettings(), tracing=False) == []
    details = grpc.aio.ClientCallDetails(GET_FEATURES, None, None, None, None)
    added = chain[4].details(details)
    assert list(added.metadata) == [("authorization", "Bearer s3cret-s3cret-s3cret")]
    mine = grpc.aio.ClientCallDetails(
        GET_FEATURES, 1.0, grpc.aio.Metadata(("authorization", "Bearer other")), None, None
    )
    assert list(chain[4].details(mine).metadata) == [("authorization", "Bearer other")]
    timed = aio_interceptors(GrpcClientSettings(timeout_s=2.5), tracing=False)
    assert timed[0].details(details).timeout == 2.5


async def test_token_and_trace_cross_a_tls_hop(spans: InMemorySpanExporter, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    request = features_pb2.GetOnlineFeaturesRequest(entity_ids=["alice"], feature_refs=FEATURES)
    async with secured_features(pki, "gw-token-0123456789", mutual=True) as (fixed, address):
        async with aio_channel(address, mutual(pki)) as channel:
            call = features_pb2_grpc.FeatureServiceStub(channel).GetOnlineFeatures(request)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        auth = AuthSettings(client_token="gw-token-0123456789")
        with trace.get_tracer("tests.channels").start_as_current_span("test call") as root:
            async with aio_channel(address, mutual(pki), auth=auth) as channel:
                stub = features_pb2_grpc.FeatureServiceStub(channel)
                answer = await stub.GetOnlineFeatures(request, timeout=CALL_TIMEOUT)
        assert answer.entities[0].values[0].status == features_pb2.FEATURE_STATUS_PRESENT
        trace_id = root.get_span_context().trace_id
        await eventually(
            functools.partial(in_trace, spans, trace_id, GET_FEATURES, SpanKind.SERVER)
        )
        assert await in_trace(spans, trace_id, GET_FEATURES, SpanKind.CLIENT)

        def probe() -> int:
            with sync_channel(address, mutual(pki), auth=auth) as sync:
                reply = health_pb2_grpc.HealthStub(sync).Check(
                    health_pb2.HealthCheckRequest(service=FEATURE_SERVICE), timeout=CALL_TIMEOUT
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                features_pb2_grpc.FeatureServiceStub(sync).GetOnlineFeatures(request, timeout=5)
            tls = ["--ca", str(pki.ca), "--cert", str(pki.client_cert), "--key"]
            return healthcheck.main(["--quiet", *tls, str(pki.client_key), address])

        assert await asyncio.to_thread(probe) == 0
        assert fixed.calls == 2


# -- integration: a Predict through TLS and tokens on both hops, one trace ------------------


async def test_predict_with_tls_and_tokens_on_gateway_and_features_is_one_trace(
    spans: InMemorySpanExporter,
    kafka_settings: KafkaSettings,
    triton: TritonServer,
    model_repository: Path,
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path)
    model = f"chan{uuid.uuid4().hex[:8]}"
    publish(model_repository, model, [1], FEATURES)
    await load(triton.grpc_url, model)
    try:
        async with (
            secured_features(pki, "gw-token-0123456789", mutual=True) as (fixed, address),
            otlp_receiver() as (receiver, otlp),
        ):
            settings = settings_for(
                kafka_settings,
                triton.grpc_url,
                model_repository,
                address,
                predictions_topic=unique_topic(PREDICTIONS).name,
                rollouts_topic=unique_topic(ROLLOUTS).name,
                default_model=model,
                features_client=mutual(pki),
            )
            scope = settings.inference
            server = scope.server.model_copy(
                update={"tls_certfile": pki.server_cert, "tls_keyfile": pki.server_key}
            )
            app = TokenSpec(name="app", token="app-token-0123456789", roles=["predict"])
            settings = settings.model_copy(
                update={
                    "auth": AuthSettings(tokens=[app], client_token="gw-token-0123456789"),
                    "inference": scope.model_copy(update={"server": server}),
                }
            )
            client = GrpcClientSettings(tls_cafile=pki.ca)
            caller = AuthSettings(client_token="app-token-0123456789")
            # Predict is served by the gateway's Go data plane, which exports its spans.
            settings = settings.model_copy(
                update={"telemetry": TelemetrySettings(otlp_endpoint=otlp)}
            )
            async with (
                running(settings) as gateway,
                aio_channel(gateway.address, client, auth=caller) as channel,
            ):
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                with trace.get_tracer("tests.channels").start_as_current_span("predict") as root:
                    answer = await stub.Predict(
                        inference_pb2.PredictRequest(entity_id="alice", context={"hour": 9}),
                        timeout=CALL_TIMEOUT,
                    )
        # The served feature values were used: no degradation, nothing defaulted.
        assert not answer.degraded and list(answer.defaulted_features) == []
        assert fixed.calls == 1
        row = np.asarray([expected_row("alice", {"hour": 9.0}, FEATURES)])
        [score] = await direct_scores(triton.grpc_url, model, 1, row)
        assert answer.score == pytest.approx(float(score), abs=1e-6)
    finally:
        await unload_models(triton.grpc_url, [model])

    trace_id = root.get_span_context().trace_id
    # The data plane's spans (exported in batches, every few seconds).
    hops = [
        ("Predict", SpanKind.SERVER),  # the gateway's server span
        (GET_FEATURES, SpanKind.CLIENT),  # gateway -> features
        (MODEL_INFER, SpanKind.CLIENT),  # gateway -> Triton
    ]
    for name, kind in hops:
        await eventually(functools.partial(exported, receiver, trace_id, name, kind))
    # The feature service (this process) got the trace context over TLS, with the token.
    await eventually(functools.partial(in_trace, spans, trace_id, GET_FEATURES, SpanKind.SERVER))
