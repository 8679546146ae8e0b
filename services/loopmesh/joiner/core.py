"""The join of a prediction with its feedback, as pure state transitions (no faust, no Kafka).

One ``JoinEntry`` per prediction_id lives in the joiner's changelog-backed table. Whichever
side arrives first waits there; the second side completes the pair and yields one
``LabelledExample``. The entry then stays until it expires, so any later duplicate (the same
event redelivered, or another feedback for the same prediction) is recognised and counted
once. Redelivery of the very message that completed the pair (same event id *and* same
source offset: a crash between the table write and the offset commit) re-emits the same
example with the same event id, which consumers deduplicate: at-least-once without losing
the example. A producer's duplicate of that event sits at another offset and is a duplicate.

Time rules: a pair joins when the feedback's event time is within ``ttl`` of the prediction's
(either order of arrival); entries are swept ``ttl`` after they were created, by wall clock.
Feedback waiting for a prediction that is not known yet has a shorter wait, ``feedback_wait``:
past it the entry counts as gone even before the sweeper deleted it, so whether it joins does
not depend on when the sweeper last ran.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict

from loopmesh.mesh.events import FeedbackEvent, LabelledExample, PredictionLogged, Task
from loopmesh.mesh.model_spec import ModelSpec

_EXAMPLE_NAMESPACE = uuid.UUID("6f0b7f5e-2c1d-4d8e-9a51-8e3f2d6c1b70")


class Outcome(StrEnum):
    """What handling one event did (the joiner counts these)."""

    STORED = "stored"
    """First side of a pair; waits for the other."""
    JOINED = "joined"
    """Second side: the example was emitted."""
    REPLAYED = "replayed"
    """Redelivery of the event that completed the pair: the same example again."""
    DUPLICATE = "duplicate"
    """This side was already there; nothing changes."""
    TOO_LATE = "too_late"
    """Prediction and feedback are further apart than the TTL in event time."""
    NO_TARGET = "no_target"
    """Joined, but the feedback says nothing the model's label rule can use (a class index
    beyond its classes, a value for a model that learns from labels): no example."""


class PendingFeedback(BaseModel):
    """The first acceptable feedback of a prediction: its outcome as sent (the target is made
    at the join, by the rule of the model the prediction names)."""

    model_config = ConfigDict(frozen=True)
    event_id: str
    label: int | None = None
    value: float | None = None
    reward: float | None = None
    at: datetime


@dataclass(frozen=True)
class LabelRule:
    """How a model's feedback becomes its target (its spec's ``task``, ``classes``, ``label``)."""

    task: Task = "binary"
    source: Literal["label", "value", "reward"] = "label"
    threshold: float | None = None
    """binary from a value or reward: positive when above it (label: the reward fallback's)."""
    classes: int | None = None

    @classmethod
    def of(cls, spec: ModelSpec) -> LabelRule:
        return cls(spec.task, spec.label.source, spec.label.threshold, spec.classes)

    def target(self, feedback: PendingFeedback) -> float | None:
        """The training target, or None when this feedback cannot make one for the model."""
        if self.task == "multiclass":
            label = feedback.label
            return float(label) if label is not None and label < (self.classes or 0) else None
        if self.task == "binary" and self.source == "label":
            if feedback.label is not None:
                return float(feedback.label) if feedback.label in (0, 1) else None
            # The first schema's rule: a reward alone is positive above the threshold.
            if feedback.reward is not None:
                return 1.0 if feedback.reward > (self.threshold or 0.0) else 0.0
            return None
        observed = feedback.value if self.source == "value" else feedback.reward
        if observed is None:
            return None
        if self.task == "binary":
            return 1.0 if observed > (self.threshold or 0.0) else 0.0
        return float(observed)


class LabelRules:
    """Each model's rule by name; models without a spec learn today's binary label."""

    def __init__(
        self, rules: Mapping[str, LabelRule] | None = None, *, reward_threshold: float = 0.0
    ):
        self._rules = dict(rules or {})
        self._default = LabelRule(threshold=reward_threshold)

    @classmethod
    def of(cls, specs: Mapping[str, ModelSpec], *, reward_threshold: float = 0.0) -> LabelRules:
        return cls(
            {name: LabelRule.of(spec) for name, spec in specs.items()},
            reward_threshold=reward_threshold,
        )

    def __getitem__(self, model_name: str) -> LabelRule:
        return self._rules.get(model_name, self._default)


BINARY_LABELS = LabelRules()


class JoinEntry(BaseModel):
    """State of one prediction_id in the join table."""

    model_config = ConfigDict(frozen=True)
    created: float
    """Wall-clock time (epoch seconds) the entry was created; it is swept ``ttl`` later."""
    prediction: PredictionLogged | None = None
    feedback: PendingFeedback | None = None
    emitted_by: str | None = None
    """Event id of the event whose handling emitted the example (None until joined)."""
    emitted_offset: int | None = None
    """Source offset of that event's message."""
    prediction_trace: str | None = None
    """W3C traceparent of the prediction's message: the join links to the prediction's trace."""
    feedback_trace: str | None = None
    """W3C traceparent of the feedback's message, likewise."""
    partition: int | None = None
    """Changelog partition the entry was written to (where its tombstone must go); None in
    entries written before it was recorded."""

    @property
    def unmatched_feedback(self) -> bool:
        """Feedback waiting for a prediction the joiner has not seen."""
        return self.prediction is None and self.feedback is not None

    def replays_emitter(self, event_id: str, offset: int | None) -> bool:
        return self.emitted_by == event_id and self.emitted_offset == offset

    def expired(self, now: float, ttl: float) -> bool:
        return now - self.created > ttl

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> JoinEntry:
        return cls.model_validate_json(raw)


def example_id(prediction_id: str) -> str:
    """Deterministic event id of a prediction's example, so re-emissions deduplicate."""
    return uuid.uuid5(_EXAMPLE_NAMESPACE, prediction_id).hex


def make_example(
    prediction: PredictionLogged, feedback: PendingFeedback, rules: LabelRules
) -> LabelledExample | None:
    """The pair's example, or None when the model's rule finds no target in the feedback."""
    rule = rules[prediction.model_name]
    target = rule.target(feedback)
    if target is None:
        return None
    return LabelledExample(
        event_id=example_id(prediction.prediction_id),
        event_time=feedback.at,
        prediction_id=prediction.prediction_id,
        entity_id=prediction.entity_id,
        model_name=prediction.model_name,
        model_version=prediction.model_version,
        features=prediction.features,
        categorical=prediction.categorical,
        task=rule.task,
        target=target,
        score=prediction.score,
        outputs=prediction.outputs,
        predicted_at=prediction.event_time,
        feedback_at=feedback.at,
        shadow=prediction.shadow,
    )


def _joined(
    entry: JoinEntry, example: LabelledExample | None
) -> tuple[JoinEntry, Outcome, LabelledExample | None]:
    return entry, Outcome.JOINED if example is not None else Outcome.NO_TARGET, example


def live_entry(
    entry: JoinEntry | None, *, now: float, ttl: float, feedback_wait: float | None
) -> JoinEntry | None:
    """The entry as the join sees it: None once it is due to be swept."""
    if entry is None or entry.expired(now, ttl):
        return None
    if feedback_wait is not None and entry.unmatched_feedback and entry.expired(now, feedback_wait):
        return None
    return entry


def _within(prediction: PredictionLogged, feedback: PendingFeedback, ttl: float) -> bool:
    return abs(feedback.at - prediction.event_time) <= timedelta(seconds=ttl)


def on_prediction(
    entry: JoinEntry | None,
    prediction: PredictionLogged,
    *,
    now: float,
    ttl: float,
    offset: int | None = None,
    feedback_wait: float | None = None,
    rules: LabelRules = BINARY_LABELS,
) -> tuple[JoinEntry, Outcome, LabelledExample | None]:
    """Handle a prediction: the new entry, what happened, and the example if one is due."""
    entry = live_entry(entry, now=now, ttl=ttl, feedback_wait=feedback_wait)
    if entry is None:
        return JoinEntry(created=now, prediction=prediction), Outcome.STORED, None
    if entry.prediction is not None:
        if entry.replays_emitter(prediction.event_id, offset) and entry.feedback is not None:
            return entry, Outcome.REPLAYED, make_example(entry.prediction, entry.feedback, rules)
        return entry, Outcome.DUPLICATE, None
    feedback = entry.feedback
    if feedback is None:  # an entry always has one side; treat a blank one as new
        return JoinEntry(created=now, prediction=prediction), Outcome.STORED, None
    if not _within(prediction, feedback, ttl):
        # The waiting feedback cannot belong to this prediction in time; a later one still may.
        stored = JoinEntry(created=entry.created, prediction=prediction)
        return stored, Outcome.TOO_LATE, None
    joined = entry.model_copy(
        update={
            "prediction": prediction,
            "emitted_by": prediction.event_id,
            "emitted_offset": offset,
        }
    )
    return _joined(joined, make_example(prediction, feedback, rules))


def on_feedback(
    entry: JoinEntry | None,
    feedback: FeedbackEvent,
    *,
    now: float,
    ttl: float,
    offset: int | None = None,
    feedback_wait: float | None = None,
    rules: LabelRules = BINARY_LABELS,
) -> tuple[JoinEntry, Outcome, LabelledExample | None]:
    """Handle a feedback: the new entry, what happened, and the example if one is due."""
    pending = PendingFeedback(
        event_id=feedback.event_id,
        label=feedback.label,
        value=feedback.value,
        reward=feedback.reward,
        at=feedback.event_time,
    )
    entry = live_entry(entry, now=now, ttl=ttl, feedback_wait=feedback_wait)
    if entry is None:
        return JoinEntry(created=now, feedback=pending), Outcome.STORED, None
    if entry.feedback is not None:
        if entry.replays_emitter(feedback.event_id, offset) and entry.prediction is not None:
            return entry, Outcome.REPLAYED, make_example(entry.prediction, entry.feedback, rules)
        return entry, Outcome.DUPLICATE, None
    prediction = entry.prediction
    if prediction is None:
        return JoinEntry(created=now, feedback=pending), Outcome.STORED, None
    if not _within(prediction, pending, ttl):
        return entry, Outcome.TOO_LATE, None
    joined = entry.model_copy(
        update={"feedback": pending, "emitted_by": feedback.event_id, "emitted_offset": offset}
    )
    return _joined(joined, make_example(prediction, pending, rules))
