"""What the client takes and gives back: plain typed values, converted to and from the
protobuf messages of ``protos/loopmesh/v1`` (which are accepted as they are, too).

Events and feedback get their idempotency key here: ``as_event`` / ``as_feedback`` return a
message whose ``event_id`` is set, a fresh uuid4 hex when the caller gave none, before any
attempt is made. Every retry then resends the same id and the doors drop the repeat. A
caller's protobuf message is never changed: one without an id is copied.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import grpc

from loopmesh.client.errors import RejectedItemsError
from loopmesh.gen.loopmesh.v1 import common_pb2, feedback_pb2, inference_pb2, ingestion_pb2


def new_event_id() -> str:
    """A fresh idempotency key (uuid4, hex)."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Event:
    """Something an entity did in the product (``InteractionEvent``)."""

    entity_id: str
    """The entity (user, device, item) the event is about."""
    event_type: str
    """What happened, e.g. ``"click"`` (the door normalises it to lower_snake_case)."""
    numeric: Mapping[str, float] = field(default_factory=dict)
    """Numeric attributes, e.g. ``{"price": 9.5}``."""
    categorical: Mapping[str, str] = field(default_factory=dict)
    """Categorical attributes, e.g. ``{"page": "home"}``."""
    entities: Mapping[str, str] = field(default_factory=dict)
    """Further entities by join key, e.g. ``{"item_id": "sku-42"}``."""
    event_time: datetime | None = None
    """When it happened (a naive datetime is taken as UTC); None: when the door receives it."""
    event_id: str = ""
    """Idempotency key; empty: the client assigns one before the first attempt."""

    def to_proto(self) -> ingestion_pb2.InteractionEvent:
        message = ingestion_pb2.InteractionEvent(
            event_id=self.event_id or new_event_id(),
            entity_id=self.entity_id,
            event_type=self.event_type,
            numeric=dict(self.numeric),
            categorical=dict(self.categorical),
            entities=dict(self.entities),
        )
        if self.event_time is not None:
            message.event_time.FromDatetime(self.event_time)
        return message


@dataclass(frozen=True, slots=True)
class Feedback:
    """The outcome of one prediction (``Feedback``): a label, a value, a reward (at least one)."""

    prediction_id: str
    """The prediction this is about, as ``predict`` returned it."""
    label: int | None = None
    """The class that was right: 0 or 1 for a binary model, a class index (0..9999) for a
    multiclass one."""
    reward: float | None = None
    """Continuous outcome."""
    attributes: Mapping[str, str] = field(default_factory=dict)
    """Free-form context, e.g. ``{"surface": "email"}``."""
    event_time: datetime | None = None
    """When the outcome happened (naive: UTC); None: when the door receives it."""
    event_id: str = ""
    """Idempotency key; empty: the client assigns one before the first attempt."""
    value: float | None = None
    """An observed quantity, the target of a regression model (e.g. minutes watched)."""

    def to_proto(self) -> feedback_pb2.Feedback:
        message = feedback_pb2.Feedback(
            event_id=self.event_id or new_event_id(),
            prediction_id=self.prediction_id,
            attributes=dict(self.attributes),
        )
        if self.label is not None:
            message.label = self.label
        if self.reward is not None:
            message.reward = self.reward
        if self.value is not None:
            message.value = self.value
        if self.event_time is not None:
            message.event_time.FromDatetime(self.event_time)
        return message


EventLike = Event | ingestion_pb2.InteractionEvent
FeedbackLike = Feedback | feedback_pb2.Feedback


def as_event(event: EventLike) -> ingestion_pb2.InteractionEvent:
    """The message to send, with an event id (the caller's message itself when it has one)."""
    if isinstance(event, Event):
        return event.to_proto()
    if event.event_id:
        return event
    copy = ingestion_pb2.InteractionEvent()
    copy.CopyFrom(event)
    copy.event_id = new_event_id()
    return copy


def as_feedback(feedback: FeedbackLike) -> feedback_pb2.Feedback:
    """The message to send, with an event id (the caller's message itself when it has one)."""
    if isinstance(feedback, Feedback):
        return feedback.to_proto()
    if feedback.event_id:
        return feedback
    copy = feedback_pb2.Feedback()
    copy.CopyFrom(feedback)
    copy.event_id = new_event_id()
    return copy


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """What became of one item of a batch."""

    index: int
    """Position in the caller's items (the whole list or stream, not one request)."""
    event_id: str
    accepted: bool
    """Durable in Kafka: written now, or earlier under the same event id (``duplicate``)."""
    field: str = ""
    """Refused: the field at fault, e.g. ``events[3].numeric.price``."""
    reason: str = ""
    """Refused: why; ``"duplicate"`` for an accepted repeat."""

    @property
    def duplicate(self) -> bool:
        """Accepted as a repeat of an event id written recently (not written again)."""
        return self.accepted and self.reason == "duplicate"


_INDEXED = re.compile(r"(events)\[(\d+)\]")


