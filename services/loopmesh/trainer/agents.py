"""Kafka adapters of the trainer: examples into the dataset, erasures, rollouts.

``example_sink`` stores ``training.examples`` into parquet files with the kernel's
``BatchSink`` (offsets committed only after a file is durable), then shows the stored
examples to the drift detector. The other topics use the bus consumer: each handler's effect
is durable or in memory by design.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace import SpanContext

from loopmesh.mesh.batch import BatchSink, Taken
from loopmesh.mesh.bus import Delivery, EventProducer
from loopmesh.mesh.events import (
    PRIMARY_JOIN_KEY,
    EntityErased,
    LabelledExample,
    RolloutChanged,
)
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import Topic
from loopmesh.trainer.core import TrainerCore, with_example_traces
from loopmesh.trainer.dataset import Dataset

log = logging.getLogger(__name__)


def example_sink(
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
    observe: Callable[[Sequence[LabelledExample]], Any] = lambda examples: None,
) -> BatchSink[LabelledExample]:
    """``training.examples`` of ``model_name`` into the dataset, a parquet file per batch;
    ``observe`` sees each batch once it is durable (the drift detector)."""

    async def store(taken: Sequence[Taken[LabelledExample]]) -> None:
        batch = [t.event for t in taken]
        await asyncio.to_thread(dataset.append, batch)
        try:
            observe(batch)
        except Exception:
            # Stored is stored: a detector failure must not redeliver (and re-store) them.
            log.exception("observing %d stored examples failed", len(batch))

    def stored(count: int, traces: Sequence[SpanContext]) -> None:
        # A run this triggers links to the store span and to the examples' traces.
        token = otel_context.attach(with_example_traces(traces))
        try:
            on_stored(count)
        finally:
            otel_context.detach(token)

    return BatchSink(
        kafka,
        topic,
        group_id,
        store,
        dlq=dlq,
        service="trainer",
        flush_rows=flush_rows,
        flush_seconds=flush_seconds,
        accept=lambda example: example.model_name == model_name,  # others: another trainer's
        on_stored=stored,
    )


class TrainerHandlers:
    """Bus-consumer handlers that feed the core."""

    def __init__(self, core: TrainerCore) -> None:
        self.core = core

    async def on_erased(self, event: EntityErased, delivery: Delivery) -> None:
        if event.join_key != PRIMARY_JOIN_KEY:
            return  # examples are keyed by entity_id; another entity kind has none here
        # Durable before the offset commits: recorded (fsync), then purged from the files.
        await asyncio.to_thread(self._erase, event.entity_id)

    def _erase(self, entity_id: str) -> None:
        self.core.dataset.record_erasures([entity_id])
        removed = self.core.dataset.purge_erased()
        log.info("erased entity %s: %d stored examples removed", entity_id, removed)

    async def on_rollout(self, event: RolloutChanged, delivery: Delivery) -> None:
        self.core.observe_rollout(event)
