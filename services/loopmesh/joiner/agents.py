"""The joiner: a faust app pairing ``predictions`` with ``feedback`` by prediction_id.

Both topics are keyed by prediction_id and co-partitioned with the join table's changelog:
an entry is written to the changelog partition its events arrive on (faust checks that the
partition counts match) and recovers with it. The pairing rules are in ``core``; this module
only moves bytes: decode (dead-lettering what does not validate), apply, emit.

Each joined example goes to ``training.examples`` (keyed by entity) and to an internal topic
keyed by model name, whose consumer keeps the live sliding-window metrics per version and
publishes them to ``metrics.live``: keying by model puts all versions of a model on one
worker, so every version's window is whole even with many joiner workers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from opentelemetry import trace
from pydantic import ValidationError

from loopmesh.joiner import instruments
from loopmesh.joiner.core import JoinEntry, Outcome, on_feedback, on_prediction
from loopmesh.joiner.live import LiveMetrics
from loopmesh.joiner.settings import JoinerScope
from loopmesh.mesh.bus import consume_span, declare_topics, encode, event_headers
from loopmesh.mesh.events import FeedbackEvent, LabelledExample, PredictionLogged
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.streams import decode_or_dead_letter, faust_app, record_lag
from loopmesh.mesh.telemetry import extract_context, tracer
from loopmesh.mesh.topics import Topic

log = logging.getLogger(__name__)

Step = Callable[..., tuple[JoinEntry, Outcome, LabelledExample | None]]
"""``step(entry, now=..., offset=...)``: a pairing transition with its event bound."""
Side = Literal["prediction", "feedback"]


class Joiner:
    """The faust app with its join table, agents and timers; ``start``/``stop`` in any loop."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: JoinerScope,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
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
        partitions = kafka.default_partitions
        # Raw bytes both ways, so recovery yields exactly what was written.
        self.table = self.app.Table(
            "joins",
            default=None,
            key_type=bytes,
            value_type=bytes,
            partitions=partitions,
            on_changelog_event=self._on_changelog_event,
            help="prediction_id -> JoinEntry (JSON)",
        )
        self._predictions = self.app.topic(topics.predictions)
        self._feedback = self.app.topic(topics.feedback)
        self._examples = self.app.topic(topics.examples)
        self._metrics = self.app.topic(topics.metrics)
        self._by_model_topic = Topic(
            f"{settings.app_id}-examples-by-model", LabelledExample, "model_name"
        )
        self._by_model = self.app.topic(
            self._by_model_topic.name, internal=True, partitions=partitions
        )
        self._kafka = kafka
        self.live = LiveMetrics(settings.metrics_window_seconds, settings.metrics_max_points)
        self.stats: Counter[str] = Counter()
        self._created: dict[bytes, float] = {}
        self._partition: dict[bytes, int] = {}
        self._model_partition: dict[str, int] = {}
        self.app.agent(self._predictions, name="joiner-predictions")(self._on_predictions)
        self.app.agent(self._feedback, name="joiner-feedback")(self._on_feedback)
        self.app.agent(self._by_model, name="joiner-live")(self._on_examples)
        self.app.timer(settings.sweep_interval_seconds, name="joiner-sweep")(self.sweep)
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
        await declare_topics(self._kafka, [self._by_model_topic], with_dlq=False)
        await self.app.start()

    async def stop(self) -> None:
        await self.app.stop()

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
                    on_prediction, prediction=prediction, ttl=self.settings.ttl_seconds
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
                    reward_threshold=self.settings.reward_threshold,
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
        if event.message.key != key:
            # Still joined, but state may sit on another partition than its events.
            self.stats["key_mismatch"] += 1
        raw = self.table.get(key)
        entry = JoinEntry.decode(raw) if raw is not None else None
        _link_waiting_side(entry, side)
        new_entry, outcome, example = step(entry, now=self._clock(), offset=event.message.offset)
        if new_entry is not entry:
            # This side is (now) the entry's: keep its trace for the other side's join span.
            traceparent = _traceparent(event.message.headers)
            new_entry = new_entry.model_copy(update={f"{side}_trace": traceparent})
            self.table[key] = new_entry.encode()
            self._created[key] = new_entry.created
            self._partition[key] = event.message.partition
        self.stats[outcome.value] += 1
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

    # -- timers ------------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Delete join entries older than the TTL; returns how many went.

        Runs outside stream iteration, where faust cannot infer a key's partition, so the
        tombstone goes explicitly to the partition the entry was written to (or recovered
        from): the same place a delete inside the agent would have sent it.
        """
        now = self._clock()
        ttl = self.settings.ttl_seconds
        expired = []
        for key in list(self.table.data.keys()):
            created = self._created.get(key)
            if created is None:  # recovered from the changelog: read it once
                raw = self.table.data.get(key)
                if raw is None:
                    continue
                created = self._created[key] = JoinEntry.decode(raw).created
            if now - created > ttl and key in self._partition:
                expired.append(key)
        for key in expired:
            self.table.send_changelog(self._partition[key], key, None, value_serializer="raw")
            self.table.data.pop(key, None)
            self._created.pop(key, None)
            self._partition.pop(key, None)
        self.stats["expired"] += len(expired)
        return len(expired)

    async def _record_lag(self) -> None:
        await record_lag(self.app, self.group)

    async def _on_changelog_event(self, event: Any) -> None:
        # Recovery replays the changelog: remember where each entry lives for the sweeper.
        key = event.key
        if event.message.value is None:
            self._partition.pop(key, None)
            self._created.pop(key, None)
        else:
            self._partition[key] = event.message.partition

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

    def _span(self, event: Any, event_id: str) -> Any:
        return consume_span(self._tracer, event.message, event_id, self.group)


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
