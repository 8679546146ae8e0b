"""The typed Kafka layer against a real broker: produce, consume, commit, resume, dead-letter."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from loopmesh.mesh.bus import Delivery, EventConsumer, EventProducer, declare_topics
from loopmesh.mesh.errors import Unavailable
from loopmesh.mesh.events import DeadLetter, InteractionEvent
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import EVENTS_RAW, Topic
from tests.helpers import eventually, read_topic, unique_topic


@pytest.fixture
async def topic(kafka_settings: KafkaSettings) -> Topic:
    t = unique_topic(EVENTS_RAW)
    await declare_topics(kafka_settings, [t])
    return t


class Collector:
    def __init__(self) -> None:
        self.events: list[InteractionEvent] = []
        self.deliveries: list[Delivery] = []

    async def __call__(self, event: InteractionEvent, delivery: Delivery) -> None:
        self.events.append(event)
        self.deliveries.append(delivery)


@contextlib.asynccontextmanager
async def running(consumer: EventConsumer[InteractionEvent]) -> AsyncIterator[None]:
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        yield
    finally:
        await consumer.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def event(i: int) -> InteractionEvent:
    return InteractionEvent(entity_id=f"user-{i}", event_type="click", numeric={"value": float(i)})


async def committed(settings: KafkaSettings, topic: Topic, group: str) -> int:
    """Sum of the group's committed offsets over the topic's partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic.name)


async def test_event_is_consumed_by_a_group_and_committed(
    kafka_settings: KafkaSettings, producer: EventProducer, topic: Topic
) -> None:
    sent = [event(i) for i in range(5)]
    await producer.publish_many(topic, sent)
    got = Collector()
    group = f"g-{uuid.uuid4().hex[:6]}"
    consumer = EventConsumer(kafka_settings, topic, group, got, dlq=producer, service="test")
    async with running(consumer):
        await eventually(lambda: _ready(len(got.events) == 5))
    assert sorted(e.event_id for e in got.events) == sorted(e.event_id for e in sent)
    assert {d.key for d in got.deliveries} == {e.entity_id.encode() for e in sent}
    # The schema and id travel as headers too, so tools can route without parsing JSON.
    assert all(dict(d.headers)["schema"] == b"interaction.v1" for d in got.deliveries)
    assert await committed(kafka_settings, topic, group) == 5


async def test_restarted_consumer_resumes_after_committed_offset(
    kafka_settings: KafkaSettings, producer: EventProducer, topic: Topic
) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    first_batch = [event(i) for i in range(3)]
    await producer.publish_many(topic, first_batch)
    first = Collector()
    async with running(
        EventConsumer(kafka_settings, topic, group, first, dlq=producer, service="t")
    ):
        await eventually(lambda: _ready(len(first.events) == 3))

    second_batch = [event(i) for i in range(3, 7)]
    await producer.publish_many(topic, second_batch)
    second = Collector()
    async with running(
        EventConsumer(kafka_settings, topic, group, second, dlq=producer, service="t")
    ):
        await eventually(lambda: _ready(len(second.events) >= 4))
    assert sorted(e.event_id for e in second.events) == sorted(e.event_id for e in second_batch)
    assert not {e.event_id for e in second.events} & {e.event_id for e in first_batch}


async def test_failed_handler_is_retried_not_skipped(
    kafka_settings: KafkaSettings, producer: EventProducer, topic: Topic
) -> None:
    await producer.publish(topic, event(1))
    attempts: list[str] = []

    async def flaky(ev: InteractionEvent, _: Delivery) -> None:
        attempts.append(ev.event_id)
        if len(attempts) < 3:
            raise RuntimeError("a bug that goes away")
        if len(attempts) < 8:
            raise Unavailable("the store is down")  # an outage: not counted against the message

    group = f"g-{uuid.uuid4().hex[:6]}"
    consumer = EventConsumer(
        kafka_settings,
        topic,
        group,
        flaky,
        dlq=producer,
        service="t",
        retry_backoff=0.05,
        max_attempts=3,
    )
    async with running(consumer):
        await eventually(lambda: _ready(consumer.handled == 1))
    assert len(attempts) == 8 and len(set(attempts)) == 1 and consumer.dead_lettered == 0
    assert await committed(kafka_settings, topic, group) == 1


async def test_a_message_that_keeps_failing_is_dead_lettered_after_bounded_retries(
    kafka_settings: KafkaSettings, producer: EventProducer, topic: Topic
) -> None:
    poison, fine = event(7), event(8)
    await producer.publish_many(topic, [poison, fine], keys=["same", "same"])  # one partition
    attempts: list[str] = []

    async def handler(ev: InteractionEvent, _: Delivery) -> None:
        attempts.append(ev.event_id)
        if ev.event_id == poison.event_id:
            # An OSError, but no outage: it must count against the message.
            raise FileNotFoundError("cannot store this one")

    group = f"g-{uuid.uuid4().hex[:6]}"
    consumer = EventConsumer(
        kafka_settings,
        topic,
        group,
        handler,
        dlq=producer,
        service="t",
        retry_backoff=0.05,
        max_attempts=3,
    )
    async with running(consumer):
        await eventually(lambda: _ready(consumer.handled == 1 and consumer.dead_lettered == 1))
    assert attempts == [poison.event_id] * 3 + [fine.event_id]
    ((_, value, _),) = await read_topic(kafka_settings, topic.dlq, expect=1)
    letter = DeadLetter.model_validate_json(value or b"")
    assert letter.reason == "handler failed 3 times, last: FileNotFoundError: cannot store this one"
    assert (letter.topic, letter.consumer_group) == (topic.name, group)
    assert InteractionEvent.model_validate_json(letter.value or b"").event_id == poison.event_id
    assert await committed(kafka_settings, topic, group) == 2


async def test_malformed_message_goes_to_dead_letter_topic(
    kafka_settings: KafkaSettings, producer: EventProducer, topic: Topic
) -> None:
    raw = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers)
    await raw.start()
    try:
        bad = await raw.send_and_wait(topic.name, b"\xff not json", key=b"k1", partition=0)
        wrong = await raw.send_and_wait(
            topic.name,
            b'{"entity_id": "u", "event_type": "x", "schema": "interaction.v9"}',
            key=b"k2",
            partition=0,
        )
    finally:
        await raw.stop()
    await producer.publish(topic, event(42))

    got = Collector()
    group = f"g-{uuid.uuid4().hex[:6]}"
    consumer = EventConsumer(kafka_settings, topic, group, got, dlq=producer, service="t")
    async with running(consumer):
        await eventually(lambda: _ready(len(got.events) == 1 and consumer.dead_lettered == 2))

    letters = [
        DeadLetter.model_validate_json(value or b"")
        for _, value, _ in await read_topic(kafka_settings, topic.dlq, expect=2)
    ]
    by_offset = {d.offset: d for d in letters}
    assert by_offset[bad.offset].value == b"\xff not json"
    assert "Invalid JSON" in by_offset[bad.offset].reason
    assert by_offset[bad.offset].key == b"k1"
    assert "interaction.v9" in by_offset[wrong.offset].reason
    assert all(d.topic == topic.name and d.consumer_group == group for d in letters)
    assert got.events[0].entity_id == "user-42"


async def _ready(value: bool) -> bool:
    return value
