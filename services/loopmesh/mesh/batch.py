"""Batch-to-sink consumption: a group member that stores events in batches and commits a batch's
offsets only after the sink made it durable.

``bus.EventConsumer`` commits after each handled message, which would acknowledge rows still
in memory when the effect is a file written per batch (the trainer's dataset) or a batch of
state changes (the features fold). ``BatchSink`` buffers valid events of one or more topics,
hands them to ``store`` every ``flush_rows`` events or ``flush_seconds``, and commits their
offsets after ``store`` returned. A failed store keeps the batch (nothing was committed),
pauses fetching (memory stays bounded while the sink is down) and retries. Before partitions
move to another member it stores what it holds, or else forgets those partitions' records
(uncommitted, the next owner reads them again); ``on_assigned`` runs before any record of newly
assigned partitions is fetched (state recovery), ``on_revoked`` after they were released.
Malformed messages are dead-lettered like everywhere else. The store runs in one span that
links to the traces of the events it stores; with ``continue_single_trace`` a batch whose
events all come from one producer span (one Ingest call) continues that trace instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, set_span_in_context
from pydantic import ValidationError

from loopmesh.mesh.bus import (
    EventProducer,
    dead_letter,
    describe_validation_error,
    group_options,
    record_lag_of,
)
from loopmesh.mesh.events import Event
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.telemetry import extract_context, tracer
from loopmesh.mesh.topics import Topic

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Event)
MAX_LINKS = 64
"""Traces of the newest buffered events kept for the store span's links."""


class Taken(NamedTuple, Generic[E]):
    """One buffered event with where it came from and its producer's trace."""

    partition: int
    event: E
    trace: SpanContext | None
    topic: str = ""
    offset: int = -1
    timestamp_ms: int = -1
    """The record's Kafka timestamp (the broker's append time on topics that ask for it)."""


Store = Callable[[Sequence[Taken[E]]], Awaitable[None]]
"""Make a batch durable (or raise: nothing is committed and the batch is kept)."""
Rebalanced = Callable[[set[TopicPartition]], Awaitable[None]]
Stored = Callable[[int, Sequence[SpanContext]], None]
"""Called after a batch was stored and committed, inside the store span's context."""


