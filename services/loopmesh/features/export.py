"""Point-in-time-correct training frames, replayed from the event log with the agents' fold.

Why the event log and not Feast's ``get_historical_features``: the agents push to the online
store only (a push to the file offline store rewrites its parquet file on every call,
measured), so Feast's offline store has nothing to join; and Feast's file store drops entity
rows that have no data inside the TTL, where a training frame must keep every row. Replaying
``events.raw`` through ``EntityFold`` gives each ``(join key, event_timestamp)`` row the values
the online store held after the entity's newest event at or before that time (windows ending
at that event, as online). Rows without such an event, with only events older than the view's
TTL, or of an erased entity keep their place with missing values.

One difference from the online path, by design: the replay folds in event-time order, so an
event that arrived later than the allowed lateness (dropped online) is counted here.

The trainer keeps its own dataset from ``training.examples`` (features as served, in the
prediction log); this export is for offline analysis and backfills.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd  # type: ignore[import-untyped]

from loopmesh.features.core import EntityFold, event_columns, key_of
from loopmesh.features.definitions import ViewSpec
from loopmesh.mesh.events import InteractionEvent
from loopmesh.mesh.follow import read_to_end
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import EVENTS_RAW

_PANDAS_DTYPES = {"Int64": "Int64", "Int32": "Int64", "Float64": "Float64", "Float32": "Float64"}


def export_columns(views: Sequence[ViewSpec]) -> dict[str, tuple[str, str]]:
    """Exported columns: view and pandas (nullable) dtype by ``view__feature``, in order."""
    return {
        f"{view.name}__{agg.feature}": (view.name, _PANDAS_DTYPES.get(agg.dtype, "string"))
        for view in views
        for agg in view.aggregations
    }


def export_training_frame(
    entity_df: pd.DataFrame,
    events: Iterable[InteractionEvent],
    views: Sequence[ViewSpec],
    *,
    erased: Collection[str] = (),
) -> pd.DataFrame:
    """``entity_df`` (the views' join key, ``event_timestamp``, any other columns) with a
    column ``<view>__<feature>`` per feature of ``views`` (one entity kind); same rows, same
    order, missing values as ``<NA>``. Naive timestamps are taken as UTC. A view's value is
    missing when its newest event at the row's time is older than the view's TTL.
    """
    join_keys = {view.join_key for view in views}
    if len(join_keys) != 1:
        raise ValueError(f"views of one entity kind, got join keys {sorted(join_keys)}")
    (join_key,) = join_keys
    for column in (join_key, "event_timestamp"):
        if column not in entity_df.columns:
            raise ValueError(f"entity_df needs a {column!r} column")
    columns = export_columns(views)
    times = pd.to_datetime(entity_df["event_timestamp"], utc=True)
    row_ts = [t.timestamp() for t in times]
    rows_of: dict[str, list[int]] = defaultdict(list)
    for position, entity_id in enumerate(entity_df[join_key]):
        rows_of[str(entity_id)].append(position)
    events_of: dict[str, list[InteractionEvent]] = defaultdict(list)
    for event in events:
        entity_id = key_of(event, join_key)
        if entity_id in rows_of and entity_id not in erased:
            events_of[entity_id].append(event)

    values: dict[str, list[Any]] = {name: [None] * len(entity_df) for name in columns}
    for entity_id, positions in rows_of.items():
        if entity_id in erased:
            continue
        history = sorted(events_of.get(entity_id, ()), key=lambda e: (e.event_time, e.event_id))
        fold = EntityFold(join_key, entity_id, views, dedup_ids=len(history) + 1)
        next_event = 0
        for position in sorted(positions, key=lambda p: row_ts[p]):
            as_of = row_ts[position]
            while next_event < len(history) and history[next_event].event_time.timestamp() <= (
                as_of
            ):
                event = history[next_event]
                fold.apply(event, event_columns(event))
                next_event += 1
            rows = fold.rows()
            for view in views:
                newest = fold.views[view.name].newest
                if newest is None or newest < as_of - view.ttl_s:
                    continue
                for agg in view.aggregations:
                    values[f"{view.name}__{agg.feature}"][position] = rows[view.name][agg.feature]

    out = entity_df.copy()
    for name, (_, dtype) in columns.items():
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
