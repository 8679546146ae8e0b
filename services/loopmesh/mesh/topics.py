"""The topic table (docs/architecture.md, "Topics"): names, keys, value models, retention."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from pydantic import BaseModel

from loopmesh.mesh.events import (
    EntityErased,
    Event,
    FeedbackEvent,
    InteractionEvent,
    LabelledExample,
    ModelPublished,
    PredictionLogged,
    RolloutChanged,
    VersionMetrics,
)

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Topic:
    """A topic this project owns."""

    name: str
    value_type: type[Event]
    key_field: str
    retention_ms: int = 7 * DAY_MS
    compacted: bool = False
    max_message_bytes: int | None = None
    """Largest record the topic takes (the broker's default, 1 MiB, when None)."""
    broker_time: bool = False
    """Records carry the broker's append time (``LogAppendTime``), not the producer's clock:
    one clock orders events and erasures written by different processes."""

    @property
    def dlq(self) -> str:
        return f"{self.name}.dlq"

    def config(self) -> dict[str, str]:
        """Topic-level configs for the CreateTopics request."""
        config = (
            {"cleanup.policy": "compact"}
            if self.compacted
            else {"cleanup.policy": "delete", "retention.ms": str(self.retention_ms)}
        )
        if self.max_message_bytes is not None:
            config["max.message.bytes"] = str(self.max_message_bytes)
        if self.broker_time:
            config["message.timestamp.type"] = "LogAppendTime"
        return config


EVENTS_RAW = Topic("events.raw", InteractionEvent, "entity_id", broker_time=True)
PREDICTIONS = Topic("predictions", PredictionLogged, "prediction_id")
FEEDBACK = Topic("feedback", FeedbackEvent, "prediction_id")
TRAINING_EXAMPLES = Topic("training.examples", LabelledExample, "entity_id", 30 * DAY_MS)
METRICS_LIVE = Topic("metrics.live", VersionMetrics, "model_name", 1 * DAY_MS)
MODELS_PUBLISHED = Topic("models.published", ModelPublished, "model_name", compacted=False)
ROLLOUTS = Topic("rollouts", RolloutChanged, "model_name", compacted=True)
ENTITIES_ERASED = Topic(
    "entities.erased", EntityErased, "entity_id", compacted=True, broker_time=True
)

ALL_TOPICS: tuple[Topic, ...] = (
    EVENTS_RAW,
    PREDICTIONS,
    FEEDBACK,
    TRAINING_EXAMPLES,
    METRICS_LIVE,
    MODELS_PUBLISHED,
    ROLLOUTS,
    ENTITIES_ERASED,
)


class TopicSet(BaseModel):
    """The names under which one deployable uses mesh topics (tests and tenants rename them).

    A subclass declares one ``str`` field per topic, defaulting to the mesh name, and maps each
    field to its mesh topic in ``BASES``.
    """

    BASES: ClassVar[dict[str, Topic]] = {}

    def topic(self, which: str) -> Topic:
        """The Topic definition of the mesh under the configured name."""
        return replace(self.BASES[which], name=getattr(self, which))

    def all(self) -> list[Topic]:
        return [self.topic(w) for w in type(self).model_fields]
