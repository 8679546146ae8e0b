"""Follows the mesh's topics (as any Kafka tool could) and folds them into a LoopState."""

from __future__ import annotations

import logging
import time
from datetime import datetime

from loopmesh.devstack.state import LoopState
from loopmesh.mesh.bus import Delivery
from loopmesh.mesh.events import Event
from loopmesh.mesh.follow import TopicFollower
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
_CATCHUP_S = 60.0
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
    """Follows every watched topic without a consumer group (the kernel's ``TopicFollower``),
    folding events of this run (event time at or after ``since``) into the state."""

    def __init__(self, settings: KafkaSettings, state: LoopState, since: datetime) -> None:
        self.state = state
        self.since = since
        # No dead-lettering here: each topic's owning consumer does that; the view skips.
        self._followers = [
            TopicFollower(settings, topic, self._apply, service="loop-watch", since=since)
            for topic in WATCHED
        ]

    async def _apply(self, event: Event, _: Delivery) -> None:
        # The bootstrap set is published during the run but dated before it: not counted.
        if event.event_time >= self.since:
            self.state.apply(event, time.monotonic())

    async def start(self) -> None:
        for follower in self._followers:
            await follower.follow(catchup_timeout=_CATCHUP_S)

    async def stop(self) -> None:
        """Stop every reader and close its consumer."""
        for follower in self._followers:
            await follower.stop()
