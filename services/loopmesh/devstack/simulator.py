"""The built-in traffic simulator: a product app and a calling backend in one.

Entities produce events (Ingest), a backend asks for predictions (Predict), and feedback
follows from a hidden labelling rule (Submit) that switches partway through (concept
drift). Everything goes through the public gRPC APIs with the client SDK
(``loopmesh.client``), exactly as real apps would: event ids set before the first attempt,
retries on UNAVAILABLE, a deadline on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from pydantic import SecretStr

from loopmesh.client import AsyncClient, CallError, ClientConfig, Event, Feedback, RetryPolicy
from loopmesh.devstack.synthetic import SyntheticWorld

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulatorConfig:
    """How much traffic, how soon feedback follows, and when the rule drifts."""

    model_name: str
    requests_per_second: float = 40.0
    tick_seconds: float = 0.5
    feedback_delay_seconds: float = 1.0
    rpc_timeout_seconds: float = 5.0
    rpc_attempts: int = 3
    """Attempts of one call (the client retries UNAVAILABLE with the same event ids)."""


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
        token: str | None = None,
        seed: int = 1,
    ) -> None:
        self.world = world
        self.config = config
        self.stats = SimulatorStats()
        self._client_config = ClientConfig(
            ingestion_url=ingestion,
            inference_url=inference,
            feedback_url=feedback,
            token=None if token is None else SecretStr(token),
            deadline_s=config.rpc_timeout_seconds,
            stream_deadline_s=config.rpc_timeout_seconds,
            retry=RetryPolicy(
                max_attempts=config.rpc_attempts, total_timeout_s=config.rpc_timeout_seconds
            ),
            tracing=False,
        )
        self._on_drift = on_drift
        self._rng = np.random.default_rng(seed)
        self._pending: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        self._client = AsyncClient(self._client_config)
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                tick = loop.time()
                n = max(1, round(self.config.requests_per_second * self.config.tick_seconds))
                try:
                    await self._one_tick(n)
                except CallError as err:
                    self.stats.errors += 1
                    log.warning("simulator call failed: %s", err)
                elapsed = loop.time() - tick
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        stop.wait(), timeout=max(0.0, self.config.tick_seconds - elapsed)
                    )
        finally:
            for task in list(self._pending):
                task.cancel()
            await asyncio.gather(*self._pending, return_exceptions=True)
            await self._client.close()

    def inject_drift(self) -> None:
        """Switch the hidden labelling rule; features keep their distribution."""
        self.world.set_rule(1)
        self._on_drift(datetime.now(UTC))

    async def _one_tick(self, n: int) -> None:
        batch = self.world.sample(n, self._rng)
        now = datetime.now(UTC)
        rows = batch.feature_dicts()
        events = [
            Event(
                entity_id=entity_id,
                event_type="view",
                numeric={"value": row["price"], "amount": row["discount"]},
                categorical={"category": "hour-" + ("day" if row["hour_sin"] > 0 else "night")},
                event_time=now,
            )
            for entity_id, row in zip(batch.entity_ids, rows, strict=True)
        ]
        await self._client.ingest(events)
        self.stats.ingested += len(events)

        calls = [
            self._client.predict(entity_id, context=row, model_name=self.config.model_name)
            for entity_id, row in zip(batch.entity_ids, rows, strict=True)
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
        if not answered:
            return
        now = datetime.now(UTC)
        items = [
            Feedback(prediction_id=prediction_id, label=label, event_time=now)
            for prediction_id, label in answered
        ]
        try:
            result = await self._client.submit_many(items)
        except CallError as err:
            self.stats.errors += len(items)
            log.warning("simulator feedback failed: %s", err)
            return
        self.stats.feedback_sent += result.accepted + result.duplicates
        self.stats.errors += result.rejected
