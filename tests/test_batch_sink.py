"""``mesh.batch.BatchSink`` against a real broker: a sink that keeps failing pauses fetching, so
the buffer stays bounded, and nothing is lost or committed until a store succeeds."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from loopmesh.mesh.batch import BatchSink, Taken
from loopmesh.mesh.bus import EventProducer, declare_topics
from loopmesh.mesh.events import InteractionEvent
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import EVENTS_RAW
from tests.helpers import eventually, unique_topic


async def test_a_failing_store_pauses_fetching_and_loses_nothing(
    kafka_settings: KafkaSettings, producer: EventProducer
) -> None:
    topic = unique_topic(EVENTS_RAW)
    await declare_topics(kafka_settings, [topic])
    sent = [InteractionEvent(entity_id=f"e{i % 50}", event_type="view") for i in range(3000)]
    await producer.publish_many(topic, sent)
    failing = True
    attempts = 0
    stored: list[str] = []
    most_buffered = 0

    async def store(batch: Sequence[Taken[InteractionEvent]]) -> None:
        nonlocal attempts, most_buffered
        attempts += 1
        most_buffered = max(most_buffered, len(batch))
        if failing:
            raise OSError("disk full")
        stored.extend(t.event.event_id for t in batch)

    sink: BatchSink[InteractionEvent] = BatchSink(
        kafka_settings,
        topic,
        f"sink-{uuid.uuid4().hex[:8]}",
        store,
        dlq=producer,
        service="test",
        flush_rows=100,
        flush_seconds=0.05,
        retry_backoff=0.05,
    )
    await sink.start()
    running = asyncio.create_task(sink.run())
    try:
        await eventually(lambda: _true(attempts >= 20), timeout=60)
        # Each retry carries the same batch: fetching is paused, the buffer does not grow
        # with the 2,900 events still waiting (before the fix it held all 3,000).
        assert most_buffered <= 2 * 100, most_buffered
        assert sink.buffered <= 2 * 100
        failing = False
        await eventually(lambda: _true(len(stored) >= len(sent)), timeout=60)
    finally:
        await sink.stop()
        await running
    assert sorted(stored) == sorted(e.event_id for e in sent)


async def _true(value: bool) -> bool:
    return value
