"""Group-less readers (mesh/follow.py) against a real broker: replay, follow from a time, DLQ."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer

from loopmesh.mesh.bus import Delivery, EventProducer, declare_topics
from loopmesh.mesh.events import DeadLetter, RolloutChanged, VersionMetrics
from loopmesh.mesh.follow import TopicFollower, read_to_end
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import METRICS_LIVE, ROLLOUTS, Topic
from tests.helpers import eventually, read_topic, unique_topic


@pytest.fixture
async def topic(kafka_settings: KafkaSettings) -> Topic:
    t = unique_topic(METRICS_LIVE)
    await declare_topics(kafka_settings, [t])
    return t


def metrics(version: int) -> VersionMetrics:
    return VersionMetrics(model_name="m", model_version=version, count=version, window_seconds=60)


async def raw_send(settings: KafkaSettings, topic: str, value: bytes | None) -> None:
    raw = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await raw.start()
    try:
        await raw.send_and_wait(topic, value, key=b"m")
    finally:
        await raw.stop()


async def test_read_to_end_keeps_valid_events_and_dead_letters_the_rest_once_per_offset(
    kafka_settings: KafkaSettings, producer: EventProducer, topic: Topic
) -> None:
    await producer.publish_many(topic, [metrics(1), metrics(2)])
    await raw_send(kafka_settings, topic.name, b"{not json")
    await raw_send(kafka_settings, topic.name, None)  # not compacted: malformed, dead-lettered
    await producer.publish(topic, metrics(3))

    for _ in range(2):  # every start re-reads the bad message
        events = await read_to_end(kafka_settings, topic, service="t", timeout=30, dlq=producer)
        assert sorted(e.model_version for e in events) == [1, 2, 3]
    letters = [
        DeadLetter.model_validate_json(value or b"")
        for _, value, _ in await read_topic(kafka_settings, topic.dlq, expect=4)
    ]
    # The same ids on both reads, so DLQ readers can drop the copies.
    assert len(letters) == 4 and len({letter.event_id for letter in letters}) == 2
    assert {letter.value for letter in letters} == {b"{not json", None}
    assert all(letter.consumer_group.startswith("t-") for letter in letters)


async def test_a_tombstone_of_a_compacted_topic_is_skipped(
    kafka_settings: KafkaSettings, producer: EventProducer
) -> None:
    topic = unique_topic(ROLLOUTS)
    await declare_topics(kafka_settings, [topic])
    await producer.publish(topic, RolloutChanged(model_name="m", stable_version=1, state="stable"))
    await raw_send(kafka_settings, topic.name, None)
    follower_events = await read_to_end(kafka_settings, topic, service="t", timeout=30)
    assert [e.stable_version for e in follower_events] == [1]


async def test_a_follower_starts_at_its_time_catches_up_and_keeps_following(
    kafka_settings: KafkaSettings, producer: EventProducer, topic: Topic
) -> None:
    await producer.publish(topic, metrics(1))  # acknowledged: before `since`
    since = datetime.now(UTC)
    await producer.publish_many(topic, [metrics(2), metrics(3)])
    seen: list[tuple[int, Delivery]] = []

    async def handler(event: VersionMetrics, delivery: Delivery) -> None:
        seen.append((event.model_version, delivery))

    follower = TopicFollower(kafka_settings, topic, handler, service="t", since=since)
    await follower.follow(catchup_timeout=30)
    try:
        assert sorted(v for v, _ in seen) == [2, 3]  # caught up: what existed since `since`
        await producer.publish(topic, metrics(4))
        await eventually(lambda: _ready(any(v == 4 for v, _ in seen)))
        assert all(d.topic == topic.name for _, d in seen)
    finally:
        await follower.stop()
    assert follower.handled == 3 and follower.dead_lettered == 0


async def _ready(value: bool) -> bool:
    await asyncio.sleep(0)
    return value
