"""Ingestion door vs a raw aiokafka producer: events/s into Kafka, acknowledged.

One run starts its own Kafka broker (temporary directory) and the ingestion service as its own
process (``python -m loopmesh.ingestion``, as deployed), then alternates, round by round, two
ways of writing the same N interaction events, each timed until Kafka acknowledged all of them:

- ingestion IngestStream: one client stream of batches; the service validates, cleans,
  deduplicates and produces (idempotent, acks=all) and answers after the acknowledgements;
- raw aiokafka:  an ``AIOKafkaProducer`` with the same settings (idempotent, acks=all, same
  linger and batch size) encoding the same pydantic events as JSON with key and headers.

Target (issue 3): ingestion >= 0.5x raw. Broker, service and load generator share this
machine's cores, so the figures include that contention.

    python -m bench.ingest_bench [--events 50000] [--batch 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from loopmesh.devstack.kafka import KafkaBroker
from loopmesh.devstack.process import ManagedProcess, free_port
from loopmesh.gen.loopmesh.v1 import ingestion_pb2, ingestion_pb2_grpc
from loopmesh.ingestion.settings import IngestionScope
from loopmesh.mesh.bus import declare_topics
from loopmesh.mesh.events import InteractionEvent
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import EVENTS_RAW

console = Console()
SCOPE = IngestionScope()  # the service's defaults, so both paths produce alike


def events(n: int) -> list[InteractionEvent]:
    """N distinct events with fresh ids (the service would drop repeated ids as duplicates)."""
    return [
        InteractionEvent(
            event_id=uuid.uuid4().hex,
            entity_id=f"user-{i % 5000}",
            event_type="click",
            numeric={"price": float(i % 100), "position": float(i % 10)},
            categorical={"page": "home", "device": "mobile"},
        )
        for i in range(n)
    ]


def requests(batch: list[InteractionEvent], size: int) -> list[ingestion_pb2.IngestRequest]:
    out = []
    for start in range(0, len(batch), size):
        chunk = batch[start : start + size]
        out.append(
            ingestion_pb2.IngestRequest(
                events=[
                    ingestion_pb2.InteractionEvent(
                        event_id=e.event_id,
                        entity_id=e.entity_id,
                        event_type=e.event_type,
                        numeric=e.numeric,
                        categorical=e.categorical,
                    )
                    for e in chunk
                ]
            )
        )
    return out


async def through_service(
    stub: ingestion_pb2_grpc.IngestionServiceStub, reqs: list[ingestion_pb2.IngestRequest]
) -> float:
    async def stream() -> AsyncIterator[ingestion_pb2.IngestRequest]:
        for request in reqs:
            yield request

    expected = sum(len(r.events) for r in reqs)
    started = time.perf_counter()
    reply = await stub.IngestStream(stream(), timeout=300)
    elapsed = time.perf_counter() - started
    if reply.accepted != expected:
        raise RuntimeError(f"service accepted {reply.accepted} of {expected}: {reply}")
    return elapsed


async def through_raw(
    producer: AIOKafkaProducer, topic: str, batch: list[InteractionEvent]
) -> float:
    started = time.perf_counter()
    acks = []
    for event in batch:
        acks.append(
            await producer.send(
                topic,
                value=event.model_dump_json(by_alias=True).encode(),
                key=event.entity_id.encode(),
                headers=[
                    ("event_id", event.event_id.encode()),
                    ("schema", event.schema_.encode()),
                    ("content-type", b"application/json"),
                ],
            )
        )
    await asyncio.gather(*acks)
    return time.perf_counter() - started


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> int:
    """Messages in ``topic`` (no transactions, so offsets count records)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        offsets = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
    finally:
        await consumer.stop()
    return sum(offsets.values())


