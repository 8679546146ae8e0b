"""The features fold: worker CPU per event with 10 aggregations vs a bare aiokafka consumer, and
freshness (producer ack -> readable online) at a steady 2,000 events/s.

One run starts its own Kafka broker, writes and applies a small Feast project (two stream
feature views, 10 aggregations: counts over 1 h and 24 h with 1-min and 15-min slides, sum,
mean, min, max and stddev of ``value`` over 1 h with 5-min slides, mean of ``amount`` over
24 h, the latest ``category``, the total count; SQLite online store), pre-produces
``BENCH_FOLD_EVENTS`` (20,000) InteractionEvents over ``BENCH_FOLD_ENTITIES`` (200) entities
into a 2-partition events topic (event times advance over the last four hours, with a few
minutes of jitter so some arrive out of order), then measures:

1. CPU per event, every process reading the whole pre-produced topic from the beginning:

   - bare aiokafka: a group consumer in its own process that decodes each value with
     ``json.loads`` and does nothing else (the baseline; ``BENCH_FOLD_BARE_RUNS`` runs, the
     median shown). CPU from its partitions' assignment to its last record: the first batch
     is decoded lazily inside ``getmany``, so "from the first record" would leave it out.
   - features worker: ``python -m loopmesh.features`` as deployed (FeatureService + agents),
     CPU (``/proc/<pid>/stat`` utime+stime, all threads) from its log's "features started"
     (imports, Feast and group join done) until its group's committed offsets reach the end
     of the topic: decode, validate, fold, changelog, Feast write, commit.

2. Freshness: the same worker, now caught up, while this process produces at
   ``BENCH_FRESH_RATE`` (2,000) events/s for ``BENCH_FRESH_S`` (20) s, paced every 5 ms, through
   ``EventProducer``. One event in ``BENCH_FRESH_PROBE_EVERY`` (50) goes to a fresh probe entity;
   a thread of this process calls ``FeatureStore.get_online_features`` every 10 ms for every
   probe not seen yet (its ``events_total``; slower when a backlog makes each call long, see
   ``poll_store``): freshness is the time that call returned with a value minus the time the
   probe's publish was acknowledged (``acks=all``). The run waits for every probe (at most
   ``BENCH_FRESH_WAIT_S``, 300 s, after the last send), so a worker that falls behind shows in
   the percentiles, along with its lag and how long it took to catch up.

Everything shares this machine's cores (broker, worker, producer, poller): on a small or busy
machine the worker's wall-clock rate, and so the freshness, measure that contention too; its
CPU per event much less so. ``BENCH_FOLD_KEEP=DIR`` keeps the broker's data, the repo and the
worker's log there; ``BENCH_FOLD_DEBUG=1`` prints the lag samples, polls and probe times.
``BENCH_FOLD_PROFILE=FILE`` runs the worker under cProfile and writes its profile there (then
the CPU figures include the profiler's overhead: use it to find hot spots, not for the ratio).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from rich.console import Console
from rich.table import Table

from loopmesh.devstack.kafka import KafkaBroker
from loopmesh.devstack.process import free_port, log_tail
from loopmesh.mesh.bus import EventProducer, declare_topics
from loopmesh.mesh.dataplane import binary_beside_python
from loopmesh.mesh.events import InteractionEvent
from loopmesh.mesh.feature_repo import apply_repo, prepare_repo
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import ENTITIES_ERASED, EVENTS_RAW, Topic

EVENTS = int(os.environ.get("BENCH_FOLD_EVENTS", "20000"))
ENTITIES = int(os.environ.get("BENCH_FOLD_ENTITIES", "200"))
BARE_RUNS = int(os.environ.get("BENCH_FOLD_BARE_RUNS", "3"))
SPAN_H = 4.0
"""Hours the pre-produced event times cover, ending a minute ago."""
RATE = float(os.environ.get("BENCH_FRESH_RATE", "2000"))
DURATION_S = float(os.environ.get("BENCH_FRESH_S", "20"))
PROBE_EVERY = int(os.environ.get("BENCH_FRESH_PROBE_EVERY", "50"))
POLL_S = 0.010
PROBE_WAIT_S = float(os.environ.get("BENCH_FRESH_WAIT_S", "300"))
"""Longest wait for the probes after the last send."""
TICK_S = 0.005
PROFILE = os.environ.get("BENCH_FOLD_PROFILE")
PARTITIONS = 2
PROJECT = "foldbench"
COUNT_REF = "fold_activity:events_total"
"""The probes' feature: 1 once the probe's only event is readable."""
STARTED = '"message": "features started"'
_TICK = os.sysconf("SC_CLK_TCK")
console = Console(width=150)

FEATURES_PY = '''"""The fold benchmark's project: 10 aggregations over the events, two views."""

