"""The joiner's memory while a flood of feedback for unknown prediction ids arrives (issue 20).

One run starts its own Kafka broker (temporary directory) and the joiner as its own process
(``python -m loopmesh.joiner``, as deployed, with its default settings: the join table in
RocksDB under its data directory, at most ``max_unmatched_feedback`` unmatched entries), then
produces N feedback events whose prediction ids never existed, as a client sending random ids
would. It samples the joiner's resident memory (``VmRSS``) against how many of them it has
handled (its committed offsets), and reads the drop counter from its Prometheus endpoint.

Before the fix the table was ``memory://`` and every unknown id stayed 24 h: 200,000 of them
grew the process from 829 MB to 976 MB, still rising. Target: flat (the growth after the
first tenth, while the RocksDB memtables and caches fill to their bounds, stays small and
does not scale with N), every drop counted. ``--store memory:// --cap 100000000`` measures
the old behaviour for comparison. The default million takes about half an hour on 2 busy
cores (the joiner handles some 600 events/s there; faust flushes its producer every 100
changelog records).

    python -m bench.joiner_memory_bench [--events 1000000] [--store rocksdb://] [--cap N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from loopmesh.devstack.kafka import KafkaBroker
from loopmesh.devstack.process import ManagedProcess, free_port
from loopmesh.joiner.settings import JoinerScope, JoinerTopics
from loopmesh.mesh.bus import declare_topics
from loopmesh.mesh.events import FeedbackEvent
from loopmesh.mesh.settings import KafkaSettings

console = Console()
PARTITIONS = 3
BATCH = 10_000
SAMPLES = 10
"""RSS rows printed while the flood is handled (one per tenth)."""
STALL_S = 300.0
"""The run fails when the joiner handles nothing for this long (it is slow on 2 busy cores:
about 600 events/s, so a million take half an hour; a fixed deadline would not fit all)."""


@dataclass
class Sample:
    phase: str
    handled: int
    rss_mb: float
    dropped: float | None
    waiting: float | None


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def scrape(port: int, name: str) -> float | None:
    """One unlabelled sample of the joiner's Prometheus endpoint (None until it exists)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    match = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+(\S+)$", text, re.M)
    return float(match[1]) if match else None


def start_joiner(
    kafka: KafkaSettings, workdir: Path, store: str, cap: int
) -> tuple[ManagedProcess, int]:
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "LOOPMESH_KAFKA__DEFAULT_PARTITIONS": str(kafka.default_partitions),
        "LOOPMESH_JOINER__SERVER__PORT": str(port),
        "LOOPMESH_JOINER__DATA_DIR": str(workdir / "joiner"),
        "LOOPMESH_JOINER__STORE": store,
        "LOOPMESH_JOINER__MAX_UNMATCHED_FEEDBACK": str(cap),
        "LOOPMESH_TELEMETRY__METRICS_PORT": str(metrics_port),
    }
    joiner = ManagedProcess(
        "joiner",
        [sys.executable, "-m", "loopmesh.joiner"],
        log_path=workdir / "joiner.log",
        env=env,
        cwd=workdir,
    )
    joiner.start()

    def serving() -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    joiner.wait_ready(serving, timeout=120)
    return joiner, metrics_port


