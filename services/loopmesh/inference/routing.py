"""Canary routing: per-model (stable, canary, weight), followed from the ``rollouts`` topic.

``RouteTable`` is pure logic: a request's arm comes from a stable hash of its key, salted with
the model and the canary version, so one entity sees one arm for a whole canary (and, as the
weight grows, entities already on the canary stay there). Routes are replaced whole (one dict
assignment), so a weight change never disturbs a request that already chose its version.

``RolloutFollower`` reads the compacted ``rollouts`` topic from the beginning with no consumer
group (every gateway replica needs every model's latest event), keeps the latest per model,
and reports when it has caught up with the end offsets seen at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from loopmesh.mesh.bus import client_options, describe_validation_error
from loopmesh.mesh.events import RolloutChanged
from loopmesh.mesh.settings import KafkaSettings

log = logging.getLogger(__name__)

Arm = Literal["stable", "canary", "pinned", "latest", "fallback"]
_SCALE = float(1 << 64)


def bucket(model_name: str, salt: int, key: str) -> float:
    """A stable, uniform number in [0, 1) for ``key`` (same inputs, same number, any process)."""
    digest = hashlib.blake2b(f"{model_name}\x00{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


@dataclass(frozen=True, slots=True)
class Route:
    """Where a model's traffic goes."""

    model_name: str
    stable_version: int | None
    canary_version: int | None
    canary_weight: float
    source: Literal["rollouts", "admin"]
    state: str = ""
    step: int = 0

    def choose(self, key: str | None) -> tuple[int, Arm] | None:
        """The version and arm for a request key; None when the route names no version.

        A request without a key is spread by weight at random (it cannot be sticky).
        """
        canary, stable = self.canary_version, self.stable_version
        if canary is not None and self.canary_weight > 0.0:
            if stable is None:
                return canary, "canary"
            point = bucket(self.model_name, canary, key if key else uuid.uuid4().hex)
            if point < self.canary_weight:
                return canary, "canary"
        if stable is not None:
            return stable, "stable"
        if canary is not None:
            return canary, "canary"
        return None


class RouteTable:
    """The routes in force, by model name."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self.applied_events = 0

    def get(self, model_name: str) -> Route | None:
        return self._routes.get(model_name)

    def set(self, route: Route) -> None:
        self._routes[route.model_name] = route

    def all(self) -> dict[str, Route]:
        return dict(self._routes)

    def apply(self, event: RolloutChanged) -> Route:
        """Make ``event`` the model's route (the latest event per model wins)."""
        weight = event.canary_weight if event.canary_version is not None else 0.0
        route = Route(
            model_name=event.model_name,
            stable_version=event.stable_version,
            canary_version=event.canary_version,
            canary_weight=weight,
            source="rollouts",
            state=event.state,
            step=event.step,
        )
        self.set(route)
        self.applied_events += 1
        return route


DeadLetterFn = Callable[[str, int, int, bytes | None, bytes | None, str], Awaitable[None]]
"""(topic, partition, offset, key, value, reason) -> dead-letter it."""


class RolloutFollower:
    """Keeps a ``RouteTable`` equal to the latest ``rollouts`` event of every model."""

    def __init__(
        self,
        settings: KafkaSettings,
        topic: str,
        table: RouteTable,
        *,
        dead_letter: DeadLetterFn | None = None,
    ) -> None:
        self.topic = topic
        self.table = table
        self._dead_letter = dead_letter
        options = client_options(settings, "inference-routing")
        options.update(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
        self._consumer = AIOKafkaConsumer(topic, **options)
        self._settings = settings
        self.caught_up = asyncio.Event()
        self.invalid = 0
        self._task: asyncio.Task[None] | None = None
        self._end: dict[TopicPartition, int] = {}

    async def start(self, catchup_timeout: float) -> None:
        """Start reading from the beginning; return once caught up with the end offsets."""
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="rollouts-follower")
        try:
            await asyncio.wait_for(self.caught_up.wait(), catchup_timeout)
        except TimeoutError as exc:
            await self.stop()
            raise RuntimeError(
                f"{self.topic}: not caught up within {catchup_timeout:.0f}s; refusing to serve "
                "with unknown routes"
            ) from exc

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._consumer.stop()

    async def _check_caught_up(self) -> None:
        if self.caught_up.is_set():
            return
        if not self._end:
            # Without a group every partition is assigned to us once metadata arrives.
            assigned = self._consumer.assignment()
            if not assigned:
                return
            self._end = await self._consumer.end_offsets(list(assigned))
        for tp, end in self._end.items():
            if await self._consumer.position(tp) < end:
                return
        self.caught_up.set()

    async def _run(self) -> None:
        while True:
            wait_ms = 500 if self.caught_up.is_set() else 50
            batches = await self._consumer.getmany(timeout_ms=wait_ms, max_records=500)
            for records in batches.values():
                for record in records:
                    await self._handle(record)
            await self._check_caught_up()

    async def _handle(self, record: object) -> None:
        value: bytes | None = getattr(record, "value", None)
        if value is None:
            return  # a tombstone: compaction removing a model; nothing to route
        try:
            event = RolloutChanged.model_validate_json(value)
        except ValidationError as err:
            self.invalid += 1
            reason = describe_validation_error(err)
            offset = getattr(record, "offset", -1)
            log.warning("invalid RolloutChanged at offset %s: %s", offset, reason)
            if self._dead_letter is not None:
                await self._dead_letter(
                    self.topic,
                    int(getattr(record, "partition", 0)),
                    int(getattr(record, "offset", 0)),
                    getattr(record, "key", None),
                    value,
                    reason,
                )
            return
        route = self.table.apply(event)
        log.info(
            "route %s: stable=%s canary=%s weight=%.3f (%s step %d)",
            route.model_name,
            route.stable_version,
            route.canary_version,
            route.canary_weight,
            route.state,
            route.step,
        )
