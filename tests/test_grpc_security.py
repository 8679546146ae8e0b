"""Token auth with roles, TLS and mutual TLS on the shared gRPC server (real sockets)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from loopmesh.gen.loopmesh.v1 import features_pb2, features_pb2_grpc
from loopmesh.mesh.auth import AuthSettings, TokenSpec, bearer
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.mesh.settings import GrpcServerSettings
from tests.support.certs import make_pki

ROLES = {
    "/loopmesh.v1.FeatureService/GetFeatureSchema": "features",
    "/loopmesh.v1.FeatureService/DeleteEntity": "operator",
}


class SchemaOnly(features_pb2_grpc.FeatureServiceServicer):
    """Answers GetFeatureSchema; the interceptor is what is under test."""

    async def GetFeatureSchema(
        self, request: features_pb2.GetFeatureSchemaRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.GetFeatureSchemaResponse:
        return features_pb2.GetFeatureSchemaResponse(
            features=[features_pb2.FeatureSpec(ref="v:f", dtype="Float64", view="v")]
        )


async def _serve(settings: GrpcServerSettings, auth: AuthSettings | None) -> GrpcServer:
    server = GrpcServer("sec", settings, auth=auth, method_roles=ROLES)
    features_pb2_grpc.add_FeatureServiceServicer_to_server(SchemaOnly(), server.server)
    await server.start(["loopmesh.v1.FeatureService"])
    return server


@pytest.fixture
async def authed() -> AsyncIterator[GrpcServer]:
    auth = AuthSettings(
        tokens=[
            TokenSpec(name="reader", token="r3ader-token-0123456789", roles=["features"]),
            TokenSpec(name="app", token="app-token-0123456789", roles=["ingest"]),
        ]
    )
    server = await _serve(GrpcServerSettings(port=0), auth)
    yield server
    await server.stop()


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_token_roles(authed: GrpcServer) -> None:
    async with grpc.aio.insecure_channel(authed.address) as channel:
        stub = features_pb2_grpc.FeatureServiceStub(channel)
        req = features_pb2.GetFeatureSchemaRequest()
        assert await _code(stub.GetFeatureSchema(req)) == grpc.StatusCode.UNAUTHENTICATED
        wrong = stub.GetFeatureSchema(req, metadata=bearer("r3ader-token-012345678X"))
        assert await _code(wrong) == grpc.StatusCode.UNAUTHENTICATED
        other_role = stub.GetFeatureSchema(req, metadata=bearer("app-token-0123456789"))
        assert await _code(other_role) == grpc.StatusCode.PERMISSION_DENIED
        reply = await stub.GetFeatureSchema(req, metadata=bearer("r3ader-token-0123456789"))
        assert reply.features[0].ref == "v:f"
        # A method nobody was given a role for stays closed, even to a valid token.
        delete = stub.DeleteEntity(
            features_pb2.DeleteEntityRequest(entity_id="e"),
            metadata=bearer("r3ader-token-0123456789"),
        )
        assert await _code(delete) == grpc.StatusCode.PERMISSION_DENIED
        # Health stays open for probes.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    ca = pki.ca.read_bytes()
    tls = GrpcServerSettings(port=0, tls_certfile=pki.server_cert, tls_keyfile=pki.server_key)
    server = await _serve(tls, None)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(server.address, creds) as channel:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            reply = await stub.GetFeatureSchema(features_pb2.GetFeatureSchemaRequest(), timeout=5)
            assert reply.features
        async with grpc.aio.insecure_channel(server.address) as plain:
            call = features_pb2_grpc.FeatureServiceStub(plain).GetFeatureSchema(
                features_pb2.GetFeatureSchemaRequest(), timeout=3
            )
            assert await _code(call) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()

    mtls = tls.model_copy(update={"tls_client_cafile": pki.ca})
    server = await _serve(mtls, None)
    try:
        no_cert = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(server.address, no_cert) as channel:
            call = features_pb2_grpc.FeatureServiceStub(channel).GetFeatureSchema(
                features_pb2.GetFeatureSchemaRequest(), timeout=3
            )
            assert await _code(call) == grpc.StatusCode.UNAVAILABLE
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=pki.client_key.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(server.address, with_cert) as channel:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            reply = await stub.GetFeatureSchema(features_pb2.GetFeatureSchemaRequest(), timeout=5)
            assert reply.features
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "build",
    [
        lambda: TokenSpec(name="app", token="short", roles=["ingest"]),
        lambda: AuthSettings(client_token="fifteen-chars!!"),
    ],
)
def test_short_tokens_are_refused_at_start(build: Callable[[], object]) -> None:
    with pytest.raises(ValidationError, match="at least 16 are required"):
        build()


async def test_a_server_without_tokens_says_auth_is_off(caplog: pytest.LogCaptureFixture) -> None:
    server = GrpcServer("open", GrpcServerSettings(port=0), auth=AuthSettings())
    with caplog.at_level(logging.WARNING, logger="loopmesh.mesh.rpc"):
        await server.start([])
    try:
        assert any("token auth is OFF" in r.getMessage() for r in caplog.records)
    finally:
        await server.stop()
    secured = GrpcServer(
        "closed",
        GrpcServerSettings(port=0),
        auth=AuthSettings(tokens=[TokenSpec(name="a", token="a" * 16, roles=["ingest"])]),
        method_roles={},
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loopmesh.mesh.rpc"):
        await secured.start([])
    try:
        assert not any("auth is OFF" in r.getMessage() for r in caplog.records)
    finally:
        await secured.stop()