async def committed(kafka: KafkaSettings, group: str, topic: str) -> int:
    """Offsets the joiner committed on ``topic``: the feedback it has handled."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


async def produce(kafka: KafkaSettings, topic: str, n: int) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers, linger_ms=20, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        at = datetime.now(UTC)
        for start in range(0, n, BATCH):
            sends = []
            for _ in range(min(BATCH, n - start)):
                pid = f"bogus-{uuid.uuid4().hex}"
                value = FeedbackEvent(prediction_id=pid, label=1, event_time=at)
                sends.append(
                    await producer.send(
                        topic, value.model_dump_json(by_alias=True).encode(), key=pid.encode()
                    )
                )
            await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def run(kafka: KafkaSettings, workdir: Path, n: int, store: str, cap: int) -> list[Sample]:
    topics = JoinerTopics()
    await declare_topics(kafka, topics.all())
    joiner, metrics_port = await asyncio.to_thread(start_joiner, kafka, workdir, store, cap)
    assert joiner.pid is not None
    pid, group = joiner.pid, JoinerScope().app_id
    samples: list[Sample] = []

    def sample(phase: str, handled: int) -> None:
        dropped = scrape(metrics_port, "loopmesh_joiner_unmatched_feedback_dropped_total")
        waiting = scrape(metrics_port, "loopmesh_joiner_unmatched_feedback")
        samples.append(Sample(phase, handled, rss_mb(pid), dropped, waiting))
        console.print(
            f"{phase}: {handled:,} handled, RSS {samples[-1].rss_mb:,.0f} MB, "
            f"dropped {dropped}, waiting {waiting}"
        )

    try:
        sample("before", 0)
        producing = asyncio.create_task(produce(kafka, topics.feedback, n))
        step, next_row = max(1, n // SAMPLES), max(1, n // SAMPLES)
        progressed, last = time.monotonic(), 0
        peak = 0.0
        while True:
            handled = await committed(kafka, group, topics.feedback)
            peak = max(peak, rss_mb(pid))
            if handled > last:
                progressed, last = time.monotonic(), handled
            if handled >= next_row:
                sample("during", handled)
                next_row = (handled // step + 1) * step
            if handled >= n:
                break
            if producing.done() and producing.exception() is not None:
                raise RuntimeError("producing failed") from producing.exception()
            if time.monotonic() - progressed > STALL_S or not joiner.running:
                raise RuntimeError(f"the joiner handled {handled} of {n}; see {joiner.log_path}")
            await asyncio.sleep(1.0)
        await producing
        sample("after", n)
        samples.append(Sample("peak (1 s samples)", n, peak, None, None))
    finally:
        await asyncio.to_thread(joiner.stop)
    return samples


def report(n: int, store: str, cap: int, samples: list[Sample]) -> None:
    table = Table(
        title=f"joiner RSS: {n:,} feedback events for unknown prediction ids "
        f"(store {store}, cap {cap:,} unmatched)"
    )
    for column in ("phase", "handled", "RSS MB", "dropped (metric)", "waiting (gauge)"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for s in samples:
        table.add_row(
            s.phase,
            f"{s.handled:,}",
            f"{s.rss_mb:,.0f}",
            "" if s.dropped is None else f"{s.dropped:,.0f}",
            "" if s.waiting is None else f"{s.waiting:,.0f}",
        )
    during = [s for s in samples if s.phase == "during"]
    # The first half includes RocksDB's memtables and caches filling to their bounds; the
    # second half shows whether anything grows with N.
    half = [s for s in during if s.handled >= n // 2]
    for name, window in (("growth", during), ("growth, 2nd half", half)):
        if len(window) >= 2:
            table.add_row(
                name,
                f"{window[0].handled:,} -> {window[-1].handled:,}",
                f"{window[-1].rss_mb - window[0].rss_mb:+,.0f}",
                "",
                "",
            )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    prog = "python -m bench.joiner_memory_bench"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000, help="unmatched feedback events")
    parser.add_argument("--store", default=JoinerScope().store, help="the joiner's table store")
    parser.add_argument(
        "--cap", type=int, default=JoinerScope().max_unmatched_feedback, help="unmatched cap"
    )
    args = parser.parse_args(argv if argv is not None else [])
    with tempfile.TemporaryDirectory(prefix="joiner-bench-") as tmp:
        workdir = Path(tmp)
        broker = KafkaBroker(workdir / "kafka")
        with console.status("starting Kafka"):
            broker.start()
        try:
            kafka = KafkaSettings(
                bootstrap_servers=broker.bootstrap_servers, default_partitions=PARTITIONS
            )
            samples = asyncio.run(run(kafka, workdir, args.events, args.store, args.cap))
        finally:
            broker.stop()
    report(args.events, args.store, args.cap, samples)


if __name__ == "__main__":
    main(sys.argv[1:])
