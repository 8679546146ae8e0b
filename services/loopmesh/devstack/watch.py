"""Follows the mesh's topics (as any Kafka tool could) and folds them into a LoopState."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from loopmesh.devstack.state import LoopState
from loopmesh.mesh.bus import client_options
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import (
    EVENTS_RAW,
    FEEDBACK,
    METRICS_LIVE,
    MODELS_PUBLISHED,
    PREDICTIONS,
    ROLLOUTS,
    TRAINING_EXAMPLES,
    Topic,
)

log = logging.getLogger(__name__)
WATCHED: tuple[Topic, ...] = (
    EVENTS_RAW,
    PREDICTIONS,
    FEEDBACK,
    TRAINING_EXAMPLES,
    METRICS_LIVE,
    MODELS_PUBLISHED,
    ROLLOUTS,
)


class Watcher:
    """Reads every watched topic without a consumer group; ignores events older than ``since``."""

    def __init__(self, settings: KafkaSettings, state: LoopState, since: datetime) -> None:
        self.state = state
        self.since = since
        self._by_name = {t.name: t for t in WATCHED}
        self._consumer = AIOKafkaConsumer(
            *self._by_name,
            **client_options(settings, "loop-watch"),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop reading and close the consumer.

        Waits for the reader with ``asyncio.wait``, which neither raises the reader's error nor
        swallows a cancellation of the caller (``suppress(CancelledError)`` would do both).
        """
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled() and (error := task.exception()) is not None:
                log.warning("the watcher had stopped reading: %r", error)
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=500, max_records=2000)
            now = time.monotonic()
            for tp, records in batches.items():
                topic = self._by_name[tp.topic]
                for record in records:
                    try:
                        event = topic.value_type.model_validate_json(record.value or b"")
                    except ValidationError:
                        continue  # the owning consumer dead-letters it; the view skips it
                    if event.event_time >= self.since:
                        self.state.apply(event, now)
