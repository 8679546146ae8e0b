"""Kafka SIGKILLed under a 20,000-event ingest stream, then restarted on the same data and port.

Runs its own broker (the session broker is shared and never killed). ``python -m
loopmesh.ingestion`` takes a paced ``IngestStream`` from a client that behaves like a product
app: when the stream breaks it resends, with the same event ids, everything the
``loopmesh-acked-events`` trailer does not count as handled, until every event is acknowledged.
Meanwhile a ``python -m loopmesh.features`` worker (the features fold, the session's Feast repo) and
a ``bus.EventConsumer`` group in the test consume ``events.raw``. Mid-stream the broker gets
SIGKILL and comes back after a short outage.

Proved, each with a deadline: every acknowledged event is in ``events.raw``, and each event id
is counted once by the features although the topic holds copies; the consumer group resumes
from its committed offsets (no replay from offset 0) and commits up to the end; a fresh
features app (in the test, empty local state) recovers from the changelog the state the
stopped worker served, and still recognises old event ids. Services run as processes so that,
on a loaded machine, they get CPU time of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from loopmesh.devstack.kafka import KafkaBroker
from loopmesh.devstack.process import free_port, log_tail
from loopmesh.features.agents import FeatureAgents
from loopmesh.features.core import EntityFold
from loopmesh.features.settings import FeaturesScope, FeaturesSettings, StreamTuning
from loopmesh.gen.loopmesh.v1 import ingestion_pb2 as ipb
from loopmesh.gen.loopmesh.v1 import ingestion_pb2_grpc as ipb_grpc
from loopmesh.mesh.bus import Delivery, EventConsumer, EventProducer, declare_topics
from loopmesh.mesh.events import InteractionEvent
from loopmesh.mesh.intake_server import ACKED_TRAILER
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import ENTITIES_ERASED, EVENTS_RAW, Topic
from tests.helpers import eventually, unique_topic
from tests.test_ingestion_support import (
    PYTHON,
    event_ids,
    read_all,
    start_process,
    terminate,
    wait_serving,
)

pytestmark = pytest.mark.e2e  # assembles the mesh: several services on real parts

N_EVENTS = 20_000
BATCH = 100  # events per stream message
PACE_S = 0.03  # between stream messages (at most ~3,300 events/s): the kill lands mid-stream
KILL_AFTER = 6_000  # events the first stream attempt has sent when the broker is killed
OUTAGE_S = 2.0  # dead time before the restart begins (the JVM start adds seconds more)
ACK_TIMEOUT_S = 3.0  # ingestion's wait for Kafka's acknowledgement before UNAVAILABLE
ENTITIES = 40
PARTITIONS = 2
SERVICE = "loopmesh.v1.IngestionService"


@dataclass
class ProducerApp:
    """A product app streaming events: resends what was not acknowledged, same ids, until done."""

    address: str
    events: list[ipb.InteractionEvent]
    deadline_s: float = 150.0
    streamed: int = 0
    """Events handed to gRPC by the first attempt (the kill trigger)."""
    acked: int = 0
    """Events from the start acknowledged (written, or duplicates of written ones)."""
    attempts: int = 0
    broken: list[grpc.StatusCode] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _messages(self, start: int) -> Iterator[ipb.IngestRequest]:
        # The first attempt streams as events happen; a resend sends the backlog at once.
        first = self.attempts == 1
        for offset in range(start, len(self.events), BATCH):
            if self.stop.is_set():
                return
            yield ipb.IngestRequest(events=self.events[offset : offset + BATCH])
            if first:
                self.streamed = offset + BATCH
                time.sleep(PACE_S)

    def run(self) -> None:
        deadline = time.monotonic() + self.deadline_s
        # grpc's synchronous client: see test_ingestion_outage on grpc.aio's (grpc/grpc#36066).
        with grpc.insecure_channel(self.address) as channel:
            stub = ipb_grpc.IngestionServiceStub(channel)
            while self.acked < len(self.events):
                if time.monotonic() > deadline or self.stop.is_set():
                    raise AssertionError(f"gave up with {self.acked} of {len(self.events)} acked")
                self.attempts += 1
                start = self.acked
                try:
                    reply = stub.IngestStream(self._messages(start), timeout=60)
                except grpc.RpcError as err:
                    code = err.code()
                    self.broken.append(code)
                    assert code == grpc.StatusCode.UNAVAILABLE, err
                    trailer = dict(err.trailing_metadata() or ())
                    self.acked = start + int(trailer[ACKED_TRAILER])
                    time.sleep(0.2)  # a client's backoff before reconnecting
                    continue
                assert reply.rejected == 0, reply.results
                assert reply.accepted + reply.duplicates == len(self.events) - start
                self.acked = len(self.events)


@contextlib.asynccontextmanager
async def stopping(process: subprocess.Popen[bytes], log: Path) -> AsyncIterator[None]:
    """Stop ``process`` with SIGTERM on leaving, asserting a clean exit."""
    yield
    assert await terminate(process, timeout=60) == 0, log_tail(log)


@contextlib.asynccontextmanager
async def consuming(consumer: EventConsumer[Any]) -> AsyncIterator[asyncio.Task[None]]:
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        yield task
    finally:
        await consumer.stop()
        await asyncio.wait([task], timeout=10)


def ingestion_env(kafka: KafkaSettings, topic: str, port: int) -> dict[str, str]:
    """The environment of ``python -m loopmesh.ingestion`` writing to ``topic``."""
    return {
        "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "LOOPMESH_KAFKA__DEFAULT_PARTITIONS": str(PARTITIONS),
        # Fail fast while Kafka is away, as in test_ingestion_outage.
        "LOOPMESH_KAFKA__REQUEST_TIMEOUT_MS": "3000",
        "LOOPMESH_INGESTION__ACK_TIMEOUT_SECONDS": str(ACK_TIMEOUT_S),
        "LOOPMESH_INGESTION__SERVER__PORT": str(port),
        "LOOPMESH_INGESTION__SERVER__GRACE_SECONDS": "1",
        "LOOPMESH_INGESTION__TOPIC": topic,
    }


def features_scope(repo: Path, app_id: str, events: Topic, erasures: Topic) -> FeaturesScope:
    return FeaturesScope(
        repo_path=repo,
        app_id=app_id,
        events_topic=events.name,
        erasures_topic=erasures.name,
        run_server=False,  # the test reads the online store itself
        # Fewer, larger batches: each writes every touched entity's state to the changelog.
        push_batch_size=2000,
        push_batch_s=0.5,
        push_retry_s=0.5,
        # Short group timings: rejoining after the outage takes seconds, not a minute.
        stream=StreamTuning(
            session_timeout_s=6,
            heartbeat_interval_s=1,
            rebalance_timeout_s=10,
        ),
    )


def as_env(kafka: KafkaSettings, scope: FeaturesScope) -> dict[str, str]:
    """``scope`` as the ``LOOPMESH_FEATURES__*`` environment of a worker process."""
    env = {
        "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "LOOPMESH_KAFKA__DEFAULT_PARTITIONS": str(PARTITIONS),
    }
    for name, value in scope.model_dump(exclude_none=True).items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, item in items:
            if not isinstance(item, dict):
                key = f"LOOPMESH_FEATURES__{name}" + (f"__{sub}" if sub else "")
                env[key.upper()] = str(item)
    return env


@contextlib.asynccontextmanager
async def features_app(settings: FeaturesSettings, sink: Any) -> AsyncIterator[FeatureAgents]:
    agents = FeatureAgents(settings, sink, partitions=PARTITIONS)
    await agents.start()
    try:
        yield agents
    finally:
        await agents.stop()


def table_state(agents: FeatureAgents) -> dict[str, bytes]:
    if agents.crashed:
        raise AssertionError("the features app crashed")
    return dict(agents.table.items())


async def caught_up(kafka: KafkaSettings, group: str, topic: str) -> bool:
    """True once ``group`` committed every offset of ``topic`` written so far."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    await consumer.start()
    try:
        end = await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        done = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return all(tp in done and done[tp].offset >= offset for tp, offset in end.items())


