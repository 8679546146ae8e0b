"""The shared gRPC server: health, reflection and graceful shutdown on a real port."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from loopmesh.mesh.rpc import GrpcServer
from loopmesh.mesh.settings import GrpcServerSettings


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
