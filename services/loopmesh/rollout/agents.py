"""Kafka adapters of the rollout controller: what it publishes.

What it reads is wired up in ``app`` with the kernel's readers: ``rollouts`` and
``rollout.policies`` are replayed from the beginning at start-up (``mesh.follow.read_to_end``:
they are the controller's state); ``metrics.live`` is followed without a consumer group from
``metrics_lookback_seconds`` ago (``mesh.follow.TopicFollower``: the figures are state too,
rebuilt on every start); ``models.published`` is consumed by a group
(``mesh.bus.EventConsumer``: commit after the handler, DLQ).
"""

from __future__ import annotations

from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.events import RolloutChanged
from loopmesh.mesh.topics import Topic
from loopmesh.rollout.policy import PolicySet

SERVICE = "rollout"


class KafkaPublisher:
    """Publishes rollout changes and policy overrides, waiting for the broker's ack."""

    def __init__(self, producer: EventProducer, rollouts: Topic, policies: Topic) -> None:
        self._producer = producer
        self._rollouts = rollouts
        self._policies = policies

    async def rollout_changed(self, event: RolloutChanged) -> None:
        await self._producer.publish(self._rollouts, event)

    async def policy_set(self, event: PolicySet) -> None:
        await self._producer.publish(self._policies, event)