from datetime import timedelta

from feast import Entity, Field, FileSource, KafkaSource, StreamFeatureView, ValueType
from feast.aggregation import Aggregation
from feast.data_format import JsonFormat
from feast.types import Float64, Int64, String

entity = Entity(name="entity", join_keys=["entity_id"], value_type=ValueType.STRING)

events = KafkaSource(
    name="events",
    topic="events.raw",
    kafka_bootstrap_servers="localhost:9092",
    timestamp_field="event_time",
    message_format=JsonFormat(
        schema_json=(
            "event_id string, entity_id string, event_type string, event_time timestamp, "
            "value double, amount double, category string"
        )
    ),
    watermark_delay_threshold=timedelta(hours=24),
    batch_source=FileSource(
        name="events_batch", path="data/events.parquet", timestamp_field="event_time"
    ),
)


def window(column, function, hours, slide_minutes, name):
    return Aggregation(
        column=column,
        function=function,
        time_window=timedelta(hours=hours),
        slide_interval=timedelta(minutes=slide_minutes),
        name=name,
    )


fold_activity = StreamFeatureView(
    name="fold_activity",
    entities=[entity],
    source=events,
    timestamp_field="event_time",
    ttl=timedelta(days=7),
    schema=[
        Field(name="entity_id", dtype=String),
        Field(name="events_1h", dtype=Int64),
        Field(name="events_24h", dtype=Int64),
        Field(name="events_total", dtype=Int64),
        Field(name="last_category", dtype=String),
    ],
    aggregations=[
        window("event_id", "count", 1, 1, "events_1h"),
        window("event_id", "count", 24, 15, "events_24h"),
        Aggregation(column="event_id", function="count", name="events_total"),
        Aggregation(column="category", function="last", name="last_category"),
    ],
)

