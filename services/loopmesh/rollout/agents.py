"""Kafka adapters of the rollout controller: what it publishes.

What it reads is wired up in ``app`` with the kernel's readers: ``rollouts`` and
``rollout.policies`` are replayed from the beginning at start-up (``mesh.follow.read_to_end``:
they are the controller's state); ``metrics.live`` is followed without a consumer group from
``metrics_lookback_seconds`` ago (``mesh.follow.TopicFollower``: the figures are state too,
rebuilt on every start); ``models.published`` is consumed by a group
(``mesh.bus.EventConsumer``: commit after the handler, DLQ). All of them run on the leader
only (``leader``); a standby reads nothing but its leader group.
"""

from __future__ import annotations

from collections.abc import Callable

from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.events import RolloutChanged
from loopmesh.mesh.topics import Topic
from loopmesh.rollout.policy import PolicySet

SERVICE = "rollout"


def _always() -> None:
    return None


class KafkaPublisher:
    """Publishes rollout changes and policy overrides, waiting for the broker's ack.

    ``fence`` runs right before each send and raises ``core.NotLeader`` once this controller
    no longer leads, so a deposed leader publishes nothing (``Leadership.check``)."""

    def __init__(
        self,
        producer: EventProducer,
        rollouts: Topic,
        policies: Topic,
        *,
        fence: Callable[[], None] = _always,
    ) -> None:
        self._producer = producer
        self._rollouts = rollouts
        self._policies = policies
        self._fence = fence

    async def rollout_changed(self, event: RolloutChanged) -> None:
        self._fence()
        await self._producer.publish(self._rollouts, event)

    async def policy_set(self, event: PolicySet) -> None:
        self._fence()
        await self._producer.publish(self._policies, event)
