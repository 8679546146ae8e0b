"""Kafka adapters of the rollout controller: replay, follow, publish.

- ``rollouts`` and ``rollout.policies`` are read once from the beginning at start-up
  (``read_all``): they are the controller's state.
- ``metrics.live`` is followed without a consumer group from ``metrics_lookback_seconds`` ago
  (``MetricsFollower``): the figures are state too, rebuilt on every start, so committed
  offsets would only lose them. Malformed messages go to ``<topic>.dlq``; a restart may
  dead-letter one again (a DeadLetter names topic, partition and offset to deduplicate).
- ``models.published`` is consumed by a group with ``loopmesh.mesh.bus.EventConsumer`` (commit
  after the handler, DLQ), wired up in ``app``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from loopmesh.mesh.bus import EventProducer, client_options, dead_letter, describe_validation_error
from loopmesh.mesh.events import Event, RolloutChanged
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.telemetry import extract_context, tracer
from loopmesh.mesh.topics import Topic
from loopmesh.rollout.policy import PolicySet

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Event)
_tracer = tracer("loopmesh.rollout.bus")
SERVICE = "rollout"
_METADATA_WAIT = 30.0


class KafkaPublisher:
    """Publishes rollout changes and policy overrides, waiting for the broker's ack."""

    def __init__(self, producer: EventProducer, rollouts: Topic, policies: Topic) -> None:
        self._producer = producer
        self._rollouts = rollouts
        self._policies = policies

    async def rollout_changed(self, event: RolloutChanged) -> None:
        await self._producer.publish(self._rollouts, event)

    async def policy_set(self, event: PolicySet) -> None:
        await self._producer.publish(self._policies, event)


async def _assigned_consumer(settings: KafkaSettings, topic: str) -> AIOKafkaConsumer:
    """A group-less consumer with every partition of ``topic`` assigned (not yet positioned)."""
    # Subscribed without a group, aiokafka assigns every partition once metadata arrives
    # (a topic declared a moment ago may take a little while to show up).
    consumer = AIOKafkaConsumer(
        topic,
        **client_options(settings, SERVICE),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        metadata_max_age_ms=1000,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + _METADATA_WAIT
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic!r} has no partitions (does it exist?)")
            await asyncio.sleep(0.05)
    except BaseException:
        await consumer.stop()
        raise
    return consumer


async def _caught_up(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


async def read_all(
    settings: KafkaSettings,
    topic: Topic,
    model: type[E],
    *,
    timeout: float,
    dlq: EventProducer | None = None,
) -> list[E]:
    """Every valid event of ``topic`` from the beginning to the end offsets seen at the call.

    Invalid messages are skipped and, given ``dlq``, dead-lettered under an id fixed by their
    offset: every start re-reads them, and DLQ readers drop the copies by event id.
    """
    consumer = await _assigned_consumer(settings, topic.name)
    out: list[E] = []
    deadline = time.monotonic() + timeout
    try:
        tps = list(consumer.assignment())
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while not await _caught_up(consumer, ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic.name} did not finish within {timeout}s")
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    if record.value is None:
                        continue  # a tombstone of the compacted topic, not a message
                    try:
                        out.append(model.model_validate_json(record.value))
                    except ValidationError as err:
                        # Only this service writes these topics; say so and go on.
                        reason = describe_validation_error(err)
                        log.error("skipping invalid %s@%d: %s", topic.name, record.offset, reason)
                        if dlq is not None:
                            where = f"kafka:{record.topic}/{record.partition}/{record.offset}"
                            await dead_letter(
                                dlq,
                                record,
                                group=f"{SERVICE}-state-replay",
                                reason=reason,
                                event_id=uuid.uuid5(uuid.NAMESPACE_URL, where).hex,
                            )
    finally:
        await consumer.stop()
    return out


class MetricsFollower(Generic[E]):
    """Follows a topic from a point in time, handing valid events to ``handler``."""

    def __init__(
        self,
        settings: KafkaSettings,
        topic: Topic,
        handler: Callable[[E], Awaitable[None]],
        *,
        dlq: EventProducer,
        lookback_seconds: float,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self._handler = handler
        self._dlq = dlq
        self._lookback = lookback_seconds
        self._consumer: AIOKafkaConsumer | None = None
        self._ends: dict[TopicPartition, int] = {}
        self.caught_up = asyncio.Event()
        """Set once the events that existed at start (within the lookback) were handled."""
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        consumer = await _assigned_consumer(self.settings, self.topic.name)
        self._consumer = consumer
        tps = list(consumer.assignment())
        since_ms = int((time.time() - self._lookback) * 1000)
        offsets = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        self._ends = await consumer.end_offsets(tps)
        for tp in tps:
            found = offsets.get(tp)
            consumer.seek(tp, found.offset if found is not None else self._ends[tp])

    async def stop(self) -> None:
        self._stopping.set()
        if self._consumer is not None:
            await self._consumer.stop()

    async def run(self) -> None:
        consumer = self._consumer
        assert consumer is not None, "start() first"
        while not self._stopping.is_set():
            if not self.caught_up.is_set() and await _caught_up(consumer, self._ends):
                self.caught_up.set()
            batches = await consumer.getmany(timeout_ms=300, max_records=1000)
            for records in batches.values():
                for record in records:
                    await self._handle(record)

    async def _handle(self, record: Any) -> None:
        try:
            event = self.topic.value_type.model_validate_json(record.value or b"")
        except ValidationError as err:
            await self._dead_letter(record, describe_validation_error(err))
            return
        with _tracer.start_as_current_span(
            f"{record.topic} process",
            context=extract_context(record.headers),
            attributes={"messaging.system": "kafka", "messaging.message.id": event.event_id},
        ):
            await self._handler(event)  # type: ignore[arg-type]

    async def _dead_letter(self, record: Any, reason: str) -> None:
        await dead_letter(self._dlq, record, group=f"{SERVICE}-follower", reason=reason)
