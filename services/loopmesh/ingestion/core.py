"""Ingestion's rules for interaction events, on the shared intake core; no gRPC, no Kafka.

Cleaning repairs spelling (event types become lower_snake_case, categorical values are
trimmed); ``InteractionEvent`` validates; the rules bound numbers and attribute counts; entity
ids are pseudonymised last, when configured, so the raw id never leaves this process.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from loopmesh.mesh.events import InteractionEvent
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
from loopmesh.mesh.privacy import EntityIdMapper

_SEPARATORS = re.compile(r"[\s\-]+")


@functools.lru_cache(maxsize=4096)
def normalise_event_type(value: str) -> str:
    """``" Add to-Cart "`` -> ``"add_to_cart"``: one spelling per event type downstream.

    Cached: apps use a small vocabulary of types, and this runs for every event.
    """
    return _SEPARATORS.sub("_", value.strip()).lower()


def clean_interaction(data: dict[str, Any]) -> dict[str, Any]:
    event_type = data.get("event_type")
    if isinstance(event_type, str):
        data["event_type"] = normalise_event_type(event_type)
    categorical = data.get("categorical")
    if categorical:
        data["categorical"] = trimmed_values(categorical)
    return data


def interaction_rules(limits: IntakeLimits) -> list[Rule[InteractionEvent]]:
    most, largest = limits.max_attributes, limits.max_abs_value

    def attributes(event: InteractionEvent) -> Refusal | None:
        numeric = event.numeric
        if len(numeric) > most or len(event.categorical) > most or len(event.entities) > most:
            return (
                check_size("numeric", numeric, most)
                or check_size("categorical", event.categorical, most)
                or check_size("entities", event.entities, most)
            )
        # One C-level pass in the common case; the offender is looked up only on refusal.
        if numeric and max(map(abs, numeric.values())) > largest:
            for name, value in numeric.items():
                refusal = check_magnitude(f"numeric.{name}", value, largest)
                if refusal is not None:
                    return refusal
        return None

    return [attributes]


def event_path(index: int) -> str:
    return f"events[{index}]"


def ingestion_intake(
    publisher: Publisher[InteractionEvent],
    limits: IntakeLimits,
    window: DedupeWindow,
    entity_ids: EntityIdMapper,
) -> Intake[InteractionEvent]:
    """The intake of interaction events, with pseudonymisation when ``entity_ids`` enables it."""

    def pseudonymise(event: InteractionEvent) -> InteractionEvent:
        # Every join key's id: an item id identifies a person as well as a user id can.
        update: dict[str, Any] = {"entity_id": entity_ids(event.entity_id)}
        if event.entities:
            update["entities"] = {k: entity_ids(v) for k, v in event.entities.items()}
        return event.model_copy(update=update)

    return Intake(
        name="ingestion",
        model=InteractionEvent,
        publisher=publisher,
        window=window,
        time_window=limits.time_window(),
        clean=clean_interaction,
        path=event_path,
        rules=interaction_rules(limits),
        transform=pseudonymise if entity_ids.enabled else None,
    )
