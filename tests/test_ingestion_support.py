"""Shared parts of the ingestion and feedback tests (no tests here).

The doors run in-process on real ports against the real broker, each writing to its own
topic; what landed is read back from Kafka, never from the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from loopmesh.feedback.server import feedback_server
from loopmesh.feedback.settings import FeedbackScope, FeedbackSettings
from loopmesh.gen.loopmesh.v1 import feedback_pb2_grpc, ingestion_pb2_grpc
from loopmesh.ingestion.server import ingestion_server
from loopmesh.ingestion.settings import IngestionScope, IngestionSettings
from loopmesh.mesh.bus import declare_topics
from loopmesh.mesh.intake_server import IntakeServer
from loopmesh.mesh.privacy import PrivacySettings
from loopmesh.mesh.settings import GrpcServerSettings, KafkaSettings

ROOT = Path(__file__).resolve().parents[1]


def new_topic(base: str) -> str:
    return f"{base}.{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def running(server: IntakeServer) -> AsyncIterator[grpc.aio.Channel]:
    """Declare the server's topic, start it, and yield a channel to it."""
    await declare_topics(server.kafka, [server.topic])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield channel
    finally:
        await server.stop()


def ingestion(
    kafka: KafkaSettings, topic: str, *, privacy: PrivacySettings | None = None, **scope: Any
) -> IntakeServer:
    server = GrpcServerSettings(port=0, grace_seconds=1, **scope.pop("server", {}))
    settings = IngestionSettings(
        kafka=kafka,
        ingestion=IngestionScope(server=server, topic=topic, **scope),
        privacy=privacy or PrivacySettings(),
    )
    return ingestion_server(settings)


def feedback(kafka: KafkaSettings, topic: str, **scope: Any) -> IntakeServer:
    server = GrpcServerSettings(port=0, grace_seconds=1, **scope.pop("server", {}))
    settings = FeedbackSettings(
        kafka=kafka, feedback=FeedbackScope(server=server, topic=topic, **scope)
    )
    return feedback_server(settings)


def ingestion_stub(channel: grpc.aio.Channel) -> ingestion_pb2_grpc.IngestionServiceAsyncStub:
    return ingestion_pb2_grpc.IngestionServiceStub(channel)  # type: ignore[return-value]


def feedback_stub(channel: grpc.aio.Channel) -> feedback_pb2_grpc.FeedbackServiceAsyncStub:
    return feedback_pb2_grpc.FeedbackServiceStub(channel)  # type: ignore[return-value]


async def topic_size(kafka: KafkaSettings, topic: str) -> int:
    """Records in ``topic`` (plain idempotent producers: offsets count records)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(kafka.default_partitions)]
        offsets = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return sum(offsets.values())


async def read_all(
    kafka: KafkaSettings, topic: str, *, timeout: float = 60.0
) -> list[tuple[bytes | None, dict[str, Any]]]:
    """Every record of ``topic`` as (key, decoded JSON value), up to its current end."""
    end = await topic_size(kafka, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False, group_id=None
    )
    partitions = [TopicPartition(topic, p) for p in range(kafka.default_partitions)]
    await consumer.start()
    out: list[tuple[bytes | None, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        while len(out) < end and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend((r.key, json.loads(r.value or b"")) for r in records)
    finally:
        await consumer.stop()
    assert len(out) == end, f"{topic}: read {len(out)} of {end} records"
    return out


def event_ids(records: Sequence[tuple[bytes | None, dict[str, Any]]]) -> list[str]:
    return [str(value["event_id"]) for _, value in records]


def call_through_reflection(
    address: str, service: str, method: str, request: dict[str, Any]
) -> dict[str, Any]:
    """What grpcurl does: learn the schema from server reflection, send JSON, get JSON back.

    Synchronous (the reflection client is): run it with ``asyncio.to_thread``.
    """
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert service in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        descriptor = pool.FindServiceByName(service).FindMethodByName(method)
        request_type = message_factory.GetMessageClass(descriptor.input_type)
        reply_type = message_factory.GetMessageClass(descriptor.output_type)
        call = channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply_type.FromString,
        )
        reply = call(json_format.ParseDict(request, request_type()), timeout=30)
        return json_format.MessageToDict(reply, preserving_proto_field_name=True)


# --- the service as its own process ----------------------------------------------------------


def start_process(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )


async def wait_serving(
    process: subprocess.Popen[bytes], address: str, service: str, log: Path, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited early:\n{await asyncio.to_thread(log.read_text)}")
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1
                )
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    output = await asyncio.to_thread(log.read_text)
    raise AssertionError(f"{service} not serving within {timeout}s:\n{output}")


async def terminate(process: subprocess.Popen[bytes], timeout: float = 20) -> int:
    process.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(process.wait, timeout)


PYTHON = sys.executable