def shifted_field(path: str, offset: int) -> str:
    """``events[i]…`` of one request as ``events[i + offset]…`` of the caller's list."""
    if not offset:
        return path
    match = _INDEXED.match(path)
    if match is None:
        return path
    return f"{match.group(1)}[{int(match.group(2)) + offset}]{path[match.end() :]}"


def outcome_of(result: common_pb2.ItemResult, offset: int = 0) -> ItemOutcome:
    """An ``ItemResult`` of one request as an outcome indexed in the caller's items."""
    return ItemOutcome(
        index=result.index + offset,
        event_id=result.event_id,
        accepted=result.accepted,
        field=shifted_field(result.field, offset),
        reason=result.reason,
    )


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The answer to a batch: counts, and one outcome per item in order."""

    accepted: int
    """Items written to Kafka by this call."""
    rejected: int
    """Items refused as invalid (see ``refused``)."""
    duplicates: int
    """Items already written recently under the same event id (not written again)."""
    results: tuple[ItemOutcome, ...]
    """One outcome per item, in the caller's order."""
    attempts: int = 1
    """Most attempts any one request of the batch took."""

    @property
    def refused(self) -> list[ItemOutcome]:
        return [r for r in self.results if not r.accepted]

    @property
    def event_ids(self) -> list[str]:
        return [r.event_id for r in self.results]

    def raise_for_rejected(self) -> None:
        """Raise ``RejectedItemsError`` (INVALID_ARGUMENT, naming the first refused field)
        when any item was refused."""
        refused = self.refused
        if refused:
            first = refused[0]
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            raise RejectedItemsError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{first.reason}{more}",
                field=first.field,
                results=self.results,
                handled=len(self.results),
            )


IngestResult = BatchResult
"""The answer to ``ingest``."""
FeedbackBatchResult = BatchResult
"""The answer to ``submit_many``."""


@dataclass(frozen=True, slots=True)
class StreamResult:
    """The answer to ``ingest_stream``: counts, and the refused and duplicate events."""

    accepted: int
    rejected: int
    duplicates: int
    results: tuple[ItemOutcome, ...]
    """Refused and duplicate events only, indexed in the caller's stream; at most the
    doors' reporting limit per IngestStream call."""
    results_truncated: bool
    """More were refused or duplicate than ``results`` holds."""
    unreported: int = 0
    """Events durably handled by calls that then failed and were resumed: the door counted
    them (``loopmesh-acked-events``) but never said which were written, refused or
    duplicate. Not resent, so not in the counts above."""
    attempts: int = 1
    """IngestStream calls made."""

    @property
    def handled(self) -> int:
        return self.accepted + self.rejected + self.duplicates + self.unreported


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """The answer to ``submit``."""

    event_id: str
    """The feedback's event id (assigned by the client when it had none)."""
    duplicate: bool
    """The door had written this event id recently and did not write it again."""
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class Prediction:
    """The answer to ``predict`` (``PredictResponse``)."""

    prediction_id: str
    """Unique id of this prediction; feedback refers to it."""
    score: float
    """The model's output: the positive class's probability (binary), the predicted value
    (regression) or the top class's probability (multiclass)."""
    model_name: str
    model_version: int
    """The version that answered (after any canary fallback)."""
    arm: str
    """``stable``, ``canary``, ``pinned``, ``latest`` or ``fallback``."""
    degraded: bool
    """The feature service was unreachable and declared defaults were used."""
    defaulted_features: tuple[str, ...]
    """Features that had no value and got their default."""
    request_id: str
    attempts: int = 1
    task: str = "binary"
    """What the version predicts: ``binary``, ``multiclass`` or ``regression``."""
    probabilities: tuple[float, ...] = ()
    """multiclass: every class's probability, by class index (empty for the other tasks)."""
    predicted_class: int | None = None
    """multiclass: the most probable class (None for the other tasks)."""

    @classmethod
    def from_proto(cls, reply: inference_pb2.PredictResponse, attempts: int = 1) -> Prediction:
        # A gateway from before tasks leaves ``task`` empty: its models were all binary.
        task = reply.task or "binary"
        return cls(
            prediction_id=reply.prediction_id,
            score=reply.score,
            model_name=reply.model_name,
            model_version=reply.model_version,
            arm=reply.arm,
            degraded=reply.degraded,
            defaulted_features=tuple(reply.defaulted_features),
            request_id=reply.request_id,
            attempts=attempts,
            task=task,
            probabilities=tuple(reply.probabilities),
            predicted_class=reply.predicted_class if task == "multiclass" else None,
        )


def predict_request(
    entity_id: str,
    *,
    context: Mapping[str, float] | None = None,
    model_name: str = "",
    model_version: int | str | None = None,
    request_id: str = "",
    categorical: Mapping[str, str] | None = None,
) -> inference_pb2.PredictRequest:
    """A ``PredictRequest``; ``model_version`` pins a version (a positive integer)."""
    return inference_pb2.PredictRequest(
        entity_id=entity_id,
        context=dict(context or {}),
        categorical=dict(categorical or {}),
        model_name=model_name,
        model_version="" if model_version is None else str(model_version),
        request_id=request_id,
    )
