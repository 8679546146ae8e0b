"""Parts of the three-broker tests (``tests/test_cluster_e2e.py``): services as processes on
a ``KafkaCluster``, consumer-group lag, and features read back through GetOnlineFeatures.

Every service is a real ``python -m loopmesh.<service>`` process, so that SIGKILL is a real
crash and, on a loaded machine, each gets CPU time of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loopmesh.devstack.process import free_port, log_tail
from loopmesh.gen.loopmesh.v1 import features_pb2, features_pb2_grpc
from loopmesh.mesh.bus import client_options
from loopmesh.mesh.settings import KafkaSettings

ROOT = Path(__file__).resolve().parents[2]


def kafka_env(kafka: KafkaSettings) -> dict[str, str]:
    """``kafka`` as the ``LOOPMESH_KAFKA__*`` environment of a service process."""
    env = {
        "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "LOOPMESH_KAFKA__DEFAULT_PARTITIONS": str(kafka.default_partitions),
        "LOOPMESH_KAFKA__REPLICATION_FACTOR": str(kafka.replication_factor),
        "LOOPMESH_KAFKA__REQUEST_TIMEOUT_MS": str(kafka.request_timeout_ms),
    }
    if kafka.min_insync_replicas is not None:
        env["LOOPMESH_KAFKA__MIN_INSYNC_REPLICAS"] = str(kafka.min_insync_replicas)
    return env


class ServiceProcess:
    """``python -m loopmesh.<module>`` with its own log file and gRPC port."""

    def __init__(self, module: str, env: dict[str, str], log: Path, *, health: str = "") -> None:
        self.module = module
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = env
        self.log = log
        self.health = health
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"loopmesh.{self.module}"],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive:
            code = self.proc.returncode if self.proc else None
            raise AssertionError(f"{self.module} exited ({code}):\n{log_tail(self.log)}")

    async def serving(self) -> bool:
        self.check_alive()
        try:
            async with grpc.aio.insecure_channel(self.address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=self.health), timeout=2
                )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def wait_serving(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not await self.serving():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.module} not serving within {timeout:.0f}s:\n{log_tail(self.log)}"
                )
            await asyncio.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or committed on the way out."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    async def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and the exit code (None if it was not running); SIGKILL after ``timeout``."""
        if not self.alive:
            return None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


async def group_lag(kafka: KafkaSettings, group: str, topics: Sequence[str]) -> dict[str, int]:
    """Messages of each topic that ``group`` has not committed yet (end offset - committed)."""
    partitions = [TopicPartition(t, p) for t in topics for p in range(kafka.default_partitions)]
    consumer = AIOKafkaConsumer(**client_options(kafka, "lag-probe"))
    await consumer.start()
    try:
        end = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(**client_options(kafka, "lag-probe"))
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    lag = dict.fromkeys(topics, 0)
    for tp, offset in end.items():
        done = committed[tp].offset if tp in committed else 0
        lag[tp.topic] += max(0, offset - max(done, 0))
    return lag


async def group_members(kafka: KafkaSettings, group: str, topic: str) -> list[set[int]]:
    """The partitions of ``topic`` each member of ``group`` holds now (DescribeGroups)."""
    admin = AIOKafkaAdminClient(**client_options(kafka, "group-probe"))
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    [described] = response.groups
    error_code, members = described[0], described[5]
    assert error_code == 0, f"DescribeGroups {group}: error {error_code}"
    held = []
    for member in members:
        raw = member[-1]  # member_assignment, last in every version
        assignment = ConsumerProtocolMemberAssignment.decode(raw) if raw else None
        parts = {
            p
            for t, partitions in (assignment.assignment if assignment else [])
            if t == topic
            for p in partitions
        }
        held.append(parts)
    return held


UNKNOWN_TOPIC_OR_PARTITION = 3


async def topic_overrides(
    kafka: KafkaSettings, topic: str, timeout: float = 30.0
) -> dict[str, str]:
    """The configs set on ``topic`` itself, not inherited from the brokers (DescribeConfigs).

    A topic just created may not be known yet to the node asked (error 3 until the cluster's
    metadata reaches it): asked again until the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        admin = AIOKafkaAdminClient(**client_options(kafka, "config-probe"))
        await admin.start()
        try:
            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic)]
            )
        finally:
            await admin.close()
        [resource] = response.resources
        error_code, error_message, _, _, entries = resource[:5]
        if error_code != UNKNOWN_TOPIC_OR_PARTITION or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert error_code == 0, f"DescribeConfigs {topic}: {error_code} {error_message}"
    if response.API_VERSION == 0:  # (name, value, read_only, is_default, is_sensitive)
        return {e[0]: e[1] for e in entries if not e[3]}
    # (name, value, read_only, source, ...): source 1 is DYNAMIC_TOPIC_CONFIG
    return {e[0]: e[1] for e in entries if e[3] == 1}


async def events_totals(
    address: str, entities: Sequence[str], chunk: int = 500
) -> dict[str, float | None]:
    """``entity_activity:events_total`` of each entity, read through GetOnlineFeatures."""
    out: dict[str, float | None] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = features_pb2_grpc.FeatureServiceStub(channel)
        for start in range(0, len(entities), chunk):
            reply = await stub.GetOnlineFeatures(
                features_pb2.GetOnlineFeaturesRequest(
                    entity_ids=entities[start : start + chunk],
                    feature_refs=["entity_activity:events_total"],
                ),
                timeout=20,
            )
            for entity in reply.entities:
                [value] = entity.values
                kind = value.value.WhichOneof("kind")
                out[entity.entity_id] = float(getattr(value.value, kind)) if kind else None
    return out


def log_tails(processes: Sequence[ServiceProcess], lines: int = 15) -> str:
    """The end of each process's log, for a failure message."""
    return "\n".join(f"--- {p.module} ({p.log}):\n{log_tail(p.log, lines)}" for p in processes)
