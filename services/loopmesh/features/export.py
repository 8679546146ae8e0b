"""Point-in-time-correct training frames, replayed from the event log with the agents' fold.

Why the event log and not Feast's ``get_historical_features``: the agents push to the online
store only (a push to the file offline store rewrites its parquet file on every call,
measured), so Feast's offline store has nothing to join; and Feast's file store drops entity
rows that have no data inside the TTL, where a training frame must keep every row. Replaying
``events.raw`` through ``EntityAggregate`` gives each ``(entity_id, event_timestamp)`` row the
values the online store held after the entity's newest event at or before that time (windows
ending at that event, as online). Rows without such an event, with only events older than
``max_age_s`` (Feast's TTL), or of an erased entity keep their place with missing values.

One difference from the online path, by design: the replay folds in event-time order, so an
event that arrived later than the allowed lateness (dropped online) is counted here.

The trainer keeps its own dataset from ``training.examples`` (features as served, in the
prediction log); this export is for offline analysis and backfills.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import replace
from typing import Any

import pandas as pd  # type: ignore[import-untyped]

from loopmesh.features.core import (
    ACTIVITY_VIEW,
    DEFAULT_MAX_AGE_SECONDS,
    NUMERIC_MEANS,
    NUMERIC_VIEW,
    WINDOWS,
    EntityAggregate,
)
from loopmesh.mesh.events import InteractionEvent
from loopmesh.mesh.follow import read_to_end
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import EVENTS_RAW

FEATURE_DTYPES: dict[str, tuple[str, str]] = {
    **{name: (ACTIVITY_VIEW, "Int64") for name in WINDOWS},
    "events_total": (ACTIVITY_VIEW, "Int64"),
    "last_event_ts": (ACTIVITY_VIEW, "Float64"),
    **{name: (NUMERIC_VIEW, "Float64") for name in NUMERIC_MEANS},
    "last_event_type": (NUMERIC_VIEW, "string"),
    "last_category": (NUMERIC_VIEW, "string"),
}
"""Exported columns: view and pandas (nullable) dtype, in output order."""


def export_training_frame(
    entity_df: pd.DataFrame,
    events: Iterable[InteractionEvent],
    *,
    erased: Collection[str] = (),
    max_age_s: float | None = DEFAULT_MAX_AGE_SECONDS,
) -> pd.DataFrame:
    """``entity_df`` (``entity_id``, ``event_timestamp``, any other columns) with the feature
    columns of ``FEATURE_DTYPES`` added; same rows, same order, missing values as ``<NA>``.

    Naive timestamps are taken as UTC.
    """
    for column in ("entity_id", "event_timestamp"):
        if column not in entity_df.columns:
            raise ValueError(f"entity_df needs a {column!r} column")
    times = pd.to_datetime(entity_df["event_timestamp"], utc=True)
    row_ts = [t.timestamp() for t in times]
    rows_of: dict[str, list[int]] = defaultdict(list)
    for position, entity_id in enumerate(entity_df["entity_id"]):
        rows_of[str(entity_id)].append(position)
    events_of: dict[str, list[InteractionEvent]] = defaultdict(list)
    for event in events:
        if event.entity_id in rows_of and event.entity_id not in erased:
            events_of[event.entity_id].append(event)

    values: dict[str, list[Any]] = {name: [None] * len(entity_df) for name in FEATURE_DTYPES}
    for entity_id, positions in rows_of.items():
        if entity_id in erased:
            continue
        history = sorted(events_of.get(entity_id, ()), key=lambda e: (e.event_time, e.event_id))
        aggregate = EntityAggregate(entity_id)
        next_event = 0
        for position in sorted(positions, key=lambda p: row_ts[p]):
            as_of = row_ts[position]
            while next_event < len(history) and history[next_event].event_time.timestamp() <= (
                as_of
            ):
                aggregate.apply(history[next_event])
                next_event += 1
            newest = aggregate.state.newest
            if newest is None or (max_age_s is not None and newest < as_of - max_age_s):
                continue
            rows = aggregate.rows()
            for name, (view, _) in FEATURE_DTYPES.items():
                values[name][position] = rows[view][name]

    out = entity_df.copy()
    for name, (_, dtype) in FEATURE_DTYPES.items():
        out[name] = pd.array(values[name], dtype=dtype)
    return out


async def read_event_log(
    settings: KafkaSettings, topic: str, *, timeout_s: float = 60.0
) -> list[InteractionEvent]:
    """Every valid InteractionEvent on ``topic`` up to its current end (invalid ones skipped:
    the agents dead-lettered them)."""
    event_log = replace(EVENTS_RAW, name=topic)
    events: list[InteractionEvent] = await read_to_end(
        settings, event_log, service="features-export", timeout=timeout_s
    )
    return events
