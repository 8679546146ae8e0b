"""The Kafka events of the mesh: one pydantic model per topic value (docs/architecture.md).

Every event carries ``event_id`` (consumers deduplicate by it), a ``schema`` naming its version,
and ``event_time``. Values are JSON; the key is named per topic in ``loopmesh.mesh.topics``.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from loopmesh.mesh.model_repo import MODEL_NAME_PATTERN


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number (NaN and infinity are refused)")
    return value


Finite = Annotated[float, AfterValidator(_finite)]
"""A float that is neither NaN nor infinite."""
Identifier = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]
"""An id: trimmed, non-empty, bounded."""
PRIMARY_JOIN_KEY = "entity_id"
JoinKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
"""A Feast join key name (an identifier), e.g. ``item_id``."""
Task = Literal["binary", "multiclass", "regression"]
"""What a model predicts (its spec's ``task``): a probability, one of k classes, a value."""
Category = Annotated[str, StringConstraints(max_length=256)]
"""A categorical input's value as the caller sent it (encoded by the version's metadata)."""
ModelName = Annotated[str, StringConstraints(pattern=rf"^{MODEL_NAME_PATTERN}$")]
"""The model repository's rule (``model_repo.MODEL_NAME_PATTERN``), so events and paths agree."""
"""A model name that is safe as a directory name."""


MAX_CLASSES = 10_000
"""The most classes a multiclass model may have (its spec's ``classes``)."""


def new_event_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """Fields every event has."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    SCHEMA: ClassVar[str] = ""
    event_id: Identifier = Field(default_factory=new_event_id)
    """Idempotency key: handling an event twice has the effect of handling it once."""
    schema_: str = Field(default="", alias="schema", validate_default=True)
    """Name and version of this event's shape, e.g. ``feedback.v1``."""
    event_time: datetime = Field(default_factory=utcnow)
    """When the thing happened (not when it was sent)."""

    @field_validator("schema_")
    @classmethod
    def _schema_matches(cls, value: str) -> str:
        # The schema is fixed by the class; an incoming value must name the same version.
        if not value:
            return cls.SCHEMA
        if value != cls.SCHEMA:
            raise ValueError(f"unknown schema {value!r}, expected {cls.SCHEMA!r}")
        return value


class InteractionEvent(Event):
    """Something an entity did in a product app (``events.raw``)."""

    SCHEMA: ClassVar[str] = "interaction.v1"
    entity_id: Identifier
    event_type: Annotated[
        str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1, max_length=64)
    ]
    numeric: dict[Identifier, Finite] = Field(default_factory=dict)
    categorical: dict[Identifier, Annotated[str, StringConstraints(max_length=256)]] = Field(
        default_factory=dict
    )
    entities: dict[JoinKey, Identifier] = Field(default_factory=dict)
    """Further entities the event is about, by join key (``{"item_id": "sku-42"}``); the
    event's own entity is ``entity_id``, never an entry here."""

    @field_validator("entities")
    @classmethod
    def _no_primary(cls, value: dict[str, str]) -> dict[str, str]:
        if PRIMARY_JOIN_KEY in value:
            raise ValueError(f"{PRIMARY_JOIN_KEY} is the event's own entity, not an entry here")
        return value


