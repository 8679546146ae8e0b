"""faust agents: fold ``events.raw`` into per-entity state and push it to the online store.

One changelog-backed table, ``entity_state`` (entity id -> ``EntityState`` JSON), holds
everything the features need, windows included: each entity's window is the list of its
events within the horizon, ending at its own newest event. faust's windowed tables do not fit
these semantics: their windows close on the partition's clock, not the entity's, and they
cannot deduplicate by event id, so a restart or a shuffled replay would change the counts.

Flow per batch (``take_events``: at most ``push_batch_size`` events or ``push_batch_s``):
invalid messages go to ``<topic>.dlq``; valid ones are folded (``EntityAggregate.apply``);
changed states go to the table and its changelog; then every touched entity's rows are pushed
to Feast, retried until the store takes them. faust acknowledges the batch only after the
body returns and commits offsets only after flushing the producer (changelog included), so
on a crash events are redelivered and the ``event_id`` check in the state makes that
harmless. After every recovery (start, restart, rebalance) the recovered states are pushed
again, so the online store catches up with pushes a crash cut off.

Erasures (``entities.erased``, co-partitioned with the events by entity id) replace the
entity's state with a tombstone that only keeps the erasure time, and delete its online
rows; events from before the erasure that arrive later are dropped, so nothing is recreated.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, TypeVar

from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, get_current_span
from pydantic import field_validator

from loopmesh.features import instruments
from loopmesh.features.core import EntityAggregate, Outcome
from loopmesh.features.settings import FeaturesSettings
from loopmesh.mesh.events import EntityErased, Event, InteractionEvent
from loopmesh.mesh.streams import decode_or_dead_letter, faust_app, record_lag
from loopmesh.mesh.telemetry import extract_context, tracer

log = logging.getLogger(__name__)
TABLE = "entity_state"
STORABLE_FROM = datetime(1900, 1, 1, tzinfo=UTC)
STORABLE_UNTIL = datetime(2200, 1, 1, tzinfo=UTC)
T = TypeVar("T")
E = TypeVar("E", bound=Event)

Rows = Mapping[str, Mapping[str, Any]]


class StorableInteraction(InteractionEvent):
    """An InteractionEvent whose time the online store can hold; others are dead-lettered.

    Feast keeps pandas nanosecond timestamps (years 1677 to 2262) and the windows reach past
    the event: a valid event from year 9999 crashed the fold agent, and on every restart again.
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
    dead_lettered: int = 0
    pushed: int = 0
    erased: int = 0


