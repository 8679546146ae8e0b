"""``mesh.changelog.ChangelogTable`` against a real broker: what one member wrote, the next one
recovers, partition by partition, tombstones and large values included."""

from __future__ import annotations

import uuid

import pytest

from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.changelog import ChangelogTable, changelog_topic
from loopmesh.mesh.settings import KafkaSettings


def _table(kafka: KafkaSettings, app_id: str, producer: EventProducer) -> ChangelogTable:
    topic = changelog_topic(app_id, "state", max_value_bytes=2 << 20)
    return ChangelogTable(kafka, topic, producer, service="test")


async def test_a_new_owner_recovers_exactly_what_was_flushed(
    kafka_settings: KafkaSettings, producer: EventProducer
) -> None:
    app_id = f"cl-{uuid.uuid4().hex[:8]}"
    first = _table(kafka_settings, app_id, producer)
    await first.declare(partitions=3)
    await first.recover({0, 1, 2})
    assert len(first) == 0
    written: dict[int, dict[str, bytes]] = {0: {}, 1: {}, 2: {}}
    for i in range(300):
        partition, key = i % 3, f"k{i % 120}"
        value = f"v{i}".encode()
        first.put(partition, key, value)
        written[partition][key] = value
    first.put(1, "k1", None)  # a tombstone deletes
    del written[1]["k1"]
    big = b"x" * (1 << 20)  # over the broker's default record limit
    first.put(2, "big", big)
    written[2]["big"] = big
    await first.flush()

    second = _table(kafka_settings, app_id, producer)
    await second.declare(partitions=3)
    assert await second.recover({0, 2}) == len(written[0]) + len(written[2])
    assert dict(second.partition_items(0)) == written[0]
    assert dict(second.partition_items(2)) == written[2]
    assert second.get(1, "k4") is None  # partition 1 is not ours
    await second.recover({1})
    assert dict(second.partition_items(1)) == written[1]
    second.forget({0})
    assert second.partitions == {1, 2} and second.get(0, "k0") is None


async def test_flush_raises_when_a_write_fails(
    kafka_settings: KafkaSettings, producer: EventProducer
) -> None:
    table = _table(kafka_settings, f"cl-{uuid.uuid4().hex[:8]}", producer)
    await table.declare(partitions=1)
    table.put(5, "k", b"v")  # no such partition
    with pytest.raises(Exception):  # noqa: B017 (aiokafka's error type is its own)
        await table.flush()


async def test_a_table_whose_state_grew_raises_its_topics_record_limit(
    kafka_settings: KafkaSettings, producer: EventProducer
) -> None:
    app_id = f"cl-{uuid.uuid4().hex[:8]}"
    small = changelog_topic(app_id, "state", max_value_bytes=100_000)
    await ChangelogTable(kafka_settings, small, producer, service="test").declare(partitions=1)
    # The views grew (more slides, more dedup ids): the same topic must take 1.5 MiB now.
    grown = changelog_topic(app_id, "state", max_value_bytes=3 << 19)
    table = ChangelogTable(kafka_settings, grown, producer, service="test")
    await table.declare(partitions=1)
    table.put(0, "hot", b"x" * (3 << 19))
    await table.flush()  # refused as too large by a topic left at its old limit
    reader = ChangelogTable(kafka_settings, grown, producer, service="test")
    await reader.recover({0})
    assert reader.get(0, "hot") == b"x" * (3 << 19)