def start_service(kafka: KafkaSettings, topic: str, workdir: Path) -> tuple[ManagedProcess, str]:
    port = free_port()
    env = {
        **os.environ,
        "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "LOOPMESH_INGESTION__SERVER__PORT": str(port),
        "LOOPMESH_INGESTION__TOPIC": topic,
    }
    service = ManagedProcess(
        "ingestion",
        [sys.executable, "-m", "loopmesh.ingestion"],
        log_path=workdir / "ingestion.log",
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    service.start()
    address = f"127.0.0.1:{port}"

    def serving() -> bool:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="loopmesh.v1.IngestionService"), timeout=1
            )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    service.wait_ready(serving, timeout=60)
    return service, address


@dataclass
class Round:
    """One timed pass of one path: wall seconds and the CPU seconds of the producing process."""

    wall: float
    cpu: float


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(kafka: KafkaSettings, workdir: Path, n: int, batch: int, rounds: int) -> None:
    service_topic = replace(EVENTS_RAW, name="bench.ingest")
    raw_topic = replace(EVENTS_RAW, name="bench.raw")
    await declare_topics(kafka, [service_topic, raw_topic], with_dlq=False)
    service, address = await asyncio.to_thread(start_service, kafka, service_topic.name, workdir)
    assert service.pid is not None
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers,
        enable_idempotence=True,
        acks="all",
        linger_ms=SCOPE.linger_ms,
        max_batch_size=SCOPE.max_batch_bytes,
    )
    await producer.start()
    service_rounds: list[Round] = []
    raw_rounds: list[Round] = []
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
            # Warm both paths (connections, metadata, code paths) outside the timing.
            warm = events(2 * batch)
            await through_service(stub, requests(warm, batch))
            await through_raw(producer, raw_topic.name, warm)
            for _ in range(rounds):
                batch_events = events(n)
                reqs = requests(batch_events, batch)
                cpu = process_cpu(service.pid)
                wall = await through_service(stub, reqs)
                service_rounds.append(Round(wall, process_cpu(service.pid) - cpu))
                cpu = time.process_time()
                wall = await through_raw(producer, raw_topic.name, batch_events)
                raw_rounds.append(Round(wall, time.process_time() - cpu))
        landed = await end_offsets(
            kafka.bootstrap_servers, service_topic.name, kafka.default_partitions
        )
    finally:
        await producer.stop()
        await asyncio.to_thread(service.stop)
    expected = (rounds * n) + 2 * batch
    if landed != expected:
        raise RuntimeError(f"{landed} events in {service_topic.name}, expected {expected}")
    report(n, batch, service_rounds, raw_rounds)


def report(n: int, batch: int, service: list[Round], raw: list[Round]) -> None:
    table = Table(title=f"ingestion throughput: {n} events per round, batches of {batch}")
    table.add_column("path")
    table.add_column("rounds, s", justify="right")
    table.add_column("events/s", justify="right")
    table.add_column("CPU µs/event", justify="right")
    rates, costs = [], []
    for name, measured in (
        ("ingestion IngestStream", service),
        ("raw aiokafka", raw),
    ):
        rate = n / statistics.median(r.wall for r in measured)
        cost = statistics.median(r.cpu for r in measured) / n * 1e6
        rates.append(rate)
        costs.append(cost)
        table.add_row(
            name, " ".join(f"{r.wall:.2f}" for r in measured), f"{rate:,.0f}", f"{cost:.1f}"
        )
    ratio = rates[0] / rates[1]
    colour = "green" if ratio >= 0.5 else "red"
    table.add_row(
        "ratio",
        "",
        f"[{colour}]{ratio:.2f}x[/] (≥ 0.5x)",
        f"{costs[0] / costs[1]:.2f}x",
    )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_bench", description=__doc__)
    parser.add_argument("--events", type=int, default=50_000, help="events per round and path")
    parser.add_argument("--batch", type=int, default=500, help="events per IngestRequest")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per path")
    args = parser.parse_args(argv if argv is not None else [])
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        workdir = Path(tmp)
        broker = KafkaBroker(workdir / "kafka")
        with console.status("starting Kafka"):
            broker.start()
        try:
            kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, default_partitions=3)
            asyncio.run(run(kafka, workdir, args.events, args.batch, args.rounds))
        finally:
            broker.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
