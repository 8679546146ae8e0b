"""Reading a topic without a consumer group: state that every start rebuilds.

``rollouts`` (the routing and rollout tables), ``rollout.policies`` and ``metrics.live`` are
state, read again from the beginning (or from a point in time) on every start; committed
offsets would only lose them. ``TopicFollower`` is the one way to do that: every partition
assigned, positioned at the beginning or at ``since``, valid events handed to the handler in a
span that continues the producer's trace, ``caught_up`` set once everything that existed at
start was handled, tombstones of compacted topics skipped, malformed messages dead-lettered
under an id fixed by their offset (a restart re-reads them; DLQ readers drop the copies by
event id), lag recorded like a group's.
``read_to_end`` is the one-shot form. Group members use ``bus.EventConsumer`` instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from loopmesh.mesh.bus import (
    Delivery,
    EventProducer,
    client_options,
    consume_span,
    dead_letter,
    describe_validation_error,
    record_lag_of,
)
from loopmesh.mesh.errors import SetupError
from loopmesh.mesh.events import Event
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.telemetry import tracer
from loopmesh.mesh.topics import Topic

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Event)
Handler = Callable[[E, Delivery], Awaitable[None]]
_METADATA_WAIT_S = 30.0


class TopicFollower(Generic[E]):
    """Follows every partition of ``topic`` from the beginning, or from ``since``."""

    def __init__(
        self,
        settings: KafkaSettings,
        topic: Topic,
        handler: Handler[E],
        *,
        service: str,
        dlq: EventProducer | None = None,
        since: datetime | None = None,
        max_batch: int = 1000,
    ) -> None:
        self.topic = topic
        self.reader = f"{service}-{topic.name}-follower"
        """Names this reader in dead letters and lag series (it has no consumer group)."""
        self.caught_up = asyncio.Event()
        """Set once the events that existed at ``start`` (from ``since`` on) were handled."""
        self.handled = 0
        self.dead_lettered = 0
        self._settings = settings
        self._handler = handler
        self._service = service
        self._dlq = dlq
        self._since = since
        self._max_batch = max_batch
        self._consumer: AIOKafkaConsumer | None = None
        self._ends: dict[TopicPartition, int] = {}
        self._task: asyncio.Task[None] | None = None
        self.crashed = asyncio.Event()
        """Set when the reading task of ``follow`` died (its state would go stale)."""
        self._tracer = tracer(f"loopmesh.{service}.bus")

    async def start(self) -> None:
        """Assign every partition and position it; reading starts with ``run`` or ``follow``."""
        consumer = AIOKafkaConsumer(
            self.topic.name,
            **client_options(self._settings, self._service),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            metadata_max_age_ms=1000,
        )
        await consumer.start()
        try:
            await self._position(consumer)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer

    async def _position(self, consumer: AIOKafkaConsumer) -> None:
        # Without a group, aiokafka assigns every partition once metadata arrives (a topic
        # declared a moment ago may take a little while to show up).
        deadline = time.monotonic() + _METADATA_WAIT_S
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise SetupError(f"topic {self.topic.name!r} has no partitions (does it exist?)")
            await asyncio.sleep(0.05)
        partitions = list(consumer.assignment())
        self._ends = await consumer.end_offsets(partitions)
        if self._since is None:
            await consumer.seek_to_beginning(*partitions)
            return
        since_ms = int(self._since.timestamp() * 1000)
        found = await consumer.offsets_for_times({tp: since_ms for tp in partitions})
        for tp in partitions:
            at = found.get(tp)
            consumer.seek(tp, at.offset if at is not None else self._ends[tp])

    async def run(self) -> None:
        """Read until ``stop``."""
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("TopicFollower.start() first")
        while True:
            if not self.caught_up.is_set() and await self._at_ends(consumer):
                self.caught_up.set()
            wait_ms = 500 if self.caught_up.is_set() else 50
            batches = await consumer.getmany(timeout_ms=wait_ms, max_records=self._max_batch)
            for records in batches.values():
                for record in records:
                    await self._handle(record)
            await record_lag_of(consumer, self.reader)

    async def follow(self, catchup_timeout: float) -> None:
        """``start``, ``run`` in a task, and return once caught up (or raise SetupError)."""
        await self.start()
        self._task = asyncio.create_task(self.run(), name=self.reader)
        self._task.add_done_callback(self._done)
        try:
            await self.wait_caught_up(catchup_timeout)
        except BaseException:
            await self.stop()
            raise

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s died", self.reader, exc_info=task.exception())
            self.crashed.set()

    async def wait_caught_up(self, timeout: float) -> None:
        done = asyncio.ensure_future(self.caught_up.wait())
        waited = [done] if self._task is None else [done, self._task]
        finished, _ = await asyncio.wait(waited, timeout=timeout, return_when="FIRST_COMPLETED")
        if done not in finished:
            done.cancel()
            if self._task is not None and self._task in finished:
                self._task.result()  # the reader died: raise its error
            raise SetupError(f"{self.topic.name}: not caught up within {timeout:.0f}s")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # asyncio.wait neither raises the reader's error nor swallows a cancellation of
            # the caller (suppressing CancelledError around `await task` would do both).
            await asyncio.wait({task})
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def _at_ends(self, consumer: AIOKafkaConsumer) -> bool:
        for tp, end in self._ends.items():
            if await consumer.position(tp) < end:
                return False
        return True

    async def _handle(self, record: Any) -> None:
        if record.value is None and self.topic.compacted:
            return  # a tombstone: compaction at work, not an event (elsewhere: malformed)
        headers = tuple(record.headers or ())
        try:
            event = self.topic.value_type.model_validate_json(record.value)
        except ValidationError as err:
            await self._dead_letter(record, describe_validation_error(err))
            return
        delivery = Delivery(record.topic, record.partition, record.offset, record.key, headers)
        with consume_span(self._tracer, record, event.event_id, self.reader):
            await self._handler(event, delivery)  # type: ignore[arg-type]
        self.handled += 1

    async def _dead_letter(self, record: Any, reason: str) -> None:
        self.dead_lettered += 1
        log.error("invalid %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        if self._dlq is None:
            return
        where = f"kafka:{record.topic}/{record.partition}/{record.offset}"
        await dead_letter(
            self._dlq,
            record,
            group=self.reader,
            reason=reason,
            event_id=uuid.uuid5(uuid.NAMESPACE_URL, where).hex,
        )


async def read_to_end(
    settings: KafkaSettings,
    topic: Topic,
    *,
    service: str,
    timeout: float,
    dlq: EventProducer | None = None,
) -> list[Any]:
    """Every valid event of ``topic``, from the beginning to the end offsets seen at the call."""
    events: list[Any] = []

    async def keep(event: Event, _: Delivery) -> None:
        events.append(event)

    follower: TopicFollower[Event] = TopicFollower(settings, topic, keep, service=service, dlq=dlq)
    await follower.follow(timeout)
    await follower.stop()
    return events