def open_gateway(scope: FeaturesScope) -> Any:
    from loopmesh.features.store import FeastGateway  # imports feast: seconds, so not at top

    return FeastGateway.open(scope)


async def served(gateway: Any, entities: list[str]) -> dict[str, dict[str, Any]]:
    """Every feature the online store serves for ``entities``, by entity and ref."""
    specs = gateway.schema.features
    rows = await gateway.read(entities, specs)
    return {
        e: {s.ref: stored.value for s, stored in zip(specs, row, strict=True)}
        for e, row in zip(entities, rows, strict=True)
    }


def state_as_served(
    state: dict[str, bytes], specs: Sequence[Any], gateway: Any
) -> dict[str, dict[str, Any]]:
    """What the online store should serve for a table's states (``EntityFold.rows``)."""
    out = {}
    views = gateway.definitions.views_of("entity_id")
    for key, raw in state.items():
        if "=" not in key:
            continue  # the backfill marker
        fold = EntityFold.load(key, raw, views)
        rows = fold.rows()
        out[fold.value] = {s.ref: rows[s.view][s.name] for s in specs}
    return out


def totals(view: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {e: features["entity_activity:events_total"] for e, features in view.items()}


async def test_broker_sigkill_mid_stream_loses_nothing_and_counts_each_event_once(
    feast_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This broker's JVM only (it inherits the environment): the C1 compiler alone halves its
    # start on a loaded machine (measured 24 s -> 8-13 s), and it starts twice here.
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-XX:TieredStopAtLevel=1")
    t0 = time.monotonic()
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = round(time.monotonic() - t0, 1)

    broker = KafkaBroker(tmp_path / "kafka")
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, default_partitions=PARTITIONS)
    events, erasures = unique_topic(EVENTS_RAW), unique_topic(ENTITIES_ERASED)
    run = uuid.uuid4().hex[:6]
    app_id = f"bk-features-{run}"
    scope = features_scope(feast_repo, app_id, events, erasures)
    entities = [f"bk-{run}-{i}" for i in range(ENTITIES)]
    warm = ipb.InteractionEvent(event_id=uuid.uuid4().hex, entity_id=entities[0], event_type="w")
    sent = [
        ipb.InteractionEvent(
            event_id=uuid.uuid4().hex,
            entity_id=entities[i % ENTITIES],
            event_type="click",
            numeric={"value": float(i % 7)},
        )
        for i in range(N_EVENTS)
    ]
    want: dict[str, Any] = dict(Counter(e.entity_id for e in [warm, *sent]))
    acked_ids = {warm.event_id} | {e.event_id for e in sent}
    deliveries: list[tuple[int, int, str]] = []

    async def count(event: InteractionEvent, delivery: Delivery) -> None:
        deliveries.append((delivery.partition, delivery.offset, event.event_id))

    producer = EventProducer(kafka, "fault-test")
    group = f"bk-counter-{run}"
    counter = EventConsumer(kafka, events, group, count, dlq=producer, service="fault-counter")
    client: ProducerApp | None = None
    gateway: Any = None
    processes: list[subprocess.Popen[bytes]] = []
    port = free_port()
    address = f"127.0.0.1:{port}"
    try:
        # The door starts first and waits out Kafka by itself, as in a container start order.
        door = start_process(
            [PYTHON, "-m", "loopmesh.ingestion"],
            ingestion_env(kafka, events.name, port),
            tmp_path / "ingestion.log",
        )
        processes.append(door)
        # The broker's JVM and feast's imports take seconds each: side by side.
        _, gateway = await asyncio.gather(
            asyncio.to_thread(broker.start), asyncio.to_thread(open_gateway, scope)
        )
        mark("broker up")
        await declare_topics(kafka, [events, erasures])
        await producer.start()
        worker_log = tmp_path / "features.log"
        worker = start_process(
            [PYTHON, "-m", "loopmesh.features"], as_env(kafka, scope), worker_log
        )
        processes.append(worker)
        async with (
            stopping(door, tmp_path / "ingestion.log"),
            stopping(worker, worker_log),
            consuming(counter) as counting,
        ):

            def alive() -> None:
                if counting.done():
                    raise AssertionError(f"the counting consumer ended: {counting!r}")
                if worker.poll() is not None:
                    raise AssertionError(f"the features worker exited:\n{log_tail(worker_log)}")

            await wait_serving(door, address, SERVICE, tmp_path / "ingestion.log", timeout=90)
            # Everyone is consuming before the stream starts.
            async with grpc.aio.insecure_channel(address) as channel:
                stub = ipb_grpc.IngestionServiceStub(channel)
                reply = await stub.Ingest(ipb.IngestRequest(events=[warm]), timeout=30)
            assert reply.accepted == 1

            async def warmed() -> bool:
                alive()
                first = await served(gateway, entities[:1])
                return bool(deliveries) and totals(first) == {entities[0]: 1}

            await eventually(warmed, timeout=90, interval=0.5)
            mark("warm")

            client = ProducerApp(address, sent)
            streaming = asyncio.create_task(asyncio.to_thread(client.run))

            async def far_enough() -> bool:
                if streaming.done():
                    raise AssertionError(f"the stream ended before the kill: {streaming!r}")
                return client is not None and client.streamed >= KILL_AFTER

            await eventually(far_enough, timeout=60, interval=0.05)
            broker.kill()
            mark("killed")
            consumed_before_kill = len(deliveries)
            await asyncio.sleep(OUTAGE_S)  # the outage itself, not a wait for a condition
            await asyncio.to_thread(broker.restart)
            mark("restarted")
            await asyncio.wait_for(streaming, timeout=180)
            mark("acked")
            # The kill broke the stream, and the app finished by resending.
            assert client.broken and set(client.broken) == {grpc.StatusCode.UNAVAILABLE}

            # (a) Every acknowledged event is in events.raw; copies there are resends.
            records = await read_all(kafka, events.name)
            landed = event_ids(records)
            assert set(landed) == acked_ids, (
                f"{len(acked_ids - set(landed))} acknowledged events missing, "
                f"{len(set(landed) - acked_ids)} unknown ones"
            )

            # ... and the features worker counted each event id once.
            async def features_counted() -> bool:
                alive()
                return await caught_up(kafka, app_id, events.name) and (
                    totals(await served(gateway, entities)) == want
                )

            try:
                await eventually(features_counted, timeout=120, interval=0.5)
            except AssertionError as err:
                got = totals(await served(gateway, entities))
                diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
                raise AssertionError(f"{err}; (got, want) per entity: {diff}") from None
            mark("features caught up")

            # (b) The counting group resumed from its committed offsets and committed to the end.
            await eventually(lambda: caught_up(kafka, group, events.name), timeout=60)
            mark("counter caught up")
            alive()
            assert {event_id for _, _, event_id in deliveries} == acked_ids
            redelivered = len(deliveries) - len({(p, o) for p, o, _ in deliveries})
            assert len(deliveries) == len(landed) + redelivered
            # Commits per handled batch: at most a batch per partition comes again, where a
            # replay from offset 0 would bring back everything consumed before the kill.
            assert consumed_before_kill > 1000
            assert redelivered <= min(consumed_before_kill // 2, 500 * PARTITIONS), redelivered
        # The worker has stopped: what it served is its final state.
        before = await served(gateway, entities)
        assert totals(before) == want

        # (c) A fresh features app (empty local state) recovers that state from the changelog,
        # and still knows the old ids: resent events are not counted again.
        fresh_scope = features_scope(feast_repo, app_id, events, erasures)
        fresh_settings = FeaturesSettings(kafka=kafka, features=fresh_scope)
        specs = gateway.schema.features
        async with features_app(fresh_settings, gateway) as fresh:

            async def recovered() -> bool:
                return state_as_served(table_state(fresh), specs, gateway) == before

            await eventually(recovered, timeout=60, interval=0.2)
            mark("recovered")
            old = [InteractionEvent.model_validate(value) for _, value in records[:300]]
            new = InteractionEvent(entity_id=entities[1], event_type="after")
            await producer.publish_many(events, [*old, new])
            want[entities[1]] += 1

            async def recounted() -> bool:
                return await caught_up(kafka, app_id, events.name) and (
                    totals(state_as_served(table_state(fresh), specs, gateway)) == want
                )

            await eventually(recounted, timeout=60, interval=0.5)
            assert fresh.stats.outcomes["accepted"] == 1
            assert fresh.stats.outcomes["duplicate"] >= len(old)
            mark("recounted")
        print(
            f"\n{client.attempts} stream attempts; {len(landed) - len(acked_ids)} copies in "
            f"events.raw; {consumed_before_kill} consumed before the kill; {redelivered} "
            f"redelivered; seconds: {marks}"
        )
    finally:
        if client is not None:
            client.stop.set()
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        await producer.stop()
        if gateway is not None:
            gateway.close()
        await asyncio.to_thread(broker.stop)
