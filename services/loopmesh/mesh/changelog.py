"""Keyed state of the partitions a group member owns, backed by a compacted changelog topic.

A stateful consumer (the features fold) keeps one value per key in memory and writes every
change to ``<app>-<table>-changelog``, partition for partition with its source topic: a key's
state lives in the changelog partition of the source partition its events arrive on, so the
member that owns a source partition owns that state. When partitions are assigned, ``recover``
reads their changelog partitions from the beginning to the end offsets seen at that moment
(compaction keeps the newest value per key; ``None`` is a tombstone), before any of their
events is processed. When they are revoked, ``forget`` drops them.

Writes are staged with ``put`` and made durable by ``flush`` (acks from every in-sync replica)
before the consumer commits the source offsets that caused them: a crash between the two
redelivers events whose effect is already in the changelog, which the handlers absorb by
event id. This is what faust's tables promised; faust-streaming 0.15 lost or stalled events
after a worker restart in our tests (docs/architecture.md, section 7), so the kernel owns it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from loopmesh.mesh.bus import EventProducer, client_options, declare_topics
from loopmesh.mesh.events import Event
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import Topic

log = logging.getLogger(__name__)


def changelog_topic(app_id: str, table: str, *, max_value_bytes: int) -> Topic:
    """The compacted topic of one table (its records may hold ``max_value_bytes`` of state)."""
    return Topic(
        f"{app_id}-{table}-changelog",
        Event,  # values are the table's own bytes, not events
        "key",
        compacted=True,
        max_message_bytes=max_value_bytes + 64 * 1024,  # key, headers, batch overhead
    )


class ChangelogTable:
    """``key -> bytes`` for the owned partitions, recovered from and written to a changelog."""

    def __init__(
        self, settings: KafkaSettings, topic: Topic, producer: EventProducer, *, service: str
    ) -> None:
        """``producer`` is the process' own (acks from every in-sync replica, idempotent, and
        records up to 8 MiB: a state record fits)."""
        self.topic = topic
        self._settings = settings
        self._service = service
        self._producer = producer
        self._data: dict[int, dict[str, bytes]] = {}
        self._pending: list[asyncio.Future[None]] = []

    async def declare(self, partitions: int) -> None:
        """Create the topic with ``partitions``, as many as the source topic has, taking
        records of the table's size; an existing topic that takes less is raised to it (a
        state that grew with its definitions would otherwise fail every write)."""
        sized = self._settings.model_copy(update={"default_partitions": partitions})
        await declare_topics(sized, [self.topic], with_dlq=False)
        wanted = self.topic.max_message_bytes
        if wanted is None:
            return
        admin = AIOKafkaAdminClient(**client_options(self._settings, f"{self._service}-admin"))
        await admin.start()
        try:
            resource = ConfigResource(ConfigResourceType.TOPIC, self.topic.name)
            (described,) = await admin.describe_configs([resource])
            entries = {e[0]: e[1] for e in described.resources[0][4]}
            current = int(entries.get("max.message.bytes") or 0)
            if current < wanted:
                # AlterConfigs replaces the topic's whole config: give all of it.
                config = ConfigResource(
                    ConfigResourceType.TOPIC, self.topic.name, configs=self.topic.config()
                )
                (altered,) = await admin.alter_configs([config])
                code = altered.resources[0][0]
                if code != 0:
                    raise RuntimeError(
                        f"raising max.message.bytes of {self.topic.name} failed: error {code}"
                    )
                log.info(
                    "raised max.message.bytes of %s from %d to %d", self.topic.name, current, wanted
                )
        finally:
            await admin.close()

    # -- reads -------------------------------------------------------------------------------

    def get(self, partition: int, key: str) -> bytes | None:
        return self._data.get(partition, {}).get(key)

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every key and value held (all owned partitions)."""
        for values in list(self._data.values()):
            yield from list(values.items())

    def partition_items(self, partition: int) -> list[tuple[str, bytes]]:
        """The keys and values of one partition."""
        return list(self._data.get(partition, {}).items())

    @property
    def partitions(self) -> set[int]:
        return set(self._data)

    def __len__(self) -> int:
        return sum(len(values) for values in self._data.values())

    # -- writes ------------------------------------------------------------------------------

    def put(self, partition: int, key: str, value: bytes | None) -> None:
        """Set (or, with ``None``, delete) ``key`` now; durable after the next ``flush``."""
        values = self._data.setdefault(partition, {})
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
        self._pending.append(self._send(partition, key, value))

    def _send(self, partition: int, key: str, value: bytes | None) -> asyncio.Future[None]:
        return asyncio.ensure_future(
            self._producer.publish_raw(
                self.topic.name, value, key.encode(), [], partition=partition
            )
        )

    async def flush(self) -> None:
        """Wait until every staged write is acknowledged; raises if one failed (the caller then
        must not commit the offsets behind it)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        results = await asyncio.gather(*pending, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]

    # -- ownership ---------------------------------------------------------------------------

    async def recover(self, partitions: Iterable[int]) -> int:
        """Load the newest value of every key of ``partitions``; returns how many keys."""
        wanted = sorted(set(partitions) - set(self._data))
        if not wanted:
            return 0
        tps = [TopicPartition(self.topic.name, p) for p in wanted]
        reader = AIOKafkaConsumer(
            **client_options(self._settings, f"{self._service}-recovery"),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_partition_fetch_bytes=max(self.topic.max_message_bytes or 0, 1024 * 1024),
        )
        await reader.start()
        loaded: dict[int, dict[str, bytes]] = {p: {} for p in wanted}
        try:
            reader.assign(tps)
            ends = await reader.end_offsets(tps)
            # An explicit seek: seek_to_beginning() raced with the reset to the default
            # position, and position() then reported the end (no key recovered; found by
            # tests/test_changelog.py).
            for tp, start in (await reader.beginning_offsets(tps)).items():
                reader.seek(tp, start)
            remaining = {tp for tp in tps if ends[tp] > 0}
            # A partition is done when the position reaches the end seen at the start, also
            # when compaction left gaps (the position jumps past them).
            while remaining:
                batches = await reader.getmany(*remaining, timeout_ms=500)
                for tp, records in batches.items():
                    values = loaded[tp.partition]
                    for record in records:
                        if record.key is None:
                            continue
                        key = record.key.decode()
                        if record.value is None:
                            values.pop(key, None)
                        else:
                            values[key] = record.value
                for tp in list(remaining):
                    if await reader.position(tp) >= ends[tp]:
                        remaining.discard(tp)
        finally:
            await reader.stop()
        self._data.update(loaded)
        count = sum(len(v) for v in loaded.values())
        log.info("recovered %d keys of %s partitions %s", count, self.topic.name, wanted)
        return count

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop the state of partitions this member no longer owns."""
        for partition in partitions:
            self._data.pop(partition, None)
