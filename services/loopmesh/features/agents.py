"""The features fold: ``events.raw`` and ``entities.erased`` into per-entity state, pushed to
the online store.

One table, ``entity_state`` (entity id -> ``EntityState`` JSON), holds everything the features
need, windows included: each entity's window is the list of its events within the horizon,
ending at its own newest event (windows that close on the partition's clock would not fit,
nor could they deduplicate by event id). The table lives in memory for the partitions this
worker owns and in a compacted changelog topic (``mesh.changelog``), recovered when partitions
are assigned, before any of their events is folded.

One kernel ``BatchSink`` consumes both topics (co-partitioned by entity id) in a group. Per
batch (at most ``push_batch_size`` events or ``push_batch_s``): invalid messages go to
``<topic>.dlq``; valid ones are folded in arrival order (``EntityAggregate.apply``,
``erase``); the state of every touched entity goes to the changelog and is acknowledged; the
online rows of erased entities are deleted, then the rows of every touched entity that has
features are pushed, retried until the store takes them; only then are the offsets committed.
A crash anywhere redelivers the batch, and the ``event_id`` check in the state makes that
harmless. After every assignment the recovered states are pushed again, so the online store
catches up with pushes a crash cut off.

Erasures replace the entity's state with a tombstone that only keeps the erasure time;
events from before the erasure that arrive later are dropped, so nothing is recreated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, TypeVar

from aiokafka import TopicPartition
from opentelemetry.trace import get_current_span
from pydantic import field_validator

from loopmesh.features import instruments
from loopmesh.features.core import EntityAggregate
from loopmesh.features.settings import FeaturesSettings
from loopmesh.mesh.batch import BatchSink, Taken
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.changelog import ChangelogTable, changelog_topic
from loopmesh.mesh.events import EntityErased, Event, InteractionEvent
from loopmesh.mesh.topics import ENTITIES_ERASED, EVENTS_RAW

log = logging.getLogger(__name__)
TABLE = "entity_state"
MAX_STATE_BYTES = 4 * 1024 * 1024
"""Largest state record the changelog takes (a hot entity keeps a day of event ids)."""
STORABLE_FROM = datetime(1900, 1, 1, tzinfo=UTC)
STORABLE_UNTIL = datetime(2200, 1, 1, tzinfo=UTC)
T = TypeVar("T")

Rows = Mapping[str, Mapping[str, Any]]


class StorableInteraction(InteractionEvent):
    """An InteractionEvent whose time the online store can hold; others are dead-lettered.

    Feast keeps pandas nanosecond timestamps (years 1677 to 2262) and the windows reach past
    the event: a valid event from year 9999 crashed the fold, and on every restart again.
    """

    @field_validator("event_time")
    @classmethod
    def _storable(cls, value: datetime) -> datetime:
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        if not STORABLE_FROM <= aware < STORABLE_UNTIL:
            raise ValueError(
                f"must be from {STORABLE_FROM.year} to {STORABLE_UNTIL.year - 1} (feature store)"
            )
        return value


class FeatureSink(Protocol):
    """Where rows go (``FeastGateway`` in the service)."""

    async def write(self, rows: Sequence[Rows]) -> int: ...

    async def delete(self, entity_id: str) -> bool: ...


@dataclass
class AgentStats:
    """What the agents did since start (logs and tests)."""

    outcomes: Counter[str]
    pushed: int = 0
    erased: int = 0
    resynced: int = 0


class FeatureAgents:
    """The group member that folds events into the table and pushes rows to the store."""

    def __init__(self, settings: FeaturesSettings, sink: FeatureSink, *, partitions: int):
        scope = settings.features
        self.scope = scope
        self.sink = sink
        self.partitions = partitions
        self.stats = AgentStats(outcomes=Counter())
        self.events_topic = replace(
            EVENTS_RAW, name=scope.events_topic, value_type=StorableInteraction
        )
        self.erasures_topic = replace(ENTITIES_ERASED, name=scope.erasures_topic)
        # One producer: dead letters and the changelog.
        self._producer = EventProducer(settings.kafka, "features")
        self.table = ChangelogTable(
            settings.kafka,
            changelog_topic(scope.app_id, TABLE, max_value_bytes=MAX_STATE_BYTES),
            self._producer,
            service="features",
        )
        tuning = scope.stream
        self.consumer: BatchSink[Event] = BatchSink(
            settings.kafka,
            [self.events_topic, self.erasures_topic],
            scope.app_id,
            self._fold,
            dlq=self._producer,
            service="features",
            flush_rows=scope.push_batch_size,
            flush_seconds=scope.push_batch_s,
            on_assigned=self._assigned,
            on_revoked=self._revoked,
            retry_backoff=scope.push_retry_s,
            span_name=f"{scope.events_topic} process",
            continue_single_trace=True,
            session_timeout_ms=int(tuning.session_timeout_s * 1000),
            heartbeat_interval_ms=int(tuning.heartbeat_interval_s * 1000),
            max_poll_interval_ms=int(tuning.rebalance_timeout_s * 1000),
            rebalance_timeout_ms=int(tuning.rebalance_timeout_s * 1000),
        )
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopping = False

    async def start(self, timeout_s: float = 120.0) -> None:
        """Start consuming; returns once partitions are assigned and their state recovered."""
        await self._producer.start()
        await self.table.declare(self.partitions)
        await self.consumer.start()
        self._task = asyncio.create_task(self.consumer.run(), name="features-fold")
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait([ready, self._task], timeout=timeout_s, return_when="FIRST_COMPLETED")
        ready.cancel()
        if self._task.done():
            self._task.result()  # raises what stopped it
        if not self._ready.is_set():
            raise TimeoutError(f"no partitions of {self.events_topic.name} within {timeout_s}s")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await self.consumer.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._producer.stop()

    async def finished(self) -> None:
        """Returns when the fold stopped (a crash, unless ``stop`` was called)."""
        assert self._task is not None, "not started"
        with contextlib.suppress(Exception):  # a crash; a cancellation of ours propagates
            await asyncio.shield(self._task)

    @property
    def crashed(self) -> bool:
        task = self._task
        return (
            task is not None
            and task.done()
            and not task.cancelled()
            and task.exception() is not None
        )

    # -------------------------------------------------------------------------- rebalances

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        partitions = {tp.partition for tp in assigned}
        await self.table.recover(partitions)
        await self._resync(partitions)
        self._ready.set()

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        # Only when no topic of the pair is still assigned on that partition.
        self.table.forget({tp.partition for tp in revoked})

    async def _resync(self, partitions: set[int]) -> None:
        """Push every recovered state, so the store holds what the changelog says."""
        rows = []
        for partition in partitions:
            for entity_id, raw in list(self.table.partition_items(partition)):
                aggregate = EntityAggregate.from_bytes(entity_id, raw)
                if aggregate.has_features:
                    rows.append(aggregate.rows())
        size = self.scope.push_batch_size
        for start in range(0, len(rows), size):
            await self._push(rows[start : start + size])
        self.stats.resynced += len(rows)
        if rows:
            log.info("resynced %d entities to the online store after recovery", len(rows))

    # -------------------------------------------------------------------------- the fold

    def _load(self, partition: int, entity_id: str) -> EntityAggregate:
        return EntityAggregate.from_bytes(
            entity_id,
            self.table.get(partition, entity_id),
            allowed_lateness=self.scope.allowed_lateness_s,
        )

    async def _fold(self, batch: Sequence[Taken[Event]]) -> None:
        """Fold one batch, make the states durable, then bring the online store in line."""
        # Inside the sink's "<events> process" span (it continues a single producer's trace).
        span = get_current_span()
        touched: dict[str, tuple[int, EntityAggregate]] = {}
        erased: list[EntityErased] = []
        # No await from loading a state to storing it: the batch is folded as one step.
        for taken in batch:
            event = taken.event
            _, aggregate = touched.get(event.entity_id) or (  # type: ignore[attr-defined]
                taken.partition,
                self._load(taken.partition, event.entity_id),  # type: ignore[attr-defined]
            )
            if isinstance(event, EntityErased):
                aggregate.erase(event.event_time.timestamp())
                erased.append(event)
            else:
                assert isinstance(event, InteractionEvent)
                outcome = aggregate.apply(event)
                self.stats.outcomes[outcome.value] += 1
                instruments.record_event(outcome.value)
            touched[aggregate.entity_id] = (taken.partition, aggregate)
        # Every touched state, duplicates too: a retried batch re-writes what a failed
        # changelog write may have lost before its offsets are committed.
        for partition, aggregate in touched.values():
            self.table.put(partition, aggregate.entity_id, aggregate.to_bytes())
        await self.table.flush()
        for erasure in erased:
            await self._retry(partial(self.sink.delete, erasure.entity_id), "delete")
            self.stats.erased += 1
            instruments.record_erasure()
            log.info("erased entity %r (event %s)", erasure.entity_id, erasure.event_id)
        rows = [agg.rows() for _, agg in touched.values() if agg.has_features]
        span.set_attribute("loopmesh.features.entities", len(rows))
        await self._push(rows)

    # ------------------------------------------------------------------------ the sink

    async def _push(self, rows: Sequence[Rows]) -> None:
        if rows:
            written = await self._retry(lambda: self.sink.write(rows), "push")
            self.stats.pushed += written
            instruments.record_online_writes(written)

    async def _retry(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Await ``call()`` until it succeeds: a batch is never dropped on a store hiccup (its
        offsets stay uncommitted meanwhile; stopping cancels this and leaves them so)."""
        attempt = 0
        while True:
            try:
                return await call()
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopping:
                    raise  # offsets stay uncommitted: the next owner folds the batch again
                attempt += 1
                log.exception("%s failed (attempt %d); retrying", what, attempt)
                await asyncio.sleep(self.scope.push_retry_s)