fold_values = StreamFeatureView(
    name="fold_values",
    entities=[entity],
    source=events,
    timestamp_field="event_time",
    ttl=timedelta(days=7),
    schema=[
        Field(name="entity_id", dtype=String),
        Field(name="value_sum_1h", dtype=Float64),
        Field(name="value_mean_1h", dtype=Float64),
        Field(name="value_min_1h", dtype=Float64),
        Field(name="value_max_1h", dtype=Float64),
        Field(name="value_stddev_1h", dtype=Float64),
        Field(name="amount_mean_24h", dtype=Float64),
    ],
    aggregations=[
        window("value", "sum", 1, 5, "value_sum_1h"),
        window("value", "mean", 1, 5, "value_mean_1h"),
        window("value", "min", 1, 5, "value_min_1h"),
        window("value", "max", 1, 5, "value_max_1h"),
        window("value", "stddev", 1, 5, "value_stddev_1h"),
        window("amount", "mean", 24, 15, "amount_mean_24h"),
    ],
)
'''

BARE_CONSUMER = r"""
import asyncio, json, sys, time
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

bootstrap, topic, group, ends = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ends = {int(p): o for p, o in ends.items()}
marks = {}


class Mark(ConsumerRebalanceListener):
    async def on_partitions_revoked(self, revoked):
        pass

    async def on_partitions_assigned(self, assigned):
        if assigned and "cpu0" not in marks:
            marks["cpu0"], marks["wall0"] = time.process_time(), time.monotonic()


async def main():
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", isolation_level="read_committed",
    )
    consumer.subscribe([topic], listener=Mark())
    await consumer.start()
    n = 0
    remaining = {p for p, end in ends.items() if end > 0}
    try:
        while remaining:
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                for record in records:
                    if n == 0:
                        marks["cpu_first"] = time.process_time()
                    json.loads(record.value)
                    n += 1
                if records and records[-1].offset + 1 >= ends[tp.partition]:
                    remaining.discard(tp.partition)
        cpu, wall = time.process_time(), time.monotonic()
    finally:
        await consumer.stop()
    print(json.dumps({
        "records": n,
        "cpu_s": cpu - marks["cpu0"],
        "cpu_from_first_s": cpu - marks["cpu_first"],
        "wall_s": wall - marks["wall0"],
    }))


asyncio.run(main())
"""


# -- processes --------------------------------------------------------------------------------


def cpu_s(pid: int, *, main_thread: bool = False) -> float:
    """User+system CPU seconds of process ``pid`` so far: all its threads, or its main one."""
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class Worker:
    """``python -m loopmesh.features`` (under cProfile with ``BENCH_FOLD_PROFILE``)."""

    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "loopmesh.features"]
        if PROFILE:
            argv[1:1] = ["-m", "cProfile", "-o", PROFILE]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"the features worker exited {self.proc.returncode}:\n{log_tail(self.log)}"
            )

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


# -- data -------------------------------------------------------------------------------------


def history(n: int, entities: int, seed: int = 17) -> list[InteractionEvent]:
    """``n`` events over ``entities`` entities; times advance over ``SPAN_H`` hours ending a
    minute ago, each jittered by up to 3 minutes (some arrive out of order)."""
    rng = random.Random(seed)
    end = datetime.now(UTC) - timedelta(minutes=1)
    start = end - timedelta(hours=SPAN_H)
    step = (end - start) / n
    out = []
    for i in range(n):
        t = min(end, start + step * i + timedelta(seconds=rng.uniform(-180, 180)))
        out.append(
            InteractionEvent(
                entity_id=f"fold-{rng.randrange(entities)}",
                event_type=rng.choice(("view", "click", "buy")),
                event_time=t,
                numeric={"value": rng.uniform(-5, 5)}
                | ({"amount": rng.uniform(1, 50)} if rng.random() < 0.3 else {}),
                categorical={"category": rng.choice("abcdef")} if rng.random() < 0.5 else {},
            )
        )
    return out


async def end_offsets(settings: KafkaSettings, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def committed(admin: AIOKafkaAdminClient, group: str, topic: str) -> dict[int, int]:
    offsets = await admin.list_consumer_group_offsets(group)
    return {
        tp.partition: meta.offset
        for tp, meta in offsets.items()
        if tp.topic == topic and meta is not None and meta.offset is not None
    }


# -- 1. CPU per event -------------------------------------------------------------------------


def bare_run(settings: KafkaSettings, topic: str, ends: dict[int, int]) -> dict[str, float]:
    group = f"bench-bare-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            BARE_CONSUMER,
            settings.bootstrap_servers,
            topic,
            group,
            json.dumps(ends),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the bare consumer failed:\n{result.stderr[-3000:]}")
    out: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


@dataclass
class Catchup:
    events: int
    cpu_s: float
    wall_s: float
    startup_s: float
    committed_at_start: int
    main_cpu_s: float
    """CPU of the worker's main thread (the event loop: decode, fold, changelog, commit);
    the rest is mostly Feast's thread (the online-store writes)."""


async def wait_started(worker: Worker, timeout: float = 300.0) -> float:
    """Poll the worker's log until "features started"; its CPU seconds at that moment."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        worker.check()
        text = worker.log.read_bytes()
        if STARTED.encode() in text[max(0, seen - len(STARTED)) :]:
            return cpu_s(worker.pid)
        seen = len(text)
        await asyncio.sleep(0.005)
    raise TimeoutError(f"the worker did not start within {timeout:.0f} s:\n{log_tail(worker.log)}")


async def wait_caught_up(
    worker: Worker,
    admin: AIOKafkaAdminClient,
    group: str,
    topic: str,
    ends: dict[int, int],
    timeout: float = 900.0,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.check()
        done = await committed(admin, group, topic)
        if all(done.get(p, 0) >= end for p, end in ends.items() if end):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(
        f"the worker did not catch up within {timeout:.0f} s:\n{log_tail(worker.log)}"
    )


async def catch_up(
    worker: Worker, admin: AIOKafkaAdminClient, group: str, topic: str, ends: dict[int, int]
) -> Catchup:
    launched = time.monotonic()
    worker.start()
    cpu0 = await wait_started(worker)
    main0 = cpu_s(worker.pid, main_thread=True)
    wall0 = time.monotonic()
    already = sum((await committed(admin, group, topic)).values())
    await wait_caught_up(worker, admin, group, topic, ends)
    cpu1, wall1 = cpu_s(worker.pid), time.monotonic()
    main1 = cpu_s(worker.pid, main_thread=True)
    return Catchup(
        sum(ends.values()) - already,
        cpu1 - cpu0,
        wall1 - wall0,
        wall0 - launched,
        already,
        main1 - main0,
    )


# -- 2. freshness -----------------------------------------------------------------------------


@dataclass
class Probes:
    """Probe entities: when their publish was acknowledged and when first read back."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: dict[str, float] = field(default_factory=dict)
    acked: dict[str, float] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)
    polls: list[tuple[float, float, int]] = field(default_factory=list)
    """(start, seconds, entities) of each poll call."""
    errors: list[str] = field(default_factory=list)

    def outstanding(self) -> list[str]:
        with self.lock:
            return [e for e in self.sent if e not in self.seen]


def open_store(repo: Path) -> Any:
    """Feast's ``FeatureStore`` on the applied repo, its registry and connection opened."""
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(repo))
    store.get_online_features(features=[COUNT_REF], entity_rows=[{"entity_id": "warm-up"}])
    return store


def poll_store(store: Any, probes: Probes, stop: threading.Event) -> None:
    """Every ``POLL_S``: one ``get_online_features`` call for every probe not seen yet.

    A worker that falls behind leaves hundreds of probes outstanding, and one call then
    takes many milliseconds of this machine's CPU: the pause between calls is at least
    twice the last call, so the poller never takes more than a third of a core from the
    worker it measures (the resolution stays far below the freshness it then sees).
    """
    took = 0.0
    while not stop.is_set():
        began = time.monotonic()
        pending = probes.outstanding()
        if pending:
            try:
                result = store.get_online_features(
                    features=[COUNT_REF], entity_rows=[{"entity_id": e} for e in pending]
                ).to_dict()
            except Exception as err:  # a locked database, say: count it and poll again
                probes.errors.append(repr(err))
            else:
                now = time.monotonic()
                took = now - began
                probes.polls.append((began, took, len(pending)))
                with probes.lock:
                    for entity, count in zip(
                        result["entity_id"], result["events_total"], strict=True
                    ):
                        if count is not None and entity not in probes.seen:
                            probes.seen[entity] = now
        stop.wait(max(POLL_S - (time.monotonic() - began), 2 * took))


@dataclass
class Paced:
    sent: int
    acked: int
    send_s: float
    ack_s: float
    cpu_s: float
    """Worker CPU seconds while this process was sending."""
    most_in_flight: int
    started: float
    cpu0: float
    """Worker CPU seconds when sending began."""
    caught_up_cpu_s: float = float("nan")
    """Worker CPU seconds from when sending began until it committed the last event."""
    caught_up_s: float = float("nan")
    """Seconds from the last send until the worker committed the last event."""


async def produce_paced(
    producer: EventProducer, topic: Topic, probes: Probes, worker: Worker, run: str
) -> Paced:
    """``RATE`` events/s for ``DURATION_S``; every ``PROBE_EVERY``-th to a fresh entity."""
    rng = random.Random(23)
    total = int(RATE * DURATION_S)
    pending: set[asyncio.Task[None]] = set()
    acked = 0
    last_ack = 0.0

    async def send(events: list[InteractionEvent]) -> None:
        nonlocal acked, last_ack
        await producer.publish_many(topic, events)
        last_ack = time.monotonic()
        acked += len(events)

    async def send_probe(event: InteractionEvent) -> None:
        nonlocal acked, last_ack
        with probes.lock:
            probes.sent[event.entity_id] = time.monotonic()
        await producer.publish(topic, event)
        last_ack = time.monotonic()
        with probes.lock:
            probes.acked[event.entity_id] = last_ack
        acked += 1

    cpu0 = cpu_s(worker.pid)
    start = time.monotonic()
    sent = 0
    most_pending = 0
    while sent < total:
        due = min(total, int(RATE * (time.monotonic() - start)) + 1) - sent
        batch = []
        for i in range(sent, sent + due):
            if i % PROBE_EVERY == 0:
                probe = InteractionEvent(
                    entity_id=f"probe-{run}-{i}", event_type="view", numeric={"value": 1.0}
                )
                task = asyncio.create_task(send_probe(probe))
                pending.add(task)
                task.add_done_callback(pending.discard)
            else:
                batch.append(
                    InteractionEvent(
                        entity_id=f"fold-{rng.randrange(ENTITIES)}",
                        event_type=rng.choice(("view", "click", "buy")),
                        numeric={"value": rng.uniform(-5, 5)},
                        categorical={"category": rng.choice("abcdef")},
                    )
                )
        if batch:
            task = asyncio.create_task(send(batch))
            pending.add(task)
            task.add_done_callback(pending.discard)
        sent += due
        most_pending = max(most_pending, len(pending))
        await asyncio.sleep(TICK_S)
    send_s = time.monotonic() - start
    cpu1 = cpu_s(worker.pid)
    if pending:
        await asyncio.gather(*pending)
    return Paced(sent, acked, send_s, last_ack - start, cpu1 - cpu0, most_pending, start, cpu0)


async def sample_lag(
    settings: KafkaSettings,
    admin: AIOKafkaAdminClient,
    group: str,
    topic: str,
    worker: Worker,
    samples: list[tuple[float, int, float]],
) -> None:
    """Every 0.5 s: (time, events produced but not committed by the worker, worker CPU s)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        while True:
            ends = await consumer.end_offsets(tps)
            done = await committed(admin, group, topic)
            lag = sum(max(0, end - done.get(tp.partition, 0)) for tp, end in ends.items())
            samples.append((time.monotonic(), lag, cpu_s(worker.pid)))
            await asyncio.sleep(0.5)
    finally:
        await consumer.stop()


async def freshness(
    settings: KafkaSettings,
    topic: Topic,
    repo: Path,
    worker: Worker,
    admin: AIOKafkaAdminClient,
    group: str,
) -> tuple[Paced, Probes, list[tuple[float, int, float]]]:
    probes = Probes()
    stop = threading.Event()
    # Opened here, before the clock starts: importing feast takes seconds.
    store = open_store(repo)
    poller = threading.Thread(target=poll_store, args=(store, probes, stop), daemon=True)
    poller.start()
    producer = EventProducer(settings, "bench")
    await producer.start()
    samples: list[tuple[float, int, float]] = []
    sampler = asyncio.create_task(sample_lag(settings, admin, group, topic.name, worker, samples))
    try:
        await asyncio.sleep(1.0)  # a few lag samples before
        paced = await produce_paced(producer, topic, probes, worker, uuid.uuid4().hex[:6])
        # Every probe is seen once the worker caught up (unless it is far behind).
        deadline = time.monotonic() + PROBE_WAIT_S
        while probes.outstanding() and time.monotonic() < deadline:
            worker.check()
            await asyncio.sleep(0.1)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        stop.set()
        poller.join(timeout=30)
        await producer.stop()
    return paced, probes, samples


# -- the run ----------------------------------------------------------------------------------


def pct(samples: list[float], q: int) -> float:
    if len(samples) < 2:
        return samples[0] if samples else float("nan")
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


async def _measure(tmp: Path, repo: Path) -> dict[str, Any]:
    broker = KafkaBroker(tmp / "kafka")
    with console.status("starting Kafka"):
        broker.start()
    worker: Worker | None = None
    try:
        settings = KafkaSettings(
            bootstrap_servers=broker.bootstrap_servers, default_partitions=PARTITIONS
        )
        events = replace(EVENTS_RAW, name="bench.events.raw")
        erasures = replace(ENTITIES_ERASED, name="bench.entities.erased")
        await declare_topics(settings, [events, erasures])
        producer = EventProducer(settings, "bench")
        await producer.start()
        try:
            with console.status(f"producing {EVENTS:,} events"):
                data = history(EVENTS, ENTITIES)
                for i in range(0, len(data), 2000):
                    await producer.publish_many(events, data[i : i + 2000])
        finally:
            await producer.stop()
        ends = await end_offsets(settings, events.name)

        bare = []
        for i in range(BARE_RUNS):
            with console.status(f"bare aiokafka consumer, run {i + 1} of {BARE_RUNS}"):
                bare.append(bare_run(settings, events.name, ends))

        app_id = "bench-features"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "LOOPMESH_KAFKA__DEFAULT_PARTITIONS": str(PARTITIONS),
            "LOOPMESH_FEATURES__REPO_PATH": str(repo),
            "LOOPMESH_FEATURES__SERVER__PORT": str(free_port()),
            "LOOPMESH_FEATURES__APP_ID": app_id,
            "LOOPMESH_FEATURES__EVENTS_TOPIC": events.name,
            "LOOPMESH_FEATURES__ERASURES_TOPIC": erasures.name,
            "LOOPMESH_FEATURES__STREAM__SESSION_TIMEOUT_S": "6",
            "LOOPMESH_FEATURES__STREAM__HEARTBEAT_INTERVAL_S": "1",
            "LOOPMESH_FEATURES__STREAM__REBALANCE_TIMEOUT_S": "30",
            # As deployed, the Go data plane serves reads on the public port (idle here: the
            # probes are read through Feast); a host without the binary runs without it.
            "LOOPMESH_FEATURES__DATAPLANE__ENABLED": str(binary_beside_python() is not None),
        }
        worker = Worker(env, tmp / "worker.log")
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
        await admin.start()
        try:
            with console.status("features worker: start-up, then the pre-produced topic"):
                fold = await catch_up(worker, admin, app_id, events.name, ends)
            with console.status(f"freshness: {RATE:,.0f} events/s for {DURATION_S:.0f} s"):
                paced, probes, lag = await freshness(settings, events, repo, worker, admin, app_id)
                fresh_ends = await end_offsets(settings, events.name)
                await wait_caught_up(worker, admin, app_id, events.name, fresh_ends)
                paced.caught_up_cpu_s = cpu_s(worker.pid) - paced.cpu0
                paced.caught_up_s = time.monotonic() - (paced.started + paced.send_s)
        finally:
            await admin.close()
        code = worker.stop()
        if code != 0:
            console.print(f"[red]the worker exited {code}:\n{log_tail(worker.log)}")
        return {"bare": bare, "fold": fold, "paced": paced, "probes": probes, "lag": lag}
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()


def _report(results: dict[str, Any], load_before: tuple[float, ...]) -> None:
    bare: list[dict[str, float]] = results["bare"]
    fold: Catchup = results["fold"]
    paced: Paced = results["paced"]
    probes: Probes = results["probes"]
    per_bare = [run["cpu_s"] / run["records"] * 1e6 for run in bare]
    bare_us = statistics.median(per_bare)
    bare_wall = statistics.median(run["wall_s"] for run in bare)
    fold_us = fold.cpu_s / fold.events * 1e6

    table = Table(
        title=f"CPU per event reading {EVENTS:,} pre-produced events ({ENTITIES} entities, "
        f"{PARTITIONS} partitions) from the beginning"
    )
    for column in ("process", "events", "CPU s", "CPU µs/event", "wall s", "events/s", "ratio"):
        table.add_column(column, justify="right")
    table.add_row(
        f"bare aiokafka + json.loads (median of {len(bare)})",
        f"{int(bare[0]['records']):,}",
        f"{statistics.median(run['cpu_s'] for run in bare):.2f}",
        f"{bare_us:.1f}",
        f"{bare_wall:.2f}",
        f"{EVENTS / bare_wall:,.0f}",
        "1.00x",
    )
    table.add_row(
        "features worker, 10 aggregations, SQLite",
        f"{fold.events:,}",
        f"{fold.cpu_s:.2f}",
        f"{fold_us:.1f}",
        f"{fold.wall_s:.2f}",
        f"{fold.events / fold.wall_s:,.0f}",
        f"{fold_us / bare_us:.1f}x",
    )
    console.print(table)
    console.print(
        "bare runs µs/event: "
        + ", ".join(f"{u:.1f}" for u in per_bare)
        + " (from the first record instead: "
        + ", ".join(f"{r['cpu_from_first_s'] / r['records'] * 1e6:.1f}" for r in bare)
        + f'); worker start-up to "features started" {fold.startup_s:.1f} s wall, '
        f"{fold.committed_at_start} events committed by then; Go data plane "
        + ("on (idle)" if binary_beside_python() is not None else "not found: off")
    )
    console.print(
        f"worker CPU µs/event by thread: main (event loop: decode, fold, state JSON, changelog, "
        f"commit) {fold.main_cpu_s / fold.events * 1e6:.1f}, others (mostly Feast's: the "
        f"online-store writes) {(fold.cpu_s - fold.main_cpu_s) / fold.events * 1e6:.1f}"
    )

    fresh = [(probes.seen[e] - probes.acked[e]) * 1000 for e in probes.seen if e in probes.acked]
    table = Table(
        title=f"Freshness at {RATE:,.0f} events/s for {DURATION_S:.0f} s: producer ack -> "
        f"readable online (SQLite), 1 in {PROBE_EVERY} events a probe"
    )
    lag: list[tuple[float, int, float]] = results["lag"]
    during = [n for t, n, _ in lag if paced.started <= t <= paced.started + paced.send_s]
    for column in (
        "achieved events/s",
        "probes seen",
        "p50 ms",
        "p99 ms",
        "max ms",
        "worker max lag",
        "caught up after",
        "worker CPU µs/event",
        "worker cores",
        "poll p50 ms",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        f"{paced.sent / paced.send_s:,.0f} sent, {paced.acked / paced.ack_s:,.0f} acked",
        f"{len(fresh)} of {len(probes.sent)}",
        f"{pct(fresh, 50):,.0f}",
        f"{pct(fresh, 99):,.0f}",
        f"{max(fresh):,.0f}" if fresh else "-",
        f"{max(during, default=0):,}",
        f"{paced.caught_up_s:.1f} s",
        f"{paced.caught_up_cpu_s / paced.sent * 1e6:.1f}",
        f"{paced.cpu_s / paced.send_s:.2f}",
        f"{pct([p[1] * 1000 for p in probes.polls], 50):.1f}",
    )
    console.print(table)
    console.print(
        "worker max lag: events produced and not yet committed by the worker, sampled every "
        "0.5 s while producing; caught up after: from the last send to the worker's last "
        "commit; worker CPU µs/event: from the first send to that commit; worker cores: its "
        "CPU while this process was sending"
    )
    if os.environ.get("BENCH_FOLD_DEBUG"):
        for t, n, cpu in lag:
            console.print(f"  t={t - paced.started:6.2f} s lag={n:6d} worker cpu={cpu:7.2f} s")
        for began, took, n in probes.polls[::10]:
            console.print(f"  poll t={began - paced.started:6.2f} s {took * 1000:6.1f} ms {n} ids")
        for e in sorted(probes.sent, key=probes.sent.__getitem__):
            console.print(
                f"  {e}: sent {probes.sent[e] - paced.started:6.2f} "
                f"acked {probes.acked.get(e, float('nan')) - paced.started:6.2f} "
                f"seen {probes.seen.get(e, float('nan')) - paced.started:6.2f}"
            )
    if probes.errors:
        console.print(f"[yellow]{len(probes.errors)} polls failed, first: {probes.errors[0]}")
    load = os.getloadavg()
    console.print(
        f"load average {load_before[0]:.1f} before, {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} "
        f"after (1/5/15 min) on {os.cpu_count()} cores; most publishes in flight "
        f"{paced.most_in_flight}"
        + ("; [yellow]worker under cProfile: CPU figures include its overhead" if PROFILE else "")
    )


def _run() -> None:
    load_before = os.getloadavg()
    keep = os.environ.get("BENCH_FOLD_KEEP")
    with tempfile.TemporaryDirectory(prefix="features-fold-bench-") as tmp_name:
        tmp = Path(keep or tmp_name)
        if keep:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        project = tmp / "project"
        project.mkdir()
        (project / "features.py").write_text(FEATURES_PY)
        (project / "feature_store.yaml").write_text(f"project: {PROJECT}\n")
        with console.status("preparing and applying the Feast project"):
            repo = prepare_repo(tmp / "repo", project=project)
            apply_repo(repo)
        try:
            results = asyncio.run(_measure(tmp, repo))
        except BaseException:
            with contextlib.suppress(OSError):
                console.print(log_tail(tmp / "worker.log"))
            raise
    _report(results, load_before)


def main() -> None:
    # The freshness poller imports feast in this process: keep torch out (only to_tensor
    # needs it), as loopmesh.features.__main__ does, and put it back for the next benchmark.
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        _run()
    finally:
        if blocked:
            del sys.modules["torch"]


if __name__ == "__main__":
    main()
