"""The shared gRPC server: health, reflection and graceful shutdown on a real port."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from loopmesh.mesh.errors import MAX_DETAILS, InvalidArgument, Unavailable
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.mesh.settings import GrpcServerSettings
from tests.helpers import eventually


async def test_health_and_reflection_then_graceful_stop() -> None:
    server = GrpcServer("probe", GrpcServerSettings(port=0, grace_seconds=1))
    await server.start(["loopmesh.v1.Probe"])
    assert server.port > 0
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        named = await health.Check(
            health_pb2.HealthCheckRequest(service="loopmesh.v1.Probe"), timeout=5
        )
        assert named.status == health_pb2.HealthCheckResponse.SERVING

    # Reflection answers with the registered service names (what grpcurl lists).
    # The reflection client is synchronous; run it off the loop that serves the call.
    services = await asyncio.to_thread(_reflected_services, server.address)
    assert "grpc.health.v1.Health" in services
    assert "loopmesh.v1.Probe" in services

    await server.stop()
    async with grpc.aio.insecure_channel(server.address) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        else:
            raise AssertionError("server still answers after stop")


def _reflected_services(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        return list(ProtoReflectionDescriptorDatabase(channel).get_services())


class _Faulty:
    """Methods that fail the ways a servicer can: a kernel error, a bug, mid-stream."""

    async def Refuse(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise InvalidArgument("model_name", f"no such model {request.decode()!r}")

    async def Crash(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("a bug, not an outage")

    async def Stream(self, request: bytes, context: grpc.aio.ServicerContext) -> Any:
        yield b"first"
        raise Unavailable("triton went away")


async def test_errors_map_to_their_status_once_for_every_method(
    caplog: pytest.LogCaptureFixture,
) -> None:
    faulty = _Faulty()
    handlers = {
        "Refuse": grpc.unary_unary_rpc_method_handler(faulty.Refuse),
        "Crash": grpc.unary_unary_rpc_method_handler(faulty.Crash),
        "Stream": grpc.unary_stream_rpc_method_handler(faulty.Stream),
    }
    server = GrpcServer("faulty", GrpcServerSettings(port=0, grace_seconds=1))
    server.server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.Faulty", handlers),)
    )
    await server.start(["t.Faulty"])
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary("/t.Faulty/Refuse")(b"m9", timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == "model_name: no such model 'm9'"

            with (
                caplog.at_level(logging.ERROR, logger="loopmesh.mesh.errors"),
                pytest.raises(grpc.aio.AioRpcError) as crashed,
            ):
                await channel.unary_unary("/t.Faulty/Crash")(b"", timeout=5)
            # A bug is INTERNAL (not retried as if it were an outage), and logged in full.
            assert crashed.value.code() == grpc.StatusCode.INTERNAL
            assert "RuntimeError" in (crashed.value.details() or "")
            assert any("a bug, not an outage" in str(r.exc_info) for r in caplog.records)

            answers = []
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                async for answer in channel.unary_stream("/t.Faulty/Stream")(b"", timeout=5):
                    answers.append(answer)
            assert answers == [b"first"]
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            assert cut.value.details() == "triton went away"
    finally:
        await server.stop()


def test_error_details_stay_short_whatever_the_request_held() -> None:
    # A 20 KB context key named as the field once overflowed gRPC's 16 KiB metadata limit.
    error = InvalidArgument("context." + "k" * 20_000, "must be finite")
    assert len(error.details()) <= MAX_DETAILS
    assert error.details().startswith("context.kkk") and "k…: must be finite" in error.details()
    assert str(error).endswith(": must be finite") and len(str(error)) > 20_000  # logs keep all
    assert InvalidArgument("plain message").details() == "plain message"


async def test_calls_beyond_the_limit_are_refused_at_once() -> None:
    release = asyncio.Event()
    entered = 0

    async def hold(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal entered
        entered += 1
        await release.wait()
        return request

    server = GrpcServer("held", GrpcServerSettings(port=0, grace_seconds=1, max_concurrent_rpcs=2))
    server.server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.Held", {"Hold": grpc.unary_unary_rpc_method_handler(hold)}
            ),
        )
    )
    await server.start(["t.Held"])
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = channel.unary_unary("/t.Held/Hold")
            held = [asyncio.ensure_future(call(b"a", timeout=30)) for _ in range(2)]

            async def both_entered() -> bool:
                return entered == 2

            await eventually(both_entered, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(b"b", timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            assert await asyncio.gather(*held) == [b"a", b"a"]
            assert await call(b"c", timeout=10) == b"c"  # a slot is free again
    finally:
        await server.stop()
