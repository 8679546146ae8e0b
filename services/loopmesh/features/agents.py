"""The features fold: ``events.raw`` and ``entities.erased`` into per-entity state, written to
the online store, for every stream feature view the project declares.

One table, ``entity_state`` (``<join key>=<id>`` -> ``EntityFold`` JSON), holds each entity's
state for every view of its join key. It lives in memory for the partitions this worker owns
and in a compacted changelog topic (``mesh.changelog``), recovered when partitions are
assigned, before any of their events is folded.

Entities of the event's own key (``entity_id``) are folded where the event arrives: the events
topic is partitioned by it. An event also names other entities (``entities``, e.g. an item);
their state must live in one place whatever partition the event came on, so the fold first
re-keys the event to ``<app_id>-rekeyed`` (partitioned by that entity's key, like Kafka
Streams' repartition topics) and folds it when it comes back from there. Erasures of other
kinds take the same way.

One kernel ``BatchSink`` consumes the three topics (co-partitioned: the range assignor gives
one member partition p of each). Per batch: invalid messages go to ``<topic>.dlq``; events
later than a view's allowed lateness are counted and reported there too; valid ones are
folded in arrival order; re-keyed copies are acknowledged; the state of every touched entity
goes to the changelog and is acknowledged; online rows of erased entities are deleted, then
the rows of every touched entity are written, retried until the store takes them; only then
are the offsets committed. A crash anywhere redelivers the batch, which the fold absorbs
(offsets and event ids in the state).

A view added to a running mesh (or changed) is filled from the retained events when the
workers restart: ``_backfill`` reads the events topic up to the group's committed offsets
into the new views only, and marks from where the live fold counts them, so no event is
counted twice and the other views are not recounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from opentelemetry.trace import get_current_span
from pydantic import ValidationError, field_validator

from loopmesh.features import instruments
from loopmesh.features.core import (
    Columns,
    EntityFold,
    Outcome,
    event_columns,
    key_of,
    split_key,
    state_bytes_bound,
    table_key,
)
from loopmesh.features.definitions import PRIMARY_JOIN_KEY, Definitions, ViewSpec
from loopmesh.features.settings import FeaturesSettings
from loopmesh.mesh.batch import BatchSink, Taken
from loopmesh.mesh.bus import (
    DLQ_MAX_BYTES,
    EventProducer,
    client_options,
    dead_letter,
    declare_topics,
    encode,
    event_headers,
)
from loopmesh.mesh.changelog import ChangelogTable, changelog_topic
from loopmesh.mesh.errors import SetupError
from loopmesh.mesh.events import EntityErased, Event, Identifier, InteractionEvent, JoinKey
from loopmesh.mesh.topics import ENTITIES_ERASED, EVENTS_RAW, Topic

log = logging.getLogger(__name__)
TABLE = "entity_state"
MARKER = "#views"
"""The table key (no '=': never an entity's) of a partition's backfill record."""
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


class Rekeyed(Event):
    """An event or erasure on its way to the partition of another entity kind's key."""

    SCHEMA: ClassVar[str] = "features.rekeyed.v1"
    join_key: JoinKey
    key: Identifier
    origin_partition: int
    """Where the event sits in the events topic (a backfill counted it there, maybe)."""
    origin_offset: int
    origin_written_ms: int = -1
    """When the event (or erasure) was written to its own topic (the broker's time)."""
    interaction: StorableInteraction | None = None
    erasure: EntityErased | None = None


def rekeyed_topic(app_id: str) -> Topic:
    return Topic(f"{app_id}-rekeyed", Rekeyed, "key")


def partition_of(key: str, partitions: int) -> int:
    """The partition of an entity key in the re-keyed topic (and so of its state)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


class Origin(NamedTuple):
    """Where an event (or erasure) was written first: its own topic's partition and offset,
    and the broker's append time."""

    partition: int
    offset: int
    written_ms: int


class FeatureSink(Protocol):
    """Where rows go (``FeastGateway`` in the service)."""

    definitions: Definitions

    async def write(self, rows: Sequence[Rows]) -> int: ...

    async def delete(self, entity_id: str, join_key: str = PRIMARY_JOIN_KEY) -> bool: ...


@dataclass
class AgentStats:
    """What the agents did since start (logs and tests)."""

    outcomes: Counter[str]
    late: Counter[str] = field(default_factory=Counter)
    pushed: int = 0
    erased: int = 0
    resynced: int = 0
    backfilled: int = 0
    rekeyed: int = 0


@dataclass
class _Late:
    """What ``dead_letter`` needs of a record: the event as it sat in the events topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class _Batch:
    """What one fold step touched and owes."""

    touched: dict[str, tuple[int, EntityFold]] = field(default_factory=dict)
    erased: list[tuple[str, str]] = field(default_factory=list)
    rekeyed: list[tuple[int, Rekeyed]] = field(default_factory=list)
    late: list[tuple[_Late, list[str]]] = field(default_factory=list)


class FeatureAgents:
    """The group member that folds events into the table and writes rows to the store."""

    def __init__(self, settings: FeaturesSettings, sink: FeatureSink, *, partitions: int):
        scope = settings.features
        self.settings = settings
        self.scope = scope
        self.sink = sink
        self.definitions = sink.definitions
        self.partitions = partitions
        self.stats = AgentStats(outcomes=Counter())
        self.events_topic = replace(
            EVENTS_RAW, name=scope.events_topic, value_type=StorableInteraction
        )
        self.erasures_topic = replace(ENTITIES_ERASED, name=scope.erasures_topic)
        self.rekeyed_topic = rekeyed_topic(scope.app_id)
        self._views_of = {k: self.definitions.views_of(k) for k in self.definitions.join_keys}
        self._secondary = [k for k in self._views_of if k != PRIMARY_JOIN_KEY]
        bound = max(
            (state_bytes_bound(views, scope.dedup_ids) for views in self._views_of.values()),
            default=4096,
        )
        if bound > DLQ_MAX_BYTES - 64 * 1024:
            raise SetupError(
                "features.dedup_ids",
                f"an entity's state may reach {bound} bytes, over the {DLQ_MAX_BYTES}-byte "
                "records the producer sends: fewer dedup ids or fewer slides per window",
            )
        # One producer: dead letters, re-keyed copies and the changelog.
        self._producer = EventProducer(settings.kafka, "features")
        self.table = ChangelogTable(
            settings.kafka,
            changelog_topic(scope.app_id, TABLE, max_value_bytes=bound),
            self._producer,
            service="features",
        )
        # Decoded states of the owned partitions: decoding every touched state from JSON on
        # every batch was a third of the fold's CPU (bench/features_fold_bench.py).
        self._live: dict[int, dict[str, EntityFold]] = {}
        # Per owned table partition: view -> events partition -> first offset the live fold
        # counts for that view (a backfill counted the ones before).
        self._since: dict[int, dict[str, dict[int, int]]] = {}
        tuning = scope.stream
        self.consumer: BatchSink[Event] = BatchSink(
            settings.kafka,
            [self.events_topic, self.erasures_topic, self.rekeyed_topic],
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
            # Partition p of every topic to one member: the state of p is in one place.
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_partition_fetch_bytes=max(1024 * 1024, bound),
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
        sized = self.settings.kafka.model_copy(update={"default_partitions": self.partitions})
        await declare_topics(sized, [self.rekeyed_topic], with_dlq=True)
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

    def states(self) -> dict[str, EntityFold]:
        """Every entity state held (tests and tools)."""
        return {key: self._fold_of(key, raw) for key, raw in self.table.items() if key != MARKER}

    # -------------------------------------------------------------------------- rebalances

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        partitions = {tp.partition for tp in assigned}
        await self.table.recover(partitions)
        await self._backfill(partitions)
        await self._resync(partitions)
        self._ready.set()

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        partitions = {tp.partition for tp in revoked}
        self.table.forget(partitions)
        for partition in partitions:
            self._since.pop(partition, None)
            self._live.pop(partition, None)

    async def _resync(self, partitions: set[int]) -> None:
        """Write every recovered state, so the store holds what the changelog says."""
        rows = []
        for partition in partitions:
            for key, _ in self.table.partition_items(partition):
                if key == MARKER:
                    continue
                fold = self._load(partition, key)
                if fold.has_features:
                    rows.append(fold.rows())
        size = self.scope.push_batch_size
        for start in range(0, len(rows), size):
            await self._push(rows[start : start + size])
        self.stats.resynced += len(rows)
        if rows:
            log.info("resynced %d entities to the online store after recovery", len(rows))

    # -------------------------------------------------------------------------- backfill

    def _marker(self, partition: int) -> dict[str, Any]:
        raw = self.table.get(partition, MARKER)
        marker: dict[str, Any] = json.loads(raw) if raw else {"views": {}, "since": {}}
        return marker

    async def _backfill(self, partitions: set[int]) -> None:
        """Fill views this partition has not counted yet from the retained events."""
        views = self.definitions.views
        markers = {p: self._marker(p) for p in partitions}
        new = {
            p: [v for v in views if markers[p]["views"].get(v.name) != v.fingerprint]
            for p in partitions
        }
        for p in partitions:
            since = markers[p].get("since", {})
            self._since[p] = {
                name: {int(q): o for q, o in per.items()}
                for name, per in since.items()
                if name in {v.name for v in views} and name not in {v.name for v in new[p]}
            }
        todo = {p: vs for p, vs in new.items() if vs}
        if not todo:
            return
        committed = await self._committed()
        names = sorted({v.name for vs in todo.values() for v in vs})
        log.info(
            "backfilling views %s of partitions %s from %s up to offsets %s",
            names,
            sorted(todo),
            self.events_topic.name,
            committed,
        )
        # A crashed backfill may have left part of a new view: start those views afresh.
        for p, vs in todo.items():
            fresh = {v.name for v in vs}
            for key, raw in self.table.partition_items(p):
                if key != MARKER:
                    fold = self._fold_of(key, raw)
                    fold.reset(fresh)
                    self.table.put(p, key, fold.to_bytes())
        for p in todo:
            self._live.pop(p, None)  # the backfill rewrites these states in the table
        count = await self._replay(todo, committed)
        for p, vs in todo.items():
            marker = markers[p]
            marker["views"] = {v.name: v.fingerprint for v in views}
            since = marker.setdefault("since", {})
            for v in vs:
                since[v.name] = {str(q): o for q, o in committed.items()}
                self._since[p][v.name] = dict(committed)
            for name in list(since):
                if name not in marker["views"]:
                    del since[name]
            self.table.put(p, MARKER, json.dumps(marker).encode())
        await self.table.flush()
        self.stats.backfilled += count
        log.info("backfilled %d events into views %s", count, names)

    async def _committed(self) -> dict[int, int]:
        """The group's committed offset of each events partition (0 where none)."""
        tps = [TopicPartition(self.events_topic.name, q) for q in range(self.partitions)]
        admin = AIOKafkaAdminClient(**client_options(self.settings.kafka, "features-admin"))
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(self.scope.app_id, partitions=tps)
        finally:
            await admin.close()
        out = {q: 0 for q in range(self.partitions)}
        for tp, meta in offsets.items():
            if meta is not None and meta.offset is not None and meta.offset > 0:
                out[tp.partition] = meta.offset
        return out

    async def _replay(self, todo: dict[int, list[ViewSpec]], upto: dict[int, int]) -> int:
        """Fold the events before ``upto`` into the new views of the owned partitions."""
        secondary = any(v.join_key != PRIMARY_JOIN_KEY for vs in todo.values() for v in vs)
        # Another kind's entities of my partitions are spread over every events partition.
        sources = [
            q for q in range(self.partitions) if upto.get(q, 0) > 0 and (secondary or q in todo)
        ]
        if not sources:
            return 0
        reader = AIOKafkaConsumer(
            **client_options(self.settings.kafka, "features-backfill"),
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await reader.start()
        touched: dict[str, tuple[int, EntityFold]] = {}
        count = 0
        try:
            tps = [TopicPartition(self.events_topic.name, q) for q in sources]
            reader.assign(tps)
            for tp, start in (await reader.beginning_offsets(tps)).items():
                reader.seek(tp, start)
            remaining = {tp for tp in tps if upto[tp.partition] > 0}
            while remaining:
                batches = await reader.getmany(*remaining, timeout_ms=500)
                for tp, records in batches.items():
                    for record in records:
                        if record.offset >= upto[tp.partition]:
                            remaining.discard(tp)
                            break
                        count += self._replay_one(record, tp.partition, todo, touched)
                for tp in list(remaining):
                    if await reader.position(tp) >= upto[tp.partition]:
                        remaining.discard(tp)
        finally:
            await reader.stop()
        for key, (partition, fold) in touched.items():
            self.table.put(partition, key, fold.to_bytes())
        return count

    def _replay_one(
        self,
        record: Any,
        partition: int,
        todo: dict[int, list[ViewSpec]],
        touched: dict[str, tuple[int, EntityFold]],
    ) -> int:
        try:
            event = StorableInteraction.model_validate_json(record.value or b"")
        except ValidationError:
            return 0  # dead-lettered when it was first consumed
        columns = event_columns(event)
        folded = 0
        for join_key in self._views_of:
            value = key_of(event, join_key)
            if value is None:
                continue
            key = table_key(join_key, value)
            target = (
                partition if join_key == PRIMARY_JOIN_KEY else partition_of(key, self.partitions)
            )
            new = {v.name for v in todo.get(target, ()) if v.join_key == join_key}
            if not new:
                continue
            _, fold = touched.get(key) or (target, self._load(target, key))
            outcome, late = fold.apply(
                event, columns, only=new, dedup=False, written_ms=record.timestamp
            )
            for name in late:
                self.stats.late[name] += 1
                instruments.record_late(name)
            touched[key] = (target, fold)
            folded += outcome is Outcome.ACCEPTED
        return folded

    # -------------------------------------------------------------------------- the fold

    def _fold_of(self, key: str, raw: bytes | None) -> EntityFold:
        join_key, _ = split_key(key)
        return EntityFold.load(
            key, raw, self._views_of.get(join_key, []), dedup_ids=self.scope.dedup_ids
        )

    def _load(self, partition: int, key: str) -> EntityFold:
        live = self._live.setdefault(partition, {})
        fold = live.get(key)
        if fold is None:
            fold = live[key] = self._fold_of(key, self.table.get(partition, key))
        return fold

    def _entity(self, batch: _Batch, partition: int, key: str) -> EntityFold:
        entry = batch.touched.get(key)
        if entry is None:
            entry = (partition, self._load(partition, key))
            batch.touched[key] = entry
        return entry[1]

    def _counted(self, partition: int, origin: Origin, views: Iterable[ViewSpec]) -> set[str]:
        """Views a backfill already counted the event at ``origin`` in, for the state in
        table ``partition``."""
        since = self._since.get(partition, {})
        q, offset = origin.partition, origin.offset
        return {v.name for v in views if offset < since.get(v.name, {}).get(q, 0)}

    def _fold_event(
        self,
        batch: _Batch,
        partition: int,
        join_key: str,
        value: str,
        event: InteractionEvent,
        columns: Columns,
        source: tuple[str, int],
        origin: Origin,
    ) -> None:
        views = self._views_of.get(join_key, [])
        if not views:
            return
        key = table_key(join_key, value)
        fold = self._entity(batch, partition, key)
        counted = self._counted(partition, origin, views)
        only = None if not counted else {v.name for v in views} - counted
        outcome, late = fold.apply(
            event, columns, source=source, only=only, written_ms=origin.written_ms
        )
        self.stats.outcomes[outcome.value] += 1
        instruments.record_event(outcome.value)
        if late:
            batch.late.append(
                (
                    _Late(
                        self.events_topic.name,
                        origin.partition,
                        origin.offset,
                        event.entity_id.encode(),
                        encode(event),
                        tuple(event_headers(event)),
                    ),
                    late,
                )
            )

    def _rekey(
        self,
        batch: _Batch,
        join_key: str,
        value: str,
        origin: Origin,
        payload: InteractionEvent | EntityErased,
    ) -> None:
        key = table_key(join_key, value)
        copy = Rekeyed(
            event_id=payload.event_id,
            join_key=join_key,
            key=value,
            origin_partition=origin.partition,
            origin_offset=origin.offset,
            origin_written_ms=origin.written_ms,
            interaction=payload if isinstance(payload, InteractionEvent) else None,
            erasure=payload if isinstance(payload, EntityErased) else None,
        )
        batch.rekeyed.append((partition_of(key, self.partitions), copy))

    async def _fold(self, batch_in: Sequence[Taken[Event]]) -> None:
        """Fold one batch, make the states durable, then bring the online store in line."""
        batch = _Batch()
        try:
            await self._fold_batch(batch_in, batch)
        except BaseException:
            # The sink retries the batch: its states must fold it again from what the table
            # holds (the decoded ones already hold it, and would count it as duplicates and
            # never report its late events).
            for key, (partition, _) in batch.touched.items():
                self._live.get(partition, {}).pop(key, None)
            raise

    async def _fold_batch(self, batch_in: Sequence[Taken[Event]], batch: _Batch) -> None:
        # Inside the sink's "<events> process" span (it continues a single producer's trace).
        span = get_current_span()
        # No await from loading a state to storing it: the batch is folded as one step.
        for taken in batch_in:
            event, p, offset = taken.event, taken.partition, taken.offset
            source = (taken.topic, offset)
            origin = Origin(p, offset, taken.timestamp_ms)
            if isinstance(event, InteractionEvent):
                columns = event_columns(event)
                self._fold_event(
                    batch, p, PRIMARY_JOIN_KEY, event.entity_id, event, columns, source, origin
                )
                for join_key in self._secondary:
                    value = event.entities.get(join_key)
                    if value is not None:
                        self._rekey(batch, join_key, value, origin, event)
            elif isinstance(event, EntityErased):
                if event.join_key == PRIMARY_JOIN_KEY:
                    self._erase(batch, p, event, taken.timestamp_ms)
                else:
                    self._rekey(batch, event.join_key, event.entity_id, origin, event)
            elif isinstance(event, Rekeyed):
                if event.erasure is not None:
                    self._erase(batch, p, event.erasure, event.origin_written_ms)
                elif event.interaction is not None:
                    interaction = event.interaction
                    self._fold_event(
                        batch,
                        p,
                        event.join_key,
                        event.key,
                        interaction,
                        event_columns(interaction),
                        source,
                        Origin(
                            event.origin_partition, event.origin_offset, event.origin_written_ms
                        ),
                    )
        await self._send_rekeyed(batch.rekeyed)
        for record, views in batch.late:
            for name in views:
                self.stats.late[name] += 1
                instruments.record_late(name)
            await dead_letter(
                self._producer,
                record,
                group=self.scope.app_id,
                reason=f"late: older than the allowed lateness of views {', '.join(views)}",
                event_id=f"late-{record.topic}-{record.partition}-{record.offset}",
            )
        # Every touched state, duplicates too: a retried batch re-writes what a failed
        # changelog write may have lost before its offsets are committed.
        for key, (partition, fold) in batch.touched.items():
            self.table.put(partition, key, fold.to_bytes())
        await self.table.flush()
        for join_key, entity_id in batch.erased:
            await self._retry(partial(self.sink.delete, entity_id, join_key), "delete")
            self.stats.erased += 1
            instruments.record_erasure()
            log.info("erased %s=%r", join_key, entity_id)
        rows = [fold.rows() for _, fold in batch.touched.values() if fold.has_features]
        span.set_attribute("loopmesh.features.entities", len(rows))
        await self._push(rows)

    def _erase(self, batch: _Batch, partition: int, erasure: EntityErased, written_ms: int) -> None:
        key = table_key(erasure.join_key, erasure.entity_id)
        fold = self._entity(batch, partition, key)
        fold.erase(erasure.event_time.timestamp(), written_ms if written_ms >= 0 else None)
        batch.erased.append((erasure.join_key, erasure.entity_id))

    async def _send_rekeyed(self, copies: Sequence[tuple[int, Rekeyed]]) -> None:
        if not copies:
            return
        topic = self.rekeyed_topic.name
        await asyncio.gather(
            *(
                self._producer.publish_raw(
                    topic,
                    encode(copy),
                    table_key(copy.join_key, copy.key).encode(),
                    event_headers(copy),
                    partition=partition,
                )
                for partition, copy in copies
            )
        )
        self.stats.rekeyed += len(copies)

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