class ShadowScore(BaseModel):
    """What a shadow candidate answered for a request it did not serve (see PredictionLogged)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model_version: int = Field(ge=1)
    score: Finite
    outputs: list[Finite] = Field(default_factory=list)


class PredictionLogged(Event):
    """One answered prediction, logged off the hot path (``predictions``)."""

    SCHEMA: ClassVar[str] = "prediction.v1"
    prediction_id: Identifier
    model_name: ModelName
    model_version: int = Field(ge=1)
    entity_id: Identifier
    features: dict[str, Finite]
    """The exact model inputs by feature name, so training never re-reads a moving store."""
    categorical: dict[str, Category] = Field(default_factory=dict)
    """The categorical inputs by name, as sent (their encoding is the version's)."""
    score: Finite
    """binary: the positive class's probability; multiclass: the top class's; regression:
    the predicted value."""
    outputs: list[Finite] = Field(default_factory=list)
    """multiclass: every class's probability (empty for the other tasks)."""
    task: Task = "binary"
    latency_ms: Finite = 0.0
    shadow: list[ShadowScore] = Field(default_factory=list, max_length=8)
    """Shadow candidates' answers to the same inputs (never returned to the caller): the
    joiner scores them against the same feedback, a paired comparison with this version."""


class FeedbackEvent(Event):
    """What the product learned about a prediction (``feedback``)."""

    SCHEMA: ClassVar[str] = "feedback.v1"
    prediction_id: Identifier
    label: int | None = Field(default=None, ge=0, le=MAX_CLASSES - 1)
    """0/1 for a binary model, a class index for a multiclass one."""
    reward: Finite | None = None
    value: Finite | None = None
    """An observed quantity (a regression model's target, e.g. minutes watched)."""
    attributes: dict[Identifier, Annotated[str, StringConstraints(max_length=1024)]] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _has_outcome(self) -> FeedbackEvent:
        if self.label is None and self.reward is None and self.value is None:
            raise ValueError("feedback needs a label, a value or a reward")
        return self


class LabelledExample(Event):
    """A prediction joined with its feedback (``training.examples``)."""

    SCHEMA: ClassVar[str] = "example.v1"
    prediction_id: Identifier
    entity_id: Identifier
    model_name: ModelName
    model_version: int = Field(ge=0)
    """The version that predicted; 0 for an imported example (``TrainerService.AddExamples``)."""
    features: dict[str, Finite]
    categorical: dict[str, Category] = Field(default_factory=dict)
    task: Task = "binary"
    target: Finite
    """What the model should have said, by its spec's label rule: 0/1 (binary), a class index
    (multiclass) or a value (regression)."""
    score: Finite
    outputs: list[Finite] = Field(default_factory=list)
    """The prediction's class probabilities (multiclass)."""
    predicted_at: datetime
    feedback_at: datetime
    shadow: list[ShadowScore] = Field(default_factory=list, max_length=8)
    """The prediction's shadow answers (see PredictionLogged), for the paired metrics."""


class VersionMetrics(Event):
    """Live metrics of one model version over a sliding window (``metrics.live``)."""

    SCHEMA: ClassVar[str] = "metrics.v1"
    model_name: ModelName
    model_version: int = Field(ge=1)
    window_seconds: Finite
    count: int = Field(ge=0)
    task: Task = "binary"
    loss: Finite | None = None
    """Mean per-example loss of the task: log loss (binary), cross-entropy (multiclass),
    squared error (regression); the rollout compares versions by it."""
    loss_var: Finite | None = Field(default=None, ge=0.0)
    """Variance of the per-example loss over the window (for the rollout's bound)."""
    log_loss: Finite | None = None
    accuracy: Finite | None = None
    auc: Finite | None = None
    mae: Finite | None = None
    label_rate: Finite | None = None
    log_loss_var: Finite | None = Field(default=None, ge=0.0)
    """binary: as ``loss_var`` (kept for readers of the first schema)."""
    error_rate: Finite | None = Field(default=None, ge=0.0, le=1.0)
    """Share of the version's requests that failed (gateway; absent: guard skipped)."""
    latency_p99_ms: Finite | None = Field(default=None, ge=0.0)
    """99th percentile request latency of the version (gateway; absent: guard skipped)."""
    latency_samples: int | None = Field(default=None, ge=0)
    """Latencies the p99 was taken over (the gateway's ``count`` is every request)."""
    latency_p99_low_ms: Finite | None = Field(default=None, ge=0.0)
    latency_p99_high_ms: Finite | None = Field(default=None, ge=0.0)
    """A 95% distribution-free confidence interval of the p99 (order statistics); the high
    end is absent when too few latencies bound it from above."""
    shadow_of: int | None = Field(default=None, ge=1)
    """Set on a shadow candidate's figures: they are over requests that version answered (the
    candidate served none of them), ``count`` of them, paired with its answers."""
    paired_loss_diff: Finite | None = None
    """Shadow only: mean over the same requests of (this version's loss - ``shadow_of``'s)."""
    paired_loss_diff_var: Finite | None = Field(default=None, ge=0.0)
    paired_accuracy_diff: Finite | None = None
    """Shadow only (binary, multiclass): mean of (this version correct - ``shadow_of``
    correct), each 0 or 1."""
    paired_accuracy_diff_var: Finite | None = Field(default=None, ge=0.0)


class ModelPublished(Event):
    """A trained version that passed the gate and sits in the model repository."""

    SCHEMA: ClassVar[str] = "model.published.v1"
    model_name: ModelName
    model_version: int = Field(ge=1)
    parent_version: int | None = None
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    metrics: dict[str, Finite] = Field(default_factory=dict)
    feature_names: list[str]
    preempts: int | None = Field(default=None, ge=1)
    """The version in canary (or about to be) that this one beat on the same holdout rows:
    the controller replaces that canary with this version (latest wins)."""


RolloutState = Literal[
    "candidate", "shadow", "canary", "stable", "rolled_back", "dropped", "paused", "aborted"
]
"""``shadow``: candidates scored on mirrored requests, answering no user; ``dropped``: the
last shadow candidate failed there (it never served a user)."""


class RolloutChanged(Event):
    """The rollout state of a model after a change (``rollouts``, compacted by model)."""

    SCHEMA: ClassVar[str] = "rollout.v1"
    model_name: ModelName
    stable_version: int | None = None
    canary_version: int | None = None
    canary_weight: Finite = Field(default=0.0, ge=0.0, le=1.0)
    """Share of traffic (0..1) that goes to the canary."""
    state: RolloutState
    step: int = Field(default=0, ge=0)
    reason: str = ""
    shadow_versions: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list, max_length=8)
    """Candidates in shadow: loaded, scored on ``shadow_share`` of the requests, never
    answering one."""
    shadow_share: Finite = Field(default=0.0, ge=0.0, le=1.0)
    newest_version: int | None = Field(default=None, ge=1)
    """The newest version this model's rollouts have dealt with (one dropped from shadow
    next to others still there is named nowhere else), so it is not rolled out again."""
    sha256: dict[int, Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]] = Field(
        default_factory=dict
    )
    """The sha256 that ``ModelPublished`` announced for each version this state names: the
    controller checks it on every load, also after a restart (this topic is its memory)."""


class EntityErased(Event):
    """An entity whose data must be forgotten (``entities.erased``, compacted by entity)."""

    SCHEMA: ClassVar[str] = "erasure.v1"
    entity_id: Identifier
    join_key: JoinKey = "entity_id"
    """Which kind of entity ``entity_id`` names (its join key), e.g. ``item_id``."""
    reason: Annotated[str, StringConstraints(max_length=1024)] = ""


def erasure_key(event: EntityErased) -> str:
    """The compaction key of an erasure: the id, prefixed by its join key unless entity_id."""
    if event.join_key == PRIMARY_JOIN_KEY:
        return event.entity_id
    return f"{event.join_key}={event.entity_id}"


class DeadLetter(Event):
    """A message a consumer could not handle, kept with why and where (``<topic>.dlq``)."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    SCHEMA: ClassVar[str] = "deadletter.v1"
    reason: str
    topic: str
    partition: int
    offset: int
    consumer_group: str
    key: bytes | None = None
    value: bytes | None = None
    """The raw bytes as they arrived (JSON carries them base64-encoded)."""
