"""Feedback's rules on the shared intake core; no gRPC, no Kafka.

Feedback refers to a prediction by id and carries only the outcome (label and/or reward), its
time and free-form attributes; ``FeedbackEvent`` validates it (an outcome is required, labels
are 0 or 1, rewards finite), the rules bound the reward and the attribute count.
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

    def attributes(event: FeedbackEvent) -> Refusal | None:
        return check_size("attributes", event.attributes, limits.max_attributes)

    return [reward, attributes]


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
