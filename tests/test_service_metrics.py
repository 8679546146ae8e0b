"""Each door, run as its own process, serves Prometheus metrics with non-zero values after
traffic: RPC calls by method and code, and events acknowledged by Kafka."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.gen.loopmesh.v1 import (
    feedback_pb2,
    feedback_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
)
from services.mesh.infra.process import free_port
from services.mesh.settings import KafkaSettings


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def _wait_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, "service exited"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise AssertionError("service did not become SERVING")


@pytest.fixture
def door(
    request: pytest.FixtureRequest, kafka_settings: KafkaSettings, tmp_path: Path
) -> Iterator[tuple[int, int]]:
    name = request.param
    grpc_port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        f"LOOPMESH_{name.upper()}__SERVER__PORT": str(grpc_port),
        f"LOOPMESH_{name.upper()}__TOPIC": f"{name}.metrics.{uuid.uuid4().hex[:6]}",
        "LOOPMESH_TELEMETRY__METRICS_PORT": str(metrics_port),
    }
    with (tmp_path / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"], env=env, stdout=log, stderr=log
        )
    try:
        _wait_serving(grpc_port, proc)
        yield grpc_port, metrics_port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("door", ["ingestion"], indirect=True)
def test_ingestion_exports_metrics(door: tuple[int, int]) -> None:
    grpc_port, metrics_port = door
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        events = [
            ingestion_pb2.InteractionEvent(event_id=uuid.uuid4().hex, entity_id="u", event_type="x")
            for _ in range(5)
        ]
        reply = stub.Ingest(ingestion_pb2.IngestRequest(events=events), timeout=30)
        assert reply.accepted == 5
    metrics = _scrape(metrics_port)
    assert metrics.get("rpc_server_calls_total", 0) >= 1, sorted(metrics)
    assert metrics.get("loopmesh_kafka_produced_total", 0) >= 5, sorted(metrics)


@pytest.mark.parametrize("door", ["feedback"], indirect=True)
def test_feedback_exports_metrics(door: tuple[int, int]) -> None:
    grpc_port, metrics_port = door
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        item = feedback_pb2.Feedback(event_id=uuid.uuid4().hex, prediction_id="p1", label=1)
        stub.Submit(feedback_pb2.SubmitRequest(feedback=item), timeout=30)
    metrics = _scrape(metrics_port)
    assert metrics.get("rpc_server_calls_total", 0) >= 1, sorted(metrics)
    assert metrics.get("loopmesh_kafka_produced_total", 0) >= 1, sorted(metrics)