class FeatureAgents:
    """The faust app of the features service with its table and two agents."""

    def __init__(self, settings: FeaturesSettings, sink: FeatureSink, *, partitions: int):
        scope = settings.features
        self.scope = scope
        self.sink = sink
        self.stats = AgentStats(outcomes=Counter())
        self._tracer = tracer("loopmesh.features.agents")
        data_dir = scope.data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        tuning = scope.stream
        self.app = faust_app(
            scope.app_id,
            settings.kafka,
            data_dir=data_dir,
            broker_session_timeout=tuning.session_timeout_s,
            broker_heartbeat_interval=tuning.heartbeat_interval_s,
            broker_rebalance_timeout=tuning.rebalance_timeout_s,
            broker_commit_interval=tuning.commit_interval_s,
            consumer_auto_offset_reset="earliest",
            stream_recovery_delay=0.0,
        )
        self.table = self.app.Table(
            TABLE,
            key_type=str,
            value_type=bytes,
            partitions=partitions,
        )
        self.table.on_recover(self._resync)
        events = self.app.topic(scope.events_topic, partitions=partitions)
        erasures = self.app.topic(scope.erasures_topic, partitions=partitions)
        self.app.agent(events, name="features.fold_events")(self._fold_events)
        self.app.agent(erasures, name="features.erase_entities")(self._erase_entities)
        self.app.timer(scope.lag_interval_s, name="features.consumer_lag")(self._record_lag)

    async def start(self) -> None:
        """Start the app; returns once the table is recovered and the agents consume."""
        await self.app.start()

    async def stop(self) -> None:
        await self.app.stop()

    @property
    def crashed(self) -> bool:
        return bool(self.app.crashed)

    # ------------------------------------------------------------------------- the table

    def _load(self, entity_id: str) -> EntityAggregate:
        return EntityAggregate.from_bytes(
            entity_id, self.table.get(entity_id), allowed_lateness=self.scope.allowed_lateness_s
        )

    def _store(self, partition: int, aggregate: EntityAggregate) -> None:
        # The changelog partition is the source message's: events and erasures are keyed by
        # entity id, so that is the partition whose owner holds this entity's state.
        value = aggregate.to_bytes()
        self.table.data[aggregate.entity_id] = value
        self.table.send_changelog(partition, aggregate.entity_id, value)

    # ---------------------------------------------------------------------------- agents

    async def _fold_events(self, stream: Any) -> None:
        async for batch in stream.take_events(
            self.scope.push_batch_size, within=self.scope.push_batch_s
        ):
            await self.handle_batch(batch)

    async def handle_batch(self, batch: Sequence[Any]) -> None:
        """Fold one batch of faust events and push the rows of every entity it touched."""
        decoded: list[tuple[int, InteractionEvent]] = []
        links = _links(batch)
        parent = _single_parent(batch)
        for event in batch:
            parsed = await self._decode(StorableInteraction, event)
            if parsed is None:
                self.stats.dead_lettered += 1
            else:
                decoded.append((event.message.partition, parsed))
        with self._tracer.start_as_current_span(
            f"{self.scope.events_topic} process",
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": self.scope.events_topic,
                "messaging.batch.message_count": len(batch),
            },
            context=parent,
            links=[] if parent is not None else links,
        ) as span:
            # No await from loading a state to storing it: an erasure cannot interleave.
            touched: dict[str, tuple[int, EntityAggregate, bool]] = {}
            for partition, event in decoded:
                _, aggregate, changed = touched.get(event.entity_id) or (
                    partition,
                    self._load(event.entity_id),
                    False,
                )
                outcome = aggregate.apply(event)
                self.stats.outcomes[outcome.value] += 1
                instruments.record_event(outcome.value)
                touched[event.entity_id] = (
                    partition,
                    aggregate,
                    changed or outcome is Outcome.ACCEPTED,
                )
            for partition, aggregate, changed in touched.values():
                if changed:
                    self._store(partition, aggregate)
            # Duplicates are pushed too: after a crash they re-push what the crash cut off.
            rows = [agg.rows() for _, agg, _ in touched.values() if agg.has_features]
            span.set_attribute("loopmesh.features.entities", len(rows))
            await self._push(rows)

    async def _erase_entities(self, stream: Any) -> None:
        async for event in stream.events():
            erasure = await self._decode(EntityErased, event)
            if erasure is None:
                self.stats.dead_lettered += 1
                continue
            with self._tracer.start_as_current_span(
                f"{self.scope.erasures_topic} process",
                kind=SpanKind.CONSUMER,
                links=_links([event]),
            ):
                aggregate = self._load(erasure.entity_id)
                aggregate.erase(erasure.event_time.timestamp())
                self._store(event.message.partition, aggregate)
                await self._retry(partial(self.sink.delete, erasure.entity_id), "delete")
                self.stats.erased += 1
                instruments.record_erasure()
                log.info("erased entity %r (event %s)", erasure.entity_id, erasure.event_id)

    async def _record_lag(self) -> None:
        await record_lag(self.app, self.scope.app_id)

    async def _decode(self, model: type[E], event: Any) -> E | None:
        # Retried like a push: take_events acknowledges a batch even when its body raises,
        # so a dead letter that failed to send must not escape as an exception.
        return await self._retry(
            partial(decode_or_dead_letter, self.app, model, event, group=self.scope.app_id),
            "dead-letter",
        )

    # ------------------------------------------------------------------------ the sink

    async def _push(self, rows: Sequence[Rows]) -> None:
        if rows:
            written = await self._retry(lambda: self.sink.write(rows), "push")
            self.stats.pushed += written or 0
            instruments.record_online_writes(written or 0)

    async def _retry(self, call: Callable[[], Awaitable[T]], what: str) -> T | None:
        """Await ``call()`` until it succeeds: a batch is never dropped on a store hiccup."""
        attempt = 0
        while True:
            try:
                return await call()
            except asyncio.CancelledError:
                raise
            except Exception:
                attempt += 1
                if self.app.should_stop:
                    # Shutting down: give up; the resync after the next recovery catches up.
                    log.exception("%s failed while stopping; left to the next resync", what)
                    return None
                log.exception("%s failed (attempt %d); retrying", what, attempt)
                await asyncio.sleep(self.scope.push_retry_s)

    async def _resync(self) -> None:
        """Push every recovered state, so the store holds what the changelog says."""
        rows = []
        for entity_id, raw in list(self.table.data.items()):
            aggregate = EntityAggregate.from_bytes(entity_id, raw)
            if aggregate.has_features:
                rows.append(aggregate.rows())
        size = self.scope.push_batch_size
        for start in range(0, len(rows), size):
            await self._push(rows[start : start + size])
        if rows:
            log.info("resynced %d entities to the online store after recovery", len(rows))


def _links(batch: Sequence[Any], limit: int = 32) -> list[Link]:
    """Links to the producers' spans (trace context in the headers); a batch has many parents."""
    links = []
    for event in batch[:limit]:
        context = get_current_span(extract_context(event.message.headers)).get_span_context()
        if context.is_valid:
            links.append(Link(context))
    return links


def _single_parent(batch: Sequence[Any]) -> Context | None:
    """The producer's context when every message of the batch carries the same one (one Ingest
    call): the batch then continues that trace. None when it has several causes (links)."""
    first = None
    for event in batch:
        found = [v for k, v in event.message.headers or () if k == "traceparent"]
        if not found or (first is not None and found[0] != first):
            return None
        first = found[0]
    return extract_context(batch[0].message.headers) if first is not None else None
