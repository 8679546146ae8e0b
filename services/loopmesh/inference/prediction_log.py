"""The prediction log: answered predictions go to ``predictions`` off the hot path.

``log`` only appends to a bounded asyncio queue (never awaits); a background task drains it
in batches, builds the ``PredictionLogged`` events there (validation costs stay off the
request) and produces each batch with acks. When the queue is full, the response still goes
out and ``dropped`` counts the lost record; a failing Kafka is retried with backoff while the
queue absorbs what it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from opentelemetry import context as otel_context
from pydantic import ValidationError

from loopmesh.inference.core import PredictionRecord
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.events import PredictionLogged, ShadowScore
from loopmesh.mesh.topics import Topic

log = logging.getLogger(__name__)


class PredictionLogger:
    """``PredictionSink`` that batches records into Kafka."""

    def __init__(
        self,
        producer: EventProducer,
        topic: Topic,
        *,
        queue_size: int,
        batch_size: int,
        linger_s: float = 0.02,
        retry_backoff_s: float = 0.5,
    ) -> None:
        self.topic = topic
        self._producer = producer
        # Each record with the trace context of its Predict, restored when it is produced.
        self._queue: asyncio.Queue[tuple[PredictionRecord, otel_context.Context]] = asyncio.Queue(
            maxsize=queue_size
        )
        self._batch_size = batch_size
        self._backoff = retry_backoff_s
        self._linger = linger_s
        self._task: asyncio.Task[None] | None = None
        self.logged = 0
        self.dropped = 0
        self.invalid = 0

    def log(self, record: PredictionRecord, context: otel_context.Context | None = None) -> bool:
        """Queue ``record`` with the trace ``context`` of its Predict (None: the current one);
        False when the queue is full."""
        if context is None:
            context = otel_context.get_current()
        try:
            self._queue.put_nowait((record, context))
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        return True

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="prediction-log")

    async def stop(self, timeout: float = 10.0) -> None:
        """Flush what is queued (within ``timeout``), then stop the drain task."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue.qsize():
            log.warning("%d predictions not logged at shutdown", self._queue.qsize())

    async def _run(self) -> None:
        while True:
            records = [await self._queue.get()]
            if self._linger > 0 and self._queue.qsize() < self._batch_size:
                # One produce per batch, not per prediction: wait briefly for company.
                await asyncio.sleep(self._linger)
            while len(records) < self._batch_size:
                try:
                    records.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            events = [(e, ctx) for record, ctx in records if (e := self._event(record)) is not None]
            while True:
                try:
                    # One publish per batch (a span per event cost more than the rest of the
                    # log): each message still carries its own Predict's trace, which the
                    # joiner continues.
                    await self._producer.publish_many(
                        self.topic, [e for e, _ in events], contexts=[c for _, c in events]
                    )
                    break
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("logging %d predictions failed; retrying", len(events))
                    await asyncio.sleep(self._backoff)
            self.logged += len(events)
            for _ in records:
                self._queue.task_done()

    def _event(self, record: PredictionRecord) -> PredictionLogged | None:
        try:
            return PredictionLogged(
                prediction_id=record.prediction_id,
                model_name=record.model_name,
                model_version=record.model_version,
                entity_id=record.entity_id,
                features=record.features,
                categorical=record.categorical,
                score=record.score,
                outputs=list(record.outputs),
                task=record.task,
                latency_ms=record.latency_ms,
                event_time=record.event_time,
                shadow=[
                    ShadowScore(model_version=a.model_version, score=a.score, outputs=[*a.outputs])
                    for a in record.shadow
                ],
            )
        except ValidationError as err:
            # Cannot happen for records the Predictor builds; never let one stop the log.
            self.invalid += 1
            log.error("unloggable prediction %s: %s", record.prediction_id, err)
            return None
