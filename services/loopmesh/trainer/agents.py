"""Kafka adapters of the trainer: examples into the dataset, erasures, live metrics, rollouts.

``ExampleSink`` batches ``training.examples`` into parquet files and commits offsets only
after a file is durable (the bus consumer commits per message, which would acknowledge rows
still in memory). Malformed messages are dead-lettered like everywhere else. The other
topics use the bus consumer: each handler's effect is durable or in memory by design.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind
from pydantic import ValidationError

from loopmesh.mesh.bus import (
    Delivery,
    EventProducer,
    client_options,
    dead_letter,
    describe_validation_error,
)
from loopmesh.mesh.events import (
    EntityErased,
    LabelledExample,
    RolloutChanged,
    VersionMetrics,
)
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.telemetry import extract_context, tracer
from loopmesh.mesh.topics import Topic
from loopmesh.trainer.core import MAX_EXAMPLE_LINKS, TrainerCore, with_example_traces
from loopmesh.trainer.dataset import Dataset

log = logging.getLogger(__name__)


class ExampleSink:
    """Consumes LabelledExample events into the dataset, a parquet file per flush."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: Topic,
        group_id: str,
        dataset: Dataset,
        *,
        model_name: str,
        dlq: EventProducer,
        flush_rows: int,
        flush_seconds: float,
        on_stored: Callable[[int], Any] = lambda n: None,
    ) -> None:
        options = client_options(kafka, "trainer")
        options.update(
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        self.topic = topic
        self.group_id = group_id
        self._consumer = AIOKafkaConsumer(**options)
        self._dataset = dataset
        self._model_name = model_name
        self._dlq = dlq
        self._flush_rows = flush_rows
        self._flush_seconds = flush_seconds
        self._on_stored = on_stored
        self._buffer: list[tuple[TopicPartition, LabelledExample]] = []
        self._offsets: dict[TopicPartition, int] = {}
        self._traces: deque[SpanContext] = deque(maxlen=MAX_EXAMPLE_LINKS)
        """Trace contexts of the newest buffered examples (from their headers), for links."""
        self._first_at: float | None = None
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._tracer = tracer("loopmesh.trainer.dataset")
        self.stored = 0
        self.dead_lettered = 0
        self.skipped = 0

    async def start(self) -> None:
        self._consumer.subscribe([self.topic.name], listener=_FlushOnRevoke(self))
        await self._consumer.start()

    async def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(Exception):
            await self.flush()
        await self._consumer.stop()

    async def run(self) -> None:
        """Consume until ``stop``."""
        poll_ms = int(min(500.0, self._flush_seconds * 1000))
        while not self._stopping.is_set():
            batches = await self._consumer.getmany(timeout_ms=poll_ms, max_records=self._flush_rows)
            for tp, records in batches.items():
                for record in records:
                    await self._take(tp, record)
            due = self._first_at is not None and (
                len(self._buffer) >= self._flush_rows
                or time.monotonic() - self._first_at >= self._flush_seconds
            )
            if due:
                try:
                    await self.flush()
                except Exception:
                    # Nothing was committed; the buffer is kept and the next round retries.
                    log.exception("storing %d examples failed; retrying", len(self._buffer))
                    await asyncio.sleep(1.0)

    async def _take(self, tp: TopicPartition, record: Any) -> None:
        try:
            example = LabelledExample.model_validate_json(record.value or b"")
        except ValidationError as err:
            await self._dead_letter(record, describe_validation_error(err))
        else:
            if example.model_name == self._model_name:
                self._buffer.append((tp, example))
                traced = trace.get_current_span(extract_context(record.headers))
                if traced.get_span_context().is_valid:
                    self._traces.append(traced.get_span_context())
            else:  # another model's trainer stores it
                self.skipped += 1
        self._offsets[tp] = record.offset + 1
        if self._first_at is None:
            self._first_at = time.monotonic()

    async def flush(self) -> int:
        """Write the buffered examples as new files, then commit their offsets."""
        async with self._lock:
            # Copies: records taken while the file is written stay for the next flush, and
            # on failure nothing is dropped (the offsets were not committed either).
            buffer, offsets = list(self._buffer), dict(self._offsets)
            traces = list(self._traces)
            if not offsets:
                return 0
            with self._tracer.start_as_current_span(
                f"{self.topic.name} store",
                kind=SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.destination.name": self.topic.name,
                    "messaging.batch.message_count": len(buffer),
                },
                links=[Link(t) for t in traces],
            ) as stored:
                if buffer:
                    await asyncio.to_thread(self._dataset.append, [e for _, e in buffer])
                await self._consumer.commit(offsets)
            del self._buffer[: len(buffer)]
            self._traces.clear()
            for tp, offset in offsets.items():
                if self._offsets.get(tp) == offset:
                    del self._offsets[tp]
            self._first_at = time.monotonic() if self._offsets else None
            self.stored += len(buffer)
        if buffer:
            # A run this triggers links to the store span and to the examples' traces.
            token = otel_context.attach(
                with_example_traces(traces, trace.set_span_in_context(stored))
            )
            try:
                self._on_stored(len(buffer))
            finally:
                otel_context.detach(token)
        return len(buffer)

    async def release(self, revoked: set[TopicPartition]) -> None:
        """Before partitions move away: store and commit, or else forget their records."""
        try:
            await self.flush()
        except Exception:
            # Their offsets stay uncommitted, so the next owner reads them again.
            log.exception("flush before rebalance failed; leaving %s to the next owner", revoked)
            async with self._lock:
                self._buffer = [(tp, e) for tp, e in self._buffer if tp not in revoked]
                for tp in revoked:
                    self._offsets.pop(tp, None)

    async def _dead_letter(self, record: Any, reason: str) -> None:
        await dead_letter(self._dlq, record, group=self.group_id, reason=reason)
        self.dead_lettered += 1


class _FlushOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Write and commit what is buffered before partitions move to another member."""

    def __init__(self, sink: ExampleSink) -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._sink.release(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None


class TrainerHandlers:
    """Bus-consumer handlers that feed the core."""

    def __init__(self, core: TrainerCore) -> None:
        self.core = core

    async def on_erased(self, event: EntityErased, delivery: Delivery) -> None:
        # Durable before the offset commits: recorded (fsync), then purged from the files.
        await asyncio.to_thread(self._erase, event.entity_id)

    def _erase(self, entity_id: str) -> None:
        self.core.dataset.record_erasures([entity_id])
        removed = self.core.dataset.purge_erased()
        log.info("erased entity %s: %d stored examples removed", entity_id, removed)

    async def on_metrics(self, event: VersionMetrics, delivery: Delivery) -> None:
        self.core.observe_metrics(event)

    async def on_rollout(self, event: RolloutChanged, delivery: Delivery) -> None:
        self.core.observe_rollout(event)
