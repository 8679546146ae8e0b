"""The traffic simulator: a product app and a calling backend in one, over a project's world.

Entities produce events (Ingest), a backend asks for predictions (Predict, with context and
categorical inputs), and feedback follows from the world's hidden rule (Submit: a label or a
value) that changes partway through (concept drift). Everything goes through the public gRPC
APIs with the client SDK (``loopmesh.client``), exactly as real apps would: event ids set
before the first attempt, retries on UNAVAILABLE, a deadline on every call. The world is the
project's (``devstack.worlds``).
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

from loopmesh.client import AsyncClient, CallError, ClientConfig, Feedback, RetryPolicy
from loopmesh.devstack.worlds import Outcome, World

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
        world: World,
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
        """Change the world's hidden rule; the inputs keep their distribution."""
        what = self.world.drift()
        log.info("drift: %s", what)
        self._on_drift(datetime.now(UTC))

    async def _one_tick(self, n: int) -> None:
        requests = self.world.sample(n, self._rng)
        events = [r.event for r in requests if r.event is not None]
        if events:
            await self._client.ingest(events)
            self.stats.ingested += len(events)

        calls = [
            self._client.predict(
                r.entity_id,
                context=r.context,
                categorical=r.categorical,
                model_name=self.config.model_name,
            )
            for r in requests
        ]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        outcomes = self.world.outcomes(requests, self._rng)
        answered: list[tuple[str, Outcome]] = []
        for reply, outcome in zip(replies, outcomes, strict=True):
            if isinstance(reply, BaseException):
                self.stats.errors += 1
                continue
            answered.append((reply.prediction_id, outcome))
        self.stats.predicted += len(answered)
        task = asyncio.create_task(self._send_feedback_later(answered))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send_feedback_later(self, answered: list[tuple[str, Outcome]]) -> None:
        await asyncio.sleep(self.config.feedback_delay_seconds)  # users answer later
        if not answered:
            return
        now = datetime.now(UTC)
        items = [
            Feedback(
                prediction_id=prediction_id,
                label=outcome.label,
                value=outcome.value,
                event_time=now,
            )
            for prediction_id, outcome in answered
        ]
        try:
            result = await self._client.submit_many(items)
        except CallError as err:
            self.stats.errors += len(items)
            log.warning("simulator feedback failed: %s", err)
            return
        self.stats.feedback_sent += result.accepted + result.duplicates
