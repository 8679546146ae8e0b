"""The features service end to end: a real ``python -m loopmesh.features`` worker process.

The worker (the fold + FeatureService) runs on the session's Kafka broker and Feast repo,
with its own app id and topics. Events reach it the way ingestion sends them: the ingestion
service validates a request and then produces to the events topic with
``loopmesh.mesh.bus.EventProducer``, which is exactly what these tests do (so they do not
depend on the ingestion service, written separately). Expected feature values are computed
in the test from the same events (``tests.test_features_core.expected``), not by the
service's fold. The worker is a subprocess so the restart test can SIGKILL it: the most
honest test of changelog recovery.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loopmesh.devstack.process import free_port, log_tail
from loopmesh.features.core import DEFAULT_MAX_AGE_SECONDS
from loopmesh.features.export import export_training_frame, read_event_log
from loopmesh.gen.loopmesh.v1 import features_pb2, features_pb2_grpc
from loopmesh.mesh.bus import EventProducer, declare_topics
from loopmesh.mesh.events import DeadLetter, EntityErased, InteractionEvent
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import ENTITIES_ERASED, EVENTS_RAW, Topic
from tests.helpers import eventually, read_topic, unique_topic
from tests.test_features_core import DEFAULT_VIEWS, expected

PRESENT = features_pb2.FEATURE_STATUS_PRESENT
MISSING = features_pb2.FEATURE_STATUS_MISSING
STALE = features_pb2.FEATURE_STATUS_STALE
MAX_ENTITIES = 20


class Worker:
    """``python -m loopmesh.features`` as a child process."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loopmesh.features"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@dataclass
class Service:
    worker: Worker
    stub: Any
    producer: EventProducer
    events: Topic
    erasures: Topic
    app_id: str
    kafka: KafkaSettings
    address: str


async def _serving(address: str) -> bool:
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="loopmesh.v1.FeatureService"), timeout=2
            )
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def _wait_serving(service: Service) -> None:
    proc = service.worker.proc
    assert proc is not None

    async def check() -> bool:
        if proc.poll() is not None:
            raise AssertionError(
                f"worker exited {proc.returncode}:\n{log_tail(service.worker.log)}"
            )
        return await _serving(service.address)

    await eventually(check, timeout=120, interval=0.5)


def _worker_env(
    kafka_settings: KafkaSettings,
    feast_repo: Path,
    port: int,
    app_id: str,
    events: Topic,
    erasures: Topic,
) -> dict[str, str]:
    return {
        **os.environ,
        "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "LOOPMESH_KAFKA__DEFAULT_PARTITIONS": str(kafka_settings.default_partitions),
        "LOOPMESH_FEATURES__REPO_PATH": str(feast_repo),
        "LOOPMESH_FEATURES__SERVER__PORT": str(port),
        "LOOPMESH_FEATURES__APP_ID": app_id,
        "LOOPMESH_FEATURES__EVENTS_TOPIC": events.name,
        "LOOPMESH_FEATURES__ERASURES_TOPIC": erasures.name,
        "LOOPMESH_FEATURES__MAX_ENTITIES": str(MAX_ENTITIES),
        # Short group timings: joins and the rejoin after a SIGKILL take seconds, not a minute.
        "LOOPMESH_FEATURES__STREAM__SESSION_TIMEOUT_S": "6",
        "LOOPMESH_FEATURES__STREAM__HEARTBEAT_INTERVAL_S": "1",
        "LOOPMESH_FEATURES__STREAM__REBALANCE_TIMEOUT_S": "10",
    }


@pytest.fixture(scope="module")
async def service(
    kafka_settings: KafkaSettings, feast_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Service]:
    workdir = tmp_path_factory.mktemp("features")
    events, erasures = unique_topic(EVENTS_RAW), unique_topic(ENTITIES_ERASED)
    # Declared before anything is produced: an auto-created topic gets one partition only.
    await declare_topics(kafka_settings, [events, erasures])
    port = free_port()
    app_id = f"features-test-{uuid.uuid4().hex[:8]}"
    env = _worker_env(kafka_settings, feast_repo, port, app_id, events, erasures)
    worker = Worker(env, workdir / "worker.log")
    worker.start()
    producer = EventProducer(kafka_settings, "features-test")
    await producer.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    svc = Service(
        worker,
        features_pb2_grpc.FeatureServiceStub(channel),
        producer,
        events,
        erasures,
        app_id,
        kafka_settings,
        address,
    )
    try:
        await _wait_serving(svc)
        yield svc
        assert worker.stop() == 0, log_tail(worker.log)
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.kill()
        await channel.close()
        await producer.stop()


