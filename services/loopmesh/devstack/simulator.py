"""The built-in traffic simulator: a product app and a calling backend in one.

Entities produce events (Ingest), a backend asks for predictions (Predict), and feedback
follows from a hidden labelling rule (Submit) that switches partway through (concept
drift). Everything goes through the public gRPC APIs, exactly as real apps would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import numpy as np

from loopmesh.devstack.synthetic import SyntheticWorld
from loopmesh.gen.loopmesh.v1 import (
    feedback_pb2,
    feedback_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulatorConfig:
    """How much traffic, how soon feedback follows, and when the rule drifts."""

    model_name: str
    requests_per_second: float = 40.0
    tick_seconds: float = 0.5
    feedback_delay_seconds: float = 1.0
    rpc_timeout_seconds: float = 5.0


@dataclass
class SimulatorStats:
    ingested: int = 0
    predicted: int = 0
    feedback_sent: int = 0
    errors: int = 0


class TrafficSimulator:
    """Drives the mesh's front doors until stopped."""

    def __init__(
        self,
        world: SyntheticWorld,
        config: SimulatorConfig,
        *,
        ingestion: str,
        inference: str,
        feedback: str,
        on_drift: Callable[[datetime], None] = lambda _: None,
        metadata: tuple[tuple[str, str], ...] = (),
        seed: int = 1,
    ) -> None:
        self.world = world
        self.config = config
        self.stats = SimulatorStats()
        self._addresses = (ingestion, inference, feedback)
        self._on_drift = on_drift
        self._metadata = metadata
        self._rng = np.random.default_rng(seed)
        self._pending: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        ingestion, inference, feedback = (grpc.aio.insecure_channel(a) for a in self._addresses)
        self._ingest = ingestion_pb2_grpc.IngestionServiceStub(ingestion)
        self._predict = inference_pb2_grpc.InferenceServiceStub(inference)
        self._feedback = feedback_pb2_grpc.FeedbackServiceStub(feedback)
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                tick = loop.time()
                n = max(1, round(self.config.requests_per_second * self.config.tick_seconds))
                try:
                    await self._one_tick(n)
                except grpc.aio.AioRpcError as err:
                    self.stats.errors += 1
                    log.warning("simulator call failed: %s %s", err.code().name, err.details())
                elapsed = loop.time() - tick
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        stop.wait(), timeout=max(0.0, self.config.tick_seconds - elapsed)
                    )
        finally:
            for task in list(self._pending):
                task.cancel()
            for channel in (ingestion, inference, feedback):
                await channel.close()

    def inject_drift(self) -> None:
        """Switch the hidden labelling rule; features keep their distribution."""
        self.world.set_rule(1)
        self._on_drift(datetime.now(UTC))

    async def _one_tick(self, n: int) -> None:
        batch = self.world.sample(n, self._rng)
        now = datetime.now(UTC)
        events = []
        for entity_id, row in zip(batch.entity_ids, batch.feature_dicts(), strict=True):
            event = ingestion_pb2.InteractionEvent(
                event_id=uuid.uuid4().hex,
                entity_id=entity_id,
                event_type="view",
                numeric={"value": row["price"], "amount": row["discount"]},
                categorical={"category": "hour-" + ("day" if row["hour_sin"] > 0 else "night")},
            )
            event.event_time.FromDatetime(now)
            events.append(event)
        await self._ingest.Ingest(
            ingestion_pb2.IngestRequest(events=events),
            timeout=self.config.rpc_timeout_seconds,
            metadata=self._metadata,
        )
        self.stats.ingested += len(events)

        calls = [
            self._predict.Predict(
                inference_pb2.PredictRequest(
                    entity_id=entity_id, context=row, model_name=self.config.model_name
                ),
                timeout=self.config.rpc_timeout_seconds,
                metadata=self._metadata,
            )
            for entity_id, row in zip(batch.entity_ids, batch.feature_dicts(), strict=True)
        ]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        labels = self.world.draw_labels(batch, self._rng)
        answered: list[tuple[str, int]] = []
        for reply, label in zip(replies, labels, strict=True):
            if isinstance(reply, BaseException):
                self.stats.errors += 1
                continue
            answered.append((reply.prediction_id, int(label)))
        self.stats.predicted += len(answered)
        task = asyncio.create_task(self._send_feedback_later(answered))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send_feedback_later(self, answered: list[tuple[str, int]]) -> None:
        await asyncio.sleep(self.config.feedback_delay_seconds)  # users answer later
        now = datetime.now(UTC)
        calls = []
        for prediction_id, label in answered:
            item = feedback_pb2.Feedback(
                event_id=uuid.uuid4().hex, prediction_id=prediction_id, label=label
            )
            item.event_time.FromDatetime(now)
            calls.append(
                self._feedback.Submit(
                    feedback_pb2.SubmitRequest(feedback=item),
                    timeout=self.config.rpc_timeout_seconds,
                    metadata=self._metadata,
                )
            )
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                self.stats.errors += 1
            else:
                self.stats.feedback_sent += 1