class BatchSink(Generic[E]):
    """Consumes ``topics`` in a group, storing accepted events in batches before committing."""

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Topic | Sequence[Topic],
        group_id: str,
        store: Store[E],
        *,
        dlq: EventProducer,
        service: str,
        flush_rows: int,
        flush_seconds: float,
        accept: Callable[[E], bool] = lambda _: True,
        on_stored: Stored = lambda n, traces: None,
        on_assigned: Rebalanced | None = None,
        on_revoked: Rebalanced | None = None,
        retry_backoff: float = 1.0,
        span_name: str | None = None,
        continue_single_trace: bool = False,
        **overrides: Any,
    ) -> None:
        self.topics = [topics] if isinstance(topics, Topic) else list(topics)
        self.topic = self.topics[0]
        self._value_types = {t.name: t.value_type for t in self.topics}
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self._retry_backoff = retry_backoff
        self._span_name = span_name or f"{self.topic.name} store"
        self._continue_single_trace = continue_single_trace
        self.group_id = group_id
        self._consumer = AIOKafkaConsumer(
            **{**group_options(settings, service, group_id), **overrides}
        )
        self._store = store
        self._accept = accept
        self._on_stored = on_stored
        self._dlq = dlq
        self._flush_rows = flush_rows
        self._flush_seconds = flush_seconds
        self._buffer: list[tuple[TopicPartition, Taken[E]]] = []
        self._offsets: dict[TopicPartition, int] = {}
        self._traces: deque[SpanContext] = deque(maxlen=MAX_LINKS)
        self._first_at: float | None = None
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._tracer = tracer(f"loopmesh.{service}.bus")
        self.stored = 0
        self.skipped = 0
        """Valid events ``accept`` turned down (another member's business): committed."""
        self.dead_lettered = 0

    @property
    def buffered(self) -> int:
        """Events taken and not yet stored."""
        return len(self._buffer)

    async def start(self) -> None:
        self._consumer.subscribe([t.name for t in self.topics], listener=_StoreOnRevoke(self))
        await self._consumer.start()

    async def stop(self) -> None:
        self._stopping.set()
        try:
            await self.flush()
        except Exception:
            log.exception("storing on stop failed; the records stay uncommitted")
        await self._consumer.stop()

    async def run(self) -> None:
        """Consume until ``stop``."""
        poll_ms = int(min(500.0, self._flush_seconds * 1000))
        while not self._stopping.is_set():
            batches = await self._consumer.getmany(timeout_ms=poll_ms, max_records=self._flush_rows)
            for tp, records in batches.items():
                for record in records:
                    await self._take(tp, record)
            await record_lag_of(self._consumer, self.group_id)
            due = self._first_at is not None and (
                len(self._buffer) >= self._flush_rows
                or time.monotonic() - self._first_at >= self._flush_seconds
            )
            if due:
                await self._flush_or_pause()

    async def _flush_or_pause(self) -> None:
        try:
            await self.flush()
        except Exception:
            # Nothing was committed; the buffer is kept and retried. Fetching pauses until a
            # store succeeds, so a sink that is down does not grow the buffer without bound.
            log.exception("storing %d events failed; retrying", len(self._buffer))
            self._consumer.pause(*self._consumer.assignment())
            await asyncio.sleep(self._retry_backoff)
        else:
            paused = self._consumer.paused()
            if paused:
                self._consumer.resume(*paused)

    async def _take(self, tp: TopicPartition, record: Any) -> None:
        try:
            event = self._value_types[tp.topic].model_validate_json(record.value or b"")
        except ValidationError as err:
            reason = describe_validation_error(err)
            await dead_letter(self._dlq, record, group=self.group_id, reason=reason)
            self.dead_lettered += 1
        else:
            if self._accept(event):  # type: ignore[arg-type]
                context = trace.get_current_span(extract_context(record.headers))
                traced = context.get_span_context() if context.get_span_context().is_valid else None
                taken = Taken(
                    tp.partition, event, traced, tp.topic, record.offset, record.timestamp
                )
                self._buffer.append((tp, taken))  # type: ignore[arg-type]
                if traced is not None:
                    self._traces.append(traced)
            else:
                self.skipped += 1
        self._offsets[tp] = record.offset + 1
        if self._first_at is None:
            self._first_at = time.monotonic()

    async def flush(self) -> int:
        """Store the buffered events, then commit their offsets; how many were stored."""
        async with self._lock:
            # Copies: records taken while the batch is stored stay for the next flush, and
            # on failure nothing is dropped (the offsets were not committed either).
            buffer, offsets = list(self._buffer), dict(self._offsets)
            traces = list(self._traces)
            if not offsets:
                return 0
            parent = _single_parent(buffer) if self._continue_single_trace else None
            with self._tracer.start_as_current_span(
                self._span_name,
                kind=SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.destination.name": self.topic.name,
                    "messaging.batch.message_count": len(buffer),
                },
                # One cause (one Ingest call, say) continues its trace; several are links.
                context=parent,
                links=[] if parent is not None else [Link(t) for t in traces],
            ) as stored:
                if buffer:
                    await self._store([taken for _, taken in buffer])
                await self._consumer.commit(offsets)
            del self._buffer[: len(buffer)]
            self._traces.clear()
            for tp, offset in offsets.items():
                if self._offsets.get(tp) == offset:
                    del self._offsets[tp]
            self._first_at = time.monotonic() if self._offsets else None
            self.stored += len(buffer)
        if buffer:
            with trace.use_span(stored, end_on_exit=False):
                self._on_stored(len(buffer), traces)
        return len(buffer)

    async def release(self, revoked: set[TopicPartition]) -> None:
        """Before partitions move away: store and commit, or else forget their records."""
        try:
            await self.flush()
        except Exception:
            # Their offsets stay uncommitted, so the next owner reads them again.
            log.exception("storing before rebalance failed; leaving %s to the next owner", revoked)
            async with self._lock:
                self._buffer = [(tp, e) for tp, e in self._buffer if tp not in revoked]
                for tp in revoked:
                    self._offsets.pop(tp, None)


def _single_parent(buffer: Sequence[tuple[TopicPartition, Taken[Any]]]) -> Context | None:
    """The producer's context when every buffered event carries the same one, else None."""
    first: SpanContext | None = None
    for _, taken in buffer:
        if taken.trace is None or (first is not None and taken.trace != first):
            return None
        first = taken.trace
    return set_span_in_context(NonRecordingSpan(first)) if first is not None else None


class _StoreOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Store and commit what is buffered before partitions move to another member."""

    def __init__(self, sink: BatchSink[Any]) -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._sink.release(set(revoked))
        if self._sink._on_revoked is not None:
            await self._sink._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        # aiokafka sets the assignment before it awaits this, and its fetcher may hand the
        # new partitions' records to ``getmany`` meanwhile: they are buffered, and the store
        # lock held here keeps them from ``store`` until the state this recovers is in place
        # (a backfill that took seconds lost its work to a concurrent batch before).
        if self._sink._on_assigned is not None:
            async with self._sink._lock:
                await self._sink._on_assigned(set(assigned))
