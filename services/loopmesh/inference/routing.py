"""Canary routing: per-model (stable, canary, weight, shadows), followed from ``rollouts``.

``RouteTable`` is pure logic: a request's arm comes from a stable hash of its key, salted with
the model and the canary version, so one entity sees one arm for a whole canary (and, as the
weight grows, entities already on the canary stay there). Routes are replaced whole (one dict
assignment), so a weight change never disturbs a request that already chose its version.

``follow_routes`` keeps a table equal to the compacted ``rollouts`` topic: read from the
beginning with no consumer group (every gateway replica needs every model's latest event) by
the kernel's ``TopicFollower``, which reports when it caught up with the end offsets seen at
start.
"""

from __future__ import annotations

import hashlib
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from loopmesh.mesh.bus import Delivery, EventProducer
from loopmesh.mesh.events import RolloutChanged
from loopmesh.mesh.follow import TopicFollower
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import Topic

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
    shadows: tuple[int, ...] = ()
    """Candidates in shadow: scored on ``shadow_share`` of stable's requests, never answering."""
    shadow_share: float = 0.0

    def shadows_for(self) -> tuple[int, ...]:
        """The shadow versions that also score this request (a random ``shadow_share``)."""
        # Sampling, not security: which requests a shadow also scores.
        if not self.shadows or random.random() >= self.shadow_share:  # noqa: S311
            return ()
        return self.shadows

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
        self._listeners: list[Callable[[], None]] = []
        self.applied_events = 0

    def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every change (the data plane's route push)."""
        self._listeners.append(callback)

    def get(self, model_name: str) -> Route | None:
        return self._routes.get(model_name)

    def set(self, route: Route) -> None:
        self._routes[route.model_name] = route
        for callback in self._listeners:
            callback()

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
            shadows=tuple(event.shadow_versions),
            shadow_share=event.shadow_share if event.shadow_versions else 0.0,
        )
        self.set(route)
        self.applied_events += 1
        return route


def follow_routes(
    settings: KafkaSettings, topic: Topic, table: RouteTable, *, dlq: EventProducer | None = None
) -> TopicFollower[RolloutChanged]:
    """A follower that applies every ``RolloutChanged`` of ``topic`` to ``table``."""

    async def apply(event: RolloutChanged, _: Delivery) -> None:
        route = table.apply(event)
        log.info(
            "route %s: stable=%s canary=%s weight=%.3f shadows=%s (%s step %d)",
            route.model_name,
            route.stable_version,
            route.canary_version,
            route.canary_weight,
            list(route.shadows),
            route.state,
            route.step,
        )

    return TopicFollower(settings, topic, apply, service="inference", dlq=dlq)