# ------------------------------------------------------------------------------- helpers


def now() -> datetime:
    return datetime.now(UTC)


def history(
    entity: str, n: int, *, end: datetime, span_h: float = 20.0, seed: int = 0
) -> list[InteractionEvent]:
    """``n`` events over ``span_h`` hours ending at ``end``, newest first in the list."""
    rng = random.Random(seed)
    out = [InteractionEvent(entity_id=entity, event_type="open", event_time=end)]
    for _ in range(n - 1):
        out.append(
            InteractionEvent(
                entity_id=entity,
                event_type=rng.choice(["view", "click", "buy"]),
                event_time=end - timedelta(minutes=rng.uniform(0.5, span_h * 60)),
                numeric={"value": rng.uniform(-5, 5)}
                | ({"amount": 3.0} if rng.random() < 0.3 else {}),
                categorical={"category": rng.choice(["a", "b"])} if rng.random() < 0.5 else {},
            )
        )
    return out


def relabel(events: list[InteractionEvent], entity: str) -> list[InteractionEvent]:
    """The same events (times, values) for another entity, with fresh event ids."""
    return [
        e.model_copy(update={"entity_id": entity, "event_id": uuid.uuid4().hex}) for e in events
    ]


async def read(svc: Service, *entity_ids: str, refs: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{entity: {ref: (value, status)}}`` through GetOnlineFeatures."""
    reply = await svc.stub.GetOnlineFeatures(
        features_pb2.GetOnlineFeaturesRequest(entity_ids=entity_ids, feature_refs=refs), timeout=10
    )
    out: dict[str, Any] = {}
    for entity in reply.entities:
        row = {}
        for ref, value in zip(reply.feature_refs, entity.values, strict=True):
            kind = value.value.WhichOneof("kind")
            row[ref.split(":")[1]] = (getattr(value.value, kind) if kind else None, value.status)
        out[entity.entity_id] = row
    return out


def values(row: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, (value, _) in row.items()}


async def caught_up(svc: Service) -> None:
    """Wait until the worker committed every message now on its events and erasures topics."""
    consumer = AIOKafkaConsumer(bootstrap_servers=svc.kafka.bootstrap_servers)
    await consumer.start()
    try:
        tps = [
            TopicPartition(topic.name, p)
            for topic in (svc.events, svc.erasures)
            for p in range(svc.kafka.default_partitions)
        ]
        end = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()

    async def committed() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=svc.kafka.bootstrap_servers)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(svc.app_id)
        finally:
            await admin.close()
        return all(tp in offsets and offsets[tp].offset >= end[tp] for tp in tps if end[tp])

    await eventually(committed, timeout=60, interval=0.2)


def expect_rounded(events: list[InteractionEvent]) -> dict[str, Any]:
    """``expected`` as the wire carries it: counts as numbers, means to a float tolerance."""
    want = expected(events)
    return {k: (float(v) if isinstance(v, int) else v) for k, v in want.items()}


def close(got: dict[str, Any], want: dict[str, Any]) -> bool:
    return got.keys() == want.keys() and all(
        got[k] == (pytest.approx(v, rel=1e-9, abs=1e-9) if isinstance(v, float) else v)
        for k, v in want.items()
    )


async def until_close(svc: Service, entity: str, want: dict[str, Any]) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        row = (await read(svc, entity))[entity]
        return row if close(values(row), want) else None

    try:
        return await eventually(check, timeout=90, interval=0.2)
    except AssertionError as err:
        got = values((await read(svc, entity))[entity])
        raise AssertionError(
            f"{entity}: want {want}\n got {got}\n{log_tail(svc.worker.log)}"
        ) from err


# --------------------------------------------------------------------------------- tests


async def test_produced_events_become_the_expected_features(service: Service) -> None:
    events = history("fa-" + uuid.uuid4().hex[:6], 12, end=now() - timedelta(minutes=5))
    await service.producer.publish_many(service.events, events)
    row = await until_close(service, events[0].entity_id, expect_rounded(events))
    assert {status for _, (value, status) in row.items() if value is not None} == {PRESENT}
    assert all(status == MISSING for value, status in row.values() if value is None)
    # The offline export, replayed from the same log, agrees with what is served online.
    log = await read_event_log(service.kafka, service.events.name)
    frame = export_training_frame(
        pd.DataFrame({"entity_id": [events[0].entity_id], "event_timestamp": [now()]}),
        log,
        DEFAULT_VIEWS,
    )
    exported = {
        name.split("__")[1]: None if pd.isna(v) else v if isinstance(v, str) else float(v)
        for name, v in frame.iloc[0].items()
        if name not in ("entity_id", "event_timestamp")
    }
    assert close(exported, expect_rounded(events))


async def test_shuffled_order_and_redelivery_give_the_same_values(service: Service) -> None:
    base = history("fs-" + uuid.uuid4().hex[:6], 25, end=now() - timedelta(minutes=1), seed=7)
    in_order = sorted(base, key=lambda e: e.event_time)
    shuffled = relabel(base, "fs-" + uuid.uuid4().hex[:6])
    redelivered = shuffled + random.Random(3).sample(shuffled, 8)
    random.Random(5).shuffle(redelivered)
    await service.producer.publish_many(service.events, in_order)
    await service.producer.publish_many(service.events, redelivered)
    want = expect_rounded(in_order)
    await until_close(service, in_order[0].entity_id, want)
    await until_close(service, shuffled[0].entity_id, want)
    await caught_up(service)  # every redelivery handled: no transient match counts
    both = await read(service, in_order[0].entity_id, shuffled[0].entity_id)
    first, second = (values(row) for row in both.values())
    # Exactly equal, means included (exact sums), and both counted every event once.
    assert first == second
    assert close(second, want)
    assert second["events_total"] == 25


async def test_poison_messages_are_dead_lettered_and_the_agent_keeps_going(
    service: Service,
) -> None:
    entity = "fp-" + uuid.uuid4().hex[:6]
    await service.producer.publish_raw(
        service.events.name, b"{not json", entity.encode(), [("origin", b"poison-test")]
    )
    await service.producer.publish_raw(
        service.events.name, b'{"event_type": "click"}', entity.encode(), []
    )
    good = [InteractionEvent(entity_id=entity, event_type="click", numeric={"value": 2.0})]
    await service.producer.publish_many(service.events, good)
    await until_close(service, entity, expect_rounded(good))
    dead = [
        (DeadLetter.model_validate_json(value or b""), headers)
        for key, value, headers in await read_topic(service.kafka, service.events.dlq, expect=2)
        if key == entity.encode()
    ]
    letters = [letter for letter, _ in dead]
    # The original headers travel with the letter (tracing, provenance).
    assert any(("origin", b"poison-test") in headers for _, headers in dead)
    assert sorted(letter.value or b"" for letter in letters) == [
        b'{"event_type": "click"}',
        b"{not json",
    ]
    assert all(
        letter.topic == service.events.name and letter.consumer_group == service.app_id
        for letter in letters
    )
    assert any("entity_id" in letter.reason for letter in letters)


async def test_old_values_are_served_as_stale(service: Service) -> None:
    old = [
        InteractionEvent(
            entity_id="fo-" + uuid.uuid4().hex[:6],
            event_type="x",
            event_time=now() - timedelta(days=10),
        )
    ]
    await service.producer.publish_many(service.events, old)
    row = await until_close(service, old[0].entity_id, expect_rounded(old))
    assert row["events_total"] == (1.0, STALE)
    assert row["value_mean"] == (None, MISSING)
    reply = await service.stub.GetOnlineFeatures(
        features_pb2.GetOnlineFeaturesRequest(
            entity_ids=[old[0].entity_id], feature_refs=["entity_activity:events_total"]
        )
    )
    # Feast keeps event timestamps to the second.
    served = reply.entities[0].values[0].event_time.ToDatetime(tzinfo=UTC)
    assert served == old[0].event_time.replace(microsecond=0)


async def test_schema_and_invalid_requests(service: Service) -> None:
    schema = await service.stub.GetFeatureSchema(features_pb2.GetFeatureSchemaRequest())
    assert {(f.ref, f.dtype) for f in schema.features} == {
        ("entity_activity:events_1h", "Int64"),
        ("entity_activity:events_24h", "Int64"),
        ("entity_activity:events_total", "Int64"),
        ("entity_activity:last_event_ts", "Float64"),
        ("entity_numeric:value_mean", "Float64"),
        ("entity_numeric:amount_mean", "Float64"),
        ("entity_numeric:last_event_type", "String"),
        ("entity_numeric:last_category", "String"),
    }
    # The core's default freshness bound is the views' TTL in feature_store/features.py.
    assert {f.stale_after_seconds for f in schema.features} == {DEFAULT_MAX_AGE_SECONDS}
    unknown = await read(service, "nobody-" + uuid.uuid4().hex)
    assert {status for _, status in next(iter(unknown.values())).values()} == {MISSING}

    bad = [
        (["x"], ["entity_activity:nope"], "feature_refs[0]: unknown feature"),
        (["x", ""], [], "entity_ids[1]: must not be empty"),
        ([f"e{i}" for i in range(MAX_ENTITIES + 1)], [], "entity_ids: 21 ids, at most 20"),
    ]
    for ids, refs, message in bad:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await service.stub.GetOnlineFeatures(
                features_pb2.GetOnlineFeaturesRequest(entity_ids=ids, feature_refs=refs)
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(message)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.DeleteEntity(features_pb2.DeleteEntityRequest(entity_id=" "))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("entity_id:")


async def test_delete_entity_erases_and_older_events_never_recreate_it(service: Service) -> None:
    entity = "fd-" + uuid.uuid4().hex[:6]
    events = history(entity, 4, end=now() - timedelta(minutes=2), span_h=1)
    await service.producer.publish_many(service.events, events)
    await until_close(service, entity, expect_rounded(events))

    reply = await service.stub.DeleteEntity(
        features_pb2.DeleteEntityRequest(entity_id=entity, reason="user request"), timeout=10
    )
    assert reply.existed
    gone = (await read(service, entity))[entity]
    assert {status for _, status in gone.values()} == {MISSING}
    erasures = [
        EntityErased.model_validate_json(value or b"")
        for key, value, _ in await read_topic(service.kafka, service.erasures.name, expect=1)
        if key == entity.encode()
    ]
    assert [(e.event_id, e.reason) for e in erasures] == [(reply.erasure_event_id, "user request")]

    # A late event from before the erasure and a redelivered one: neither recreates anything.
    late = InteractionEvent(
        entity_id=entity, event_type="late", event_time=now() - timedelta(minutes=1)
    )
    await service.producer.publish_many(service.events, [late, events[1]])
    await caught_up(service)
    assert {status for _, status in (await read(service, entity))[entity].values()} == {MISSING}

    # Activity after the erasure starts a fresh profile: none of the erased history is back.
    fresh = [InteractionEvent(entity_id=entity, event_type="again", event_time=now())]
    await service.producer.publish_many(service.events, fresh)
    await until_close(service, entity, expect_rounded(fresh))
    again = await service.stub.DeleteEntity(
        features_pb2.DeleteEntityRequest(entity_id="fd-never-" + uuid.uuid4().hex)
    )
    assert not again.existed


async def test_restart_recovers_state_from_the_changelog_without_double_counting(
    service: Service,
) -> None:
    entity = "fr-" + uuid.uuid4().hex[:6]
    before = history(entity, 6, end=now() - timedelta(minutes=30), span_h=2, seed=11)
    await service.producer.publish_many(service.events, before)
    await until_close(service, entity, expect_rounded(before))

    service.worker.kill()  # SIGKILL: no flush, no commit, no goodbye to the group
    service.worker.start()
    after = history(entity, 4, end=now(), span_h=0.4, seed=12)[:4]
    # New events plus redeliveries of old ones (same event ids), as a producer retry would.
    await service.producer.publish_many(service.events, after + before[:3])
    await _wait_serving(service)
    want = expect_rounded(before + after)
    await until_close(service, entity, want)
    await caught_up(service)
    row = (await read(service, entity))[entity]
    assert close(values(row), want)
    assert values(row)["events_total"] == 10.0  # not 4 + 3 (state lost), nor 13 (counted twice)


async def test_invalid_messages_taken_before_a_shutdown_are_dead_lettered(
    kafka_settings: KafkaSettings, feast_repo: Path, tmp_path: Path
) -> None:
    """Issue 20: invalid messages acknowledged while the agents shut down had no letter.

    A stream of valid and invalid messages keeps arriving while the worker is asked to stop
    (SIGTERM). Whatever the worker committed, every invalid message below its committed offset
    has its letter in the DLQ: an offset moves only past a message already stored or
    dead-lettered.
    """
    events, erasures = unique_topic(EVENTS_RAW), unique_topic(ENTITIES_ERASED)
    await declare_topics(kafka_settings, [events, erasures])
    port = free_port()
    app_id = f"features-stop-{uuid.uuid4().hex[:8]}"
    worker = Worker(
        _worker_env(kafka_settings, feast_repo, port, app_id, events, erasures),
        tmp_path / "worker.log",
    )
    worker.start()
    producer = EventProducer(kafka_settings, "features-stop-test")
    await producer.start()
    address = f"127.0.0.1:{port}"
    svc = Service(worker, None, producer, events, erasures, app_id, kafka_settings, address)
    sending = True
    invalid: set[bytes] = set()

    async def send() -> None:
        round_ = 0
        while sending:
            round_ += 1
            valid = [
                InteractionEvent(entity_id=f"fs-{i % 40}", event_type="click") for i in range(100)
            ]
            await producer.publish_many(events, valid)
            for i in range(5):
                value = f'{{"bad": {round_}, "n": {i}}}'.encode()
                invalid.add(value)
                await producer.publish_raw(events.name, value, f"fs-{i}".encode(), [])

    sender: asyncio.Task[None] | None = None
    try:
        await _wait_serving(svc)
        sender = asyncio.create_task(send())
        # Mid-stream: letters are being written when the stop comes.
        await eventually(lambda: _dead_lettered_at_least(kafka_settings, events, 10), timeout=60)
        assert worker.stop() == 0, log_tail(worker.log)
        sending = False
        await sender
    finally:
        if sender is not None and not sender.done():
            sender.cancel()
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.kill()
        await producer.stop()

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_servers)
    await admin.start()
    try:
        committed = {
            tp.partition: meta.offset
            for tp, meta in (await admin.list_consumer_group_offsets(app_id)).items()
            if tp.topic == events.name
        }
    finally:
        await admin.close()
    records = await _read_records(kafka_settings, events.name, kafka_settings.default_partitions)
    lettered = {
        (letter.partition, letter.offset)
        for letter in (
            DeadLetter.model_validate_json(value or b"")
            for _, _, value in await _read_records(kafka_settings, events.dlq, 1)
        )
    }
    taken = [
        (partition, offset)
        for partition, offset, value in records
        if value in invalid and offset < committed.get(partition, 0)
    ]
    assert taken, "the worker committed no invalid message before it stopped"
    assert set(taken) <= lettered, sorted(set(taken) - lettered)[:5]
    # And the stop came mid-stream: messages were left for the next worker.
    assert any(offset >= committed.get(partition, 0) for partition, offset, _ in records)


async def _dead_lettered_at_least(kafka: KafkaSettings, events: Topic, n: int) -> bool:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    await consumer.start()
    try:
        end = await consumer.end_offsets([TopicPartition(events.dlq, 0)])  # one partition
    finally:
        await consumer.stop()
    return sum(end.values()) >= n


async def _read_records(
    kafka: KafkaSettings, topic: str, partitions: int
) -> list[tuple[int, int, bytes | None]]:
    """Every record of ``topic`` now: (partition, offset, value)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[tuple[int, int, bytes | None]] = []
        left = {tp for tp in tps if end[tp] > 0}
        while left:
            for tp, batch in (await consumer.getmany(timeout_ms=500)).items():
                out.extend((tp.partition, r.offset, r.value) for r in batch if r.offset < end[tp])
                if batch and batch[-1].offset + 1 >= end[tp]:
                    left.discard(tp)
    finally:
        await consumer.stop()
    return out
