"""The joiner: a faust app pairing ``predictions`` with ``feedback`` by prediction_id.

Both topics are keyed by prediction_id and co-partitioned with the join table's changelog:
an entry is written to the changelog partition its events arrive on (faust checks that the
partition counts match) and recovers with it. The pairing rules are in ``core``; this module
only moves bytes: decode (dead-lettering what does not validate), apply, emit.

Each joined example goes to ``training.examples`` (keyed by entity) and to an internal topic
keyed by model name, whose consumer keeps the live sliding-window metrics per version and
publishes them to ``metrics.live``: keying by model puts all versions of a model on one
worker, so every version's window is whole even with many joiner workers.

State is bounded: the table is on disk (RocksDB) by default; feedback for a prediction the
joiner has not seen waits ``unmatched_feedback_wait_seconds`` at most and at most
``max_unmatched_feedback`` such entries are kept per worker (the oldest are dropped, counted
and logged). ``entities.erased`` is followed by every worker from its beginning, before the
agents start: a prediction of an erased entity from before its erasure is neither stored nor
joined, and the sweeper deletes the ones stored before the erasure arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

from opentelemetry import trace
from pydantic import ValidationError

from loopmesh.joiner import instruments
from loopmesh.joiner.core import JoinEntry, LabelRules, Outcome, on_feedback, on_prediction
from loopmesh.joiner.live import LiveMetrics
from loopmesh.joiner.settings import JoinerScope
from loopmesh.joiner.state import (
    ErasureLog,
    UnmatchedFeedback,
    Waiting,
    created_of,
    has_prediction,
)
from loopmesh.mesh.bus import (
    Delivery,
    EventProducer,
    consume_span,
    declare_topics,
    encode,
    event_headers,
)
from loopmesh.mesh.events import (
    EntityErased,
    Event,
    FeedbackEvent,
    LabelledExample,
    PredictionLogged,
)
from loopmesh.mesh.follow import TopicFollower
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.streams import decode_or_dead_letter, faust_app, record_lag
from loopmesh.mesh.telemetry import extract_context, tracer
from loopmesh.mesh.topics import Topic

log = logging.getLogger(__name__)

Step = Callable[..., tuple[JoinEntry, Outcome, LabelledExample | None]]
"""``step(entry, now=..., offset=...)``: a pairing transition with its event bound."""
Side = Literal["prediction", "feedback"]
Scanned = tuple[int | None, bytes, bytes]
"""(partition if the store knows it, key, encoded JoinEntry): one entry as the sweeper reads it."""

ERASURES_CATCHUP_S = 120.0
"""Longest wait at start for ``entities.erased`` to be read to its end."""
SCAN_CHUNK = 2000
"""Entries the sweeper reads between yields to the agents."""
DROP_LOG_INTERVAL_S = 10.0
"""Drops of unmatched feedback are logged at most this often (with their count)."""
UNMATCHED_EXPIRY_INTERVAL_S = 30.0
"""How often unmatched feedback past its wait is deleted (from the age index, no scan)."""


class Joiner:
    """The faust app with its join table, agents and timers; ``start``/``stop`` in any loop."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: JoinerScope,
        *,
        rules: LabelRules | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.rules = rules or LabelRules(reward_threshold=settings.reward_threshold)
        topics = settings.topics
        self.topics = topics
        self.group = settings.app_id
        self._clock = clock
        self._tracer = tracer("loopmesh.joiner")
        data_dir = settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.app = faust_app(
            settings.app_id,
            kafka,
            data_dir=data_dir,
            store=settings.store,
            broker_session_timeout=settings.session_timeout_seconds,
            broker_heartbeat_interval=settings.heartbeat_interval_seconds,
        )
        self.on_disk = settings.store.startswith("rocksdb:")
        partitions = kafka.default_partitions
        # Raw bytes both ways, so recovery yields exactly what was written.
        self.table = self.app.Table(
            "joins",
            default=None,
            key_type=bytes,
            value_type=bytes,
            partitions=partitions,
            options=_rocksdb_options(settings) if self.on_disk else None,
            help="prediction_id -> JoinEntry (JSON)",
        )
        self._predictions = self.app.topic(topics.predictions)
        self._feedback = self.app.topic(topics.feedback)
        self._examples = self.app.topic(topics.examples)
        self._metrics = self.app.topic(topics.metrics)
        self._by_model_topic = Topic(
            f"{settings.app_id}-examples-by-model", LabelledExample, "model_name"
        )
        # faust's own name for the table's changelog (``<app id>-<table>-changelog``).
        self._changelog_topic = Topic(
            f"{settings.app_id}-joins-changelog", Event, "prediction_id", compacted=True
        )
        self._by_model = self.app.topic(
            self._by_model_topic.name, internal=True, partitions=partitions
        )
        self._kafka = kafka
        self.live = LiveMetrics(settings.metrics_window_seconds, settings.metrics_max_points)
        self.stats: Counter[str] = Counter()
        self.unmatched = UnmatchedFeedback(settings.max_unmatched_feedback)
        self.erasures: ErasureLog | None = None
        self._purge_erased = False
        self._drops_unlogged = 0
        self._drops_logged_at = -DROP_LOG_INTERVAL_S
        self._unwatch: Callable[[], None] | None = None
        self._model_partition: dict[str, int] = {}
        # Its own producer only for dead letters of malformed erasures (the follower's API).
        self._dlq = EventProducer(kafka, "joiner")
        self._erased = TopicFollower(
            kafka, topics.topic("erased"), self._on_erased, service="joiner", dlq=self._dlq
        )
        self.app.agent(self._predictions, name="joiner-predictions")(self._on_predictions)
        self.app.agent(self._feedback, name="joiner-feedback")(self._on_feedback)
        self.app.agent(self._by_model, name="joiner-live")(self._on_examples)
        self.app.timer(settings.sweep_interval_seconds, name="joiner-sweep")(self.sweep)
        self.app.timer(UNMATCHED_EXPIRY_INTERVAL_S, name="joiner-unmatched")(self.expire_unmatched)
        self.app.timer(settings.metrics_publish_interval_seconds, name="joiner-metrics")(
            self.publish_metrics
        )
        self.app.timer(instruments.LAG_INTERVAL_S, name="joiner-lag")(self._record_lag)
        # mode types handlers as plain functions; a bound coroutine method is what faust calls.
        self.app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]

    async def start(self) -> None:
        """Start consuming; returns once the table is recovered from its changelog."""
        # Declared before the first send: a produce to a missing topic would auto-create it
        # with the broker's default partition count (or time out) instead.
        # The changelog too: created by faust right before it joins the group, a topic the
        # metadata did not list yet was left out of the assignment ("Ignoring missing topic"),
        # and every table write then failed with PartitionsMismatch, stalling the join.
        await declare_topics(
            self._kafka, [self._by_model_topic, self._changelog_topic], with_dlq=False
        )
        await declare_topics(self._kafka, [self.topics.topic("erased")])
        self.erasures = ErasureLog(self.settings.data_dir / "erased" if self.on_disk else None)
        try:
            await self._dlq.start()
            # Every erasure known before the first prediction is handled: one handled earlier
            # could join for an entity erased long ago.
            await self._erased.follow(ERASURES_CATCHUP_S)
            await self.app.start()
        except BaseException:
            await self.stop()
            raise
        self._unwatch = instruments.watch_unmatched(lambda: len(self.unmatched))
        # A restart finds unmatched feedback on disk: index it (and apply the cap) now.
        await self.sweep()

    async def stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        await self.app.stop()
        await self._erased.stop()
        await self._dlq.stop()
        if self.erasures is not None:
            self.erasures.close()
            self.erasures = None

    @property
    def crashed(self) -> bool:
        """The faust app or the erasure follower died (the process must restart)."""
        return bool(self.app.crashed) or self._erased.crashed.is_set()

    # -- agents ------------------------------------------------------------------------------

    async def _on_predictions(self, stream: Any) -> None:
        async for event in stream.events():
            prediction = await decode_or_dead_letter(
                self.app, PredictionLogged, event, group=self.group
            )
            if prediction is None:
                self.stats["dead_lettered"] += 1
                continue
            with self._span(event, prediction.event_id):
                step = functools.partial(
                    on_prediction,
                    prediction=prediction,
                    ttl=self.settings.ttl_seconds,
                    feedback_wait=self.settings.unmatched_feedback_wait_seconds,
                    rules=self.rules,
                )
                await self._apply_retrying(prediction.prediction_id, event, step, "prediction")

    async def _on_feedback(self, stream: Any) -> None:
        async for event in stream.events():
            feedback = await decode_or_dead_letter(self.app, FeedbackEvent, event, group=self.group)
            if feedback is None:
                self.stats["dead_lettered"] += 1
                continue
            with self._span(event, feedback.event_id):
                step = functools.partial(
                    on_feedback,
                    feedback=feedback,
                    ttl=self.settings.ttl_seconds,
                    feedback_wait=self.settings.unmatched_feedback_wait_seconds,
                    rules=self.rules,
                )
                await self._apply_retrying(feedback.prediction_id, event, step, "feedback")

    async def _apply_retrying(self, prediction_id: str, event: Any, step: Step, side: Side) -> None:
        # An exception would end the faust agent and stall the join; retry instead (the
        # failures worth retrying are Kafka's). A retry after the table write sees the
        # event as already handled and re-emits the same example, so nothing is lost.
        delay = 0.1
        while True:
            try:
                await self._apply(prediction_id, event, step, side)
                return
            except Exception:
                self.stats["retries"] += 1
                log.exception("joining %s failed; retrying in %.1fs", prediction_id, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _apply(self, prediction_id: str, event: Any, step: Step, side: Side) -> None:
        key = prediction_id.encode()
        message = event.message
        if message.key != key:
            # Still joined, but state may sit on another partition than its events.
            self.stats["key_mismatch"] += 1
        raw = self.table.get(key)
        entry = JoinEntry.decode(raw) if raw is not None else None
        _link_waiting_side(entry, side)
        new_entry, outcome, example = step(entry, now=self._clock(), offset=message.offset)
        if new_entry.prediction is not None and self._is_erased(new_entry.prediction):
            # The entity was erased after this prediction: keep none of it, emit nothing.
            if raw is not None:
                self._delete(key, message.partition)
            self.unmatched.discard(key)
            self.stats["erased"] += 1
            instruments.record_erased()
            return
        if new_entry is not entry:
            # This side is (now) the entry's: keep its trace for the other side's join span.
            traceparent = _traceparent(message.headers)
            new_entry = new_entry.model_copy(
                update={f"{side}_trace": traceparent, "partition": message.partition}
            )
            self.table[key] = new_entry.encode()
            if new_entry.unmatched_feedback:
                waiting = Waiting(key, new_entry.created, message.partition)
                self._drop_unmatched(self.unmatched.add(waiting))
            else:
                self.unmatched.discard(key)
        self.stats[outcome.value] += 1
        if outcome is Outcome.NO_TARGET and new_entry.prediction is not None:
            instruments.record_no_target(new_entry.prediction.model_name)
        if example is not None:
            value = encode(example)
            headers = event_headers(example)
            await self._examples.send(key=example.entity_id.encode(), value=value, headers=headers)
            await self._by_model.send(key=example.model_name.encode(), value=value, headers=headers)
            self.stats["examples"] += 1
            instruments.record_joined(example.model_name, example.model_version)

    async def _on_examples(self, stream: Any) -> None:
        async for event in stream.events():
            try:
                example = LabelledExample.model_validate_json(event.message.value or b"")
            except ValidationError:
                # Written by this app a moment ago; unreadable means a bug, not bad input.
                log.exception("unreadable example on %s", event.message.topic)
                continue
            self.live.add(example)
            self._model_partition[example.model_name] = event.message.partition

    async def _on_erased(self, event: EntityErased, _delivery: Delivery) -> None:
        assert self.erasures is not None  # the follower runs between start and stop
        if getattr(event, "join_key", "entity_id") != "entity_id":
            # Another kind of entity (an item, say): predictions are keyed by entity_id only.
            return
        if self.erasures.record(event.entity_id, event.event_time.timestamp()):
            # Stored predictions of the entity may wait in the table: the next sweep looks.
            self._purge_erased = True
        self.stats["erasures"] += 1

    def _is_erased(self, prediction: PredictionLogged) -> bool:
        erasures = self.erasures
        at = prediction.event_time.timestamp()
        return erasures is not None and erasures.covers(prediction.entity_id, at)

    # -- bounded state -----------------------------------------------------------------------

    def _delete(self, key: bytes, partition: int) -> None:
        """Delete an entry from any partition, also outside stream iteration (where faust
        cannot infer a key's partition): the tombstone goes to where the entry was written."""
        self.table.send_changelog(partition, key, None, value_serializer="raw")
        with contextlib.suppress(KeyError):
            # `del`, not `pop`: the RocksDB store's reads inside an agent see only the
            # current event's partition, its deletes every partition.
            del self.table.data[key]
        self.unmatched.discard(key)

    def _drop_unmatched(self, dropped: list[Waiting]) -> None:
        if not dropped:
            return
        for waiting in dropped:
            self._delete(waiting.key, waiting.partition)
        self.stats["unmatched_dropped"] += len(dropped)
        instruments.record_dropped(len(dropped))
        self._drops_unlogged += len(dropped)
        self._log_drops()

    def _log_drops(self, *, force: bool = False) -> None:
        # One line per interval, not per entry: a flood of bogus ids would flood the log too.
        if not self._drops_unlogged:
            return
        now = time.monotonic()
        if not force and now - self._drops_logged_at < DROP_LOG_INTERVAL_S:
            return
        log.warning(
            "dropped %d unmatched feedback entries (over the cap of %d waiting for their "
            "prediction); %d since start",
            self._drops_unlogged,
            self.unmatched.cap,
            self.stats["unmatched_dropped"],
        )
        self._drops_unlogged = 0
        self._drops_logged_at = now

    # -- timers ------------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Delete expired entries (and stored predictions of erased entities); returns how many.

        Predictions go ``ttl_seconds`` after they were stored, unmatched feedback after
        ``unmatched_feedback_wait_seconds``. Reads every entry of this worker's partitions in
        chunks, yielding to the agents between them; an entry the agents changed meanwhile is
        left alone. Also indexes unmatched feedback the worker has not seen arrive (recovered
        after a restart or a rebalance) and applies the cap to it.
        """
        now = self._clock()
        purge = self._purge_erased
        self._purge_erased = False
        removed = await self.expire_unmatched()
        chunk: list[Scanned] = []
        for item in self._scan():
            chunk.append(item)
            if len(chunk) >= SCAN_CHUNK:
                removed += self._sweep_chunk(chunk, now, purge=purge)
                chunk = []
                await asyncio.sleep(0)
        removed += self._sweep_chunk(chunk, now, purge=purge)
        self._log_drops(force=True)
        return removed

    async def expire_unmatched(self) -> int:
        """Delete unmatched feedback past its wait, oldest first; returns how many went.

        Reads the age index, not the table: cheap enough to run often, so bogus feedback
        leaves the disk minutes after it came rather than at the next full sweep.
        """
        expired = self.unmatched.expired(
            self._clock(), self.settings.unmatched_feedback_wait_seconds
        )
        for waiting in expired:
            self._delete(waiting.key, waiting.partition)
        self.stats["expired"] += len(expired)
        self._log_drops(force=True)
        return len(expired)

    def _scan(self) -> Iterator[Scanned]:
        store: Any = self.table.data  # faust's store classes: their internals are untyped
        dbs = getattr(store, "_dbs", None)
        if isinstance(dbs, dict):  # faust's RocksDB store: one database per partition
            offset_key = store.offset_key
            active = self._active_partitions()
            for partition, db in list(dbs.items()):
                if partition in active:  # not a standby copy of another worker's
                    for key, value in db.items():
                        if key != offset_key:
                            yield partition, key, value
        else:  # the memory store: a dict, copied because the agents change it meanwhile
            for key, value in list(store.data.items()):
                yield None, key, value

    def _sweep_chunk(self, chunk: list[Scanned], now: float, *, purge: bool) -> int:
        # No await in here: what is read again below is what is deleted or indexed.
        ttl = self.settings.ttl_seconds
        wait = self.settings.unmatched_feedback_wait_seconds
        active = self._active_partitions()
        removed = 0
        found: list[Waiting] = []
        for partition, key, raw in chunk:
            created = created_of(raw)
            entry = JoinEntry.decode(raw) if created is None or partition is None else None
            if entry is not None:
                created = entry.created
                partition = entry.partition if partition is None else partition
            if partition is None or partition not in active:
                continue  # written before entries named their partition, or moved away
            assert created is not None
            reason = None
            if now - created > ttl:
                reason = "expired"
            elif not has_prediction(raw):
                if now - created > wait:
                    reason = "expired"
                elif key not in self.unmatched and self.table.data.get(key) == raw:
                    # Not seen arriving (recovered after a restart or a rebalance). Read again:
                    # the scan's snapshot may predate an agent's drop or join of the entry.
                    found.append(Waiting(key, created, partition))
            elif purge:
                entry = entry or JoinEntry.decode(raw)
                if entry.prediction is not None and self._is_erased(entry.prediction):
                    reason = "erased"
            # Read again: an agent may have changed the entry since the chunk was read.
            if reason is not None and self.table.data.get(key) == raw:
                self._delete(key, partition)
                self.stats[reason] += 1
                if reason == "erased":
                    instruments.record_erased()
                removed += 1
        self._drop_unmatched(self.unmatched.merge(found))
        return removed

    def _active_partitions(self) -> set[int]:
        changelog = self.table.changelog_topic.get_topic_name()
        return {
            tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == changelog
        }

    async def _record_lag(self) -> None:
        await record_lag(self.app, self.group)

    async def publish_metrics(self) -> int:
        """Publish the windows that moved since the last call; returns how many."""
        published = 0
        for metrics in self.live.drain():
            instruments.record_live(metrics)
            await self._metrics.send(
                key=metrics.model_name.encode(),
                value=encode(metrics),
                headers=event_headers(metrics),
            )
            published += 1
        self.stats["metrics_published"] += published
        return published

    async def _on_revoked(self, sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        revoked = args[0] if args else kwargs.get("revoked", ())
        lost = {tp.partition for tp in revoked if tp.topic == self._by_model.get_topic_name()}
        gone = {model for model, part in self._model_partition.items() if part in lost}
        if gone:
            self.live.forget(gone)
            instruments.forget_live(gone)
            for model in gone:
                self._model_partition.pop(model, None)
        # The join table is co-partitioned with its sources: their partitions are its own.
        sources = {self.topics.predictions, self.topics.feedback}
        self.unmatched.forget_partitions({tp.partition for tp in revoked if tp.topic in sources})

    def _span(self, event: Any, event_id: str) -> Any:
        return consume_span(self._tracer, event.message, event_id, self.group)


def _rocksdb_options(settings: JoinerScope) -> dict[str, Any]:
    """RocksDB's memory per partition, bounded by settings (faust's default cache is 2 GiB)."""
    mib = 1024 * 1024
    return {
        "block_cache_size": settings.rocksdb_block_cache_mib * mib,
        "write_buffer_size": settings.rocksdb_write_buffer_mib * mib,
        "max_write_buffer_number": 2,
    }


def _traceparent(headers: Any) -> str | None:
    for key, value in headers or ():
        if key == "traceparent":
            return bytes(value).decode(errors="replace")
    return None


def _link_waiting_side(entry: JoinEntry | None, side: Side) -> None:
    """Link the current (join) span to the trace of the side that waited in the table.

    The span continues the arriving event's trace; the other side's trace is a second cause.
    """
    waiting = None
    if entry is not None:
        waiting = entry.feedback_trace if side == "prediction" else entry.prediction_trace
    if waiting is None:
        return
    other = trace.get_current_span(extract_context([("traceparent", waiting.encode())]))
    context = other.get_span_context()
    if context.is_valid:
        waited = "feedback" if side == "prediction" else "prediction"
        trace.get_current_span().add_link(context, {"loopmesh.link": waited})
