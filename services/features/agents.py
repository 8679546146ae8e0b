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
from functools import partial
from typing import Any, Protocol, TypeVar

from opentelemetry.trace import Link, SpanKind, get_current_span

from services.features.core import EntityAggregate, Outcome
from services.features.settings import FeaturesSettings
from services.mesh.events import EntityErased, Event, InteractionEvent
from services.mesh.streams import decode_or_dead_letter, faust_app
from services.mesh.telemetry import extract_context, tracer

log = logging.getLogger(__name__)
TABLE = "entity_state"
T = TypeVar("T")
E = TypeVar("E", bound=Event)

Rows = Mapping[str, Mapping[str, Any]]


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
        for event in batch:
            parsed = await self._decode(InteractionEvent, event)
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
            links=links,
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
                log.info("erased entity %r (event %s)", erasure.entity_id, erasure.event_id)

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
