"""Feedback's rules on the shared intake core; no gRPC, no Kafka.

Feedback refers to a prediction by id and carries only the outcome (a label, a value and/or a
reward), its time and free-form attributes; ``FeedbackEvent`` validates it (an outcome is
required, a label is a class index 0..9999, values and rewards are finite), the rules bound the
value and the reward by the door's ``limits.max_abs_value`` and the attribute count.
Which labels a model has (0/1, or its k classes) is the model's business, not the door's: the
joiner judges a label against the version that made the prediction.
"""

from __future__ import annotations

from typing import Any

from loopmesh.mesh.events import FeedbackEvent
from loopmesh.mesh.intake import (
    DedupeWindow,
    Intake,
    IntakeLimits,
    Publisher,
    Refusal,
    Rule,
    check_magnitude,
    check_size,
    trimmed_values,
)


def clean_feedback(data: dict[str, Any]) -> dict[str, Any]:
    attributes = data.get("attributes")
    if attributes:
        data["attributes"] = trimmed_values(attributes)
    return data


def feedback_rules(limits: IntakeLimits) -> list[Rule[FeedbackEvent]]:
    def reward(event: FeedbackEvent) -> Refusal | None:
        return check_magnitude("reward", event.reward, limits.max_abs_value)

    def value(event: FeedbackEvent) -> Refusal | None:
        return check_magnitude("value", event.value, limits.max_abs_value)

    def attributes(event: FeedbackEvent) -> Refusal | None:
        return check_size("attributes", event.attributes, limits.max_attributes)

    return [reward, value, attributes]


def feedback_intake(
    publisher: Publisher[FeedbackEvent], limits: IntakeLimits, window: DedupeWindow
) -> Intake[FeedbackEvent]:
    return Intake(
        name="feedback",
        model=FeedbackEvent,
        publisher=publisher,
        window=window,
        time_window=limits.time_window(),
        clean=clean_feedback,
        path=lambda _: "feedback",
        rules=feedback_rules(limits),
    )
