"""What the features workers compute: the project's stream feature views, read from Feast.

A project declares its features as ordinary Feast objects (docs/features.md): a ``KafkaSource``
over ``events.raw`` whose ``JsonFormat`` schema names the event columns it uses, and
``StreamFeatureView``s with ``Aggregation``s over those columns. This module turns the
applied definitions into ``ViewSpec``s, refusing at start anything LoopMesh cannot compute
(``DefinitionError`` names the view and the field), so no view silently stays empty.

It reads Feast objects by attribute only and imports no feast module: cheap to test.

How an event becomes a row of columns:

* ``event_id``, ``event_type`` (string), ``event_time`` (timestamp; a number of unix seconds
  when aggregated), ``entity_id`` (the event's own entity);
* every other join key a view's entity names, from the event's ``entities`` map;
* any other column: declared ``double``/``float``/``int``/``bigint`` reads the event's
  ``numeric`` attribute of that name, declared ``string`` its ``categorical`` attribute.

An event that lacks a column is null there: aggregations skip it (``count(event_id)``
counts every event), and it never overwrites a latest value.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from loopmesh.mesh.errors import SetupError

EVENTS_TOPIC = "events.raw"
"""The stream a source must name; deployments may rename it (``features.events_topic``)."""
PRIMARY_JOIN_KEY = "entity_id"
BUILTIN_COLUMNS: dict[str, Literal["numeric", "categorical"]] = {
    "event_id": "categorical",
    "event_type": "categorical",
    "event_time": "numeric",
    "entity_id": "categorical",
}
NUMERIC_TYPES = frozenset({"double", "float", "int", "integer", "bigint", "long"})
STRING_TYPES = frozenset({"string"})
Function = Literal["count", "sum", "mean", "min", "max", "stddev", "last"]
FUNCTIONS: tuple[Function, ...] = ("count", "sum", "mean", "min", "max", "stddev", "last")
STATE_LAYOUT = 3
"""Version of the fold's state layout (``features.core``): part of every view's fingerprint, so
a new layout makes every view new, and the workers refill it from the retained events."""
MAX_BUCKETS = 1440
"""Most slides one window may hold (a day in minutes): state per entity stays bounded."""
EVENT_TYPES_TAG = "loopmesh.event_types"
"""View tag restricting a view to some event types: ``"purchase,refund"``."""
_KNOWN_TAGS = frozenset({EVENT_TYPES_TAG})
_INT_DTYPES = frozenset({"Int64", "Int32"})
_FLOAT_DTYPES = frozenset({"Float64", "Float32"})
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class DefinitionError(SetupError):
    """A declaration LoopMesh cannot compute; ``field`` names the view and its part."""

    def __init__(self, view: str, field: str, reason: str) -> None:
        super().__init__(f"stream feature view {view!r}, {field}", reason)
        self.view = view


@dataclass(frozen=True)
class AggregationSpec:
    """One served feature and how it is computed from the view's events."""

    feature: str
    function: Function
    column: str
    kind: Literal["numeric", "categorical"]
    """How the column is read: a number or a string."""
    window_s: float | None
    """Width of the hopping window; None aggregates over every event."""
    slide_s: float | None
    """Step of the window (its bucket width); equals ``window_s`` for tumbling windows."""
    dtype: str
    """Feast type name of the served value."""

    @property
    def buckets(self) -> int:
        """Slides the window spans (1 without a window)."""
        if self.window_s is None or self.slide_s is None:
            return 1
        return round(self.window_s / self.slide_s)


@dataclass(frozen=True)
class ViewSpec:
    """One stream feature view LoopMesh computes."""

    name: str
    entity: str
    join_key: str
    aggregations: tuple[AggregationSpec, ...]
    event_types: frozenset[str] | None
    """Only events of these types feed the view (None: every event)."""
    allowed_lateness_s: float
    """An event older than the view's newest event by more than this is late: counted in a
    metric and dead-lettered with its reason, never folded."""
    ttl_s: float
    """Values older than this are served STALE (Feast's ``ttl``; inf when 0)."""
    timestamp_column: str
    """The row's event-time column, as Feast's write path names it (the batch source's)."""

    @property
    def fingerprint(self) -> str:
        """Identity of what the view computes: a changed definition is a new view."""
        data = {
            "state": STATE_LAYOUT,
            "join_key": self.join_key,
            "event_types": sorted(self.event_types) if self.event_types is not None else None,
            "aggregations": [
                [a.feature, a.function, a.column, a.kind, a.window_s, a.slide_s]
                for a in self.aggregations
            ],
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def wants(self, event_type: str) -> bool:
        return self.event_types is None or event_type in self.event_types


@dataclass(frozen=True)
class Definitions:
    """Every computed view, and the columns the events stream declares."""

    views: tuple[ViewSpec, ...]
    columns: dict[str, Literal["numeric", "categorical"]]

    @property
    def join_keys(self) -> list[str]:
        """Join keys of the computed views, ``entity_id`` (when used) first."""
        keys = sorted({v.join_key for v in self.views}, key=lambda k: (k != PRIMARY_JOIN_KEY, k))
        return keys

    def views_of(self, join_key: str) -> list[ViewSpec]:
        return [v for v in self.views if v.join_key == join_key]

    @property
    def max_lateness_s(self) -> float:
        return max((v.allowed_lateness_s for v in self.views), default=0.0)


def parse_schema(schema_json: str, *, source: str) -> dict[str, Literal["numeric", "categorical"]]:
    """Columns of a ``JsonFormat`` schema (``"name type, name type"``, Spark DDL style)."""
    columns: dict[str, Literal["numeric", "categorical"]] = {}
    for i, item in enumerate(part.strip() for part in schema_json.split(",")):
        field = f"source {source!r}: message_format.schema_json[{i}]"
        pieces = item.split()
        if len(pieces) != 2:
            raise SetupError(field, f"expected 'name type', got {item!r}")
        name, kind = pieces[0].strip("`"), pieces[1].lower()
        if not _IDENTIFIER.match(name):
            raise SetupError(field, f"{name!r} is not a column name")
        if name in columns:
            raise SetupError(field, f"column {name!r} declared twice")
        builtin = BUILTIN_COLUMNS.get(name)
        if name == "event_time":
            if kind != "timestamp":
                raise SetupError(field, "event_time is the event's timestamp: declare it timestamp")
        elif kind == "timestamp":
            raise SetupError(field, f"only event_time is a timestamp, not {name!r}")
        elif builtin == "categorical" and kind not in STRING_TYPES:
            raise SetupError(field, f"{name} is a string column")
        elif kind not in NUMERIC_TYPES | STRING_TYPES:
            raise SetupError(
                field, f"type {kind!r} of {name!r} is not one of string, double, float, int, bigint"
            )
        columns[name] = builtin or ("categorical" if kind in STRING_TYPES else "numeric")
    return columns


def _seconds(value: timedelta | None) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds()
    return seconds if seconds > 0 else None


def _aggregation(
    view: str,
    index: int,
    agg: Any,
    columns: dict[str, Literal["numeric", "categorical"]],
    dtypes: dict[str, str],
) -> AggregationSpec:
    field = f"aggregations[{index}]"
    function: Any = str(agg.function)
    if function not in FUNCTIONS:
        raise DefinitionError(
            view,
            f"{field}.function",
            f"unknown function {function!r}; LoopMesh computes {', '.join(FUNCTIONS)}"
            + (" (count_distinct needs unbounded state)" if function == "count_distinct" else ""),
        )
    column = str(agg.column)
    kind = columns.get(column)
    if kind is None:
        raise DefinitionError(
            view,
            f"{field}.column",
            f"no event column {column!r}: the source's schema_json declares "
            f"{', '.join(sorted(columns))}",
        )
    if function not in ("count", "last") and kind != "numeric":
        raise DefinitionError(view, f"{field}.column", f"{function} needs a numeric column")
    window, slide = _seconds(agg.time_window), _seconds(agg.slide_interval)
    if function == "last" and window is not None:
        raise DefinitionError(
            view, f"{field}.time_window", "last is the latest value overall: give no time_window"
        )
    if window is None:
        slide = None
    else:
        slide = slide or window
        if slide > window:
            raise DefinitionError(view, f"{field}.slide_interval", "longer than the time_window")
        buckets = window / slide
        if abs(buckets - round(buckets)) > 1e-9:
            raise DefinitionError(
                view, f"{field}.slide_interval", "the time_window must be a whole number of slides"
            )
        if round(buckets) > MAX_BUCKETS:
            raise DefinitionError(
                view,
                f"{field}.slide_interval",
                f"{round(buckets)} slides per window, at most {MAX_BUCKETS}: state per entity "
                "must stay bounded",
            )
    name = agg.name or _feast_name(function, column, agg.time_window)
    dtype = dtypes.get(name)
    if dtype is None:
        raise DefinitionError(
            view, f"{field}.name", f"{name!r} is not a field of the view's schema: declare it"
        )
    _check_dtype(view, f"schema[{name}].dtype", function, kind, dtype)
    return AggregationSpec(
        feature=name,
        function=function,
        column=column,
        kind=kind,
        window_s=window,
        slide_s=slide,
        dtype=dtype,
    )


def _feast_name(function: str, column: str, window: timedelta | None) -> str:
    # Feast's own default (Aggregation.resolved_name), so a reader of Feast's docs finds it.
    base = f"{function}_{column}"
    if window is not None and window.total_seconds() > 0:
        return f"{base}_{int(window.total_seconds())}s"
    return base


def _check_dtype(view: str, field: str, function: str, kind: str, dtype: str) -> None:
    if function == "count":
        wanted = _INT_DTYPES
    elif function == "last" and kind == "categorical":
        wanted = frozenset({"String"})
    else:
        wanted = _FLOAT_DTYPES
    if dtype not in wanted:
        raise DefinitionError(
            view, field, f"{function} of a {kind} column is {'/'.join(sorted(wanted))}, not {dtype}"
        )


def view_spec(
    view: Any,
    *,
    join_key_of: dict[str, str],
    events_topic: str = EVENTS_TOPIC,
    default_lateness_s: float,
) -> tuple[ViewSpec, dict[str, Literal["numeric", "categorical"]]]:
    """The spec of one Feast ``StreamFeatureView`` and its source's columns."""
    name = str(view.name)
    if getattr(view, "udf", None) is not None or getattr(view, "udf_string", None):
        raise DefinitionError(
            name, "udf", "LoopMesh runs no transformation: declare aggregations over columns"
        )
    source: Any = getattr(view, "stream_source", None)
    options = getattr(source, "kafka_options", None)
    if source is None or options is None:
        raise DefinitionError(
            name, "source", f"must be a KafkaSource over {EVENTS_TOPIC!r} (the events stream)"
        )
    if options.topic != events_topic:
        raise DefinitionError(
            name,
            "source.topic",
            f"{options.topic!r}: LoopMesh computes views over {events_topic!r}",
        )
    schema_json = getattr(options.message_format, "schema_json", None)
    if not schema_json:
        raise DefinitionError(name, "source.message_format", "must be a JsonFormat with a schema")
    if source.timestamp_field != "event_time":
        raise DefinitionError(name, "source.timestamp_field", "must be event_time")
    columns = parse_schema(schema_json, source=str(source.name))
    entities = list(view.entities)
    if len(entities) != 1:
        raise DefinitionError(name, "entities", "a computed view has exactly one entity")
    join_key = join_key_of.get(entities[0])
    if join_key is None:
        raise DefinitionError(name, "entities", f"unknown entity {entities[0]!r}")
    if join_key != PRIMARY_JOIN_KEY and columns.get(join_key) != "categorical":
        raise DefinitionError(
            name,
            "entities",
            f"join key {join_key!r} must be a string column of the source's schema_json",
        )
    for tag in view.tags or {}:
        if tag.startswith("loopmesh.") and tag not in _KNOWN_TAGS:
            raise DefinitionError(name, f"tags[{tag}]", f"unknown; known: {sorted(_KNOWN_TAGS)}")
    event_types: frozenset[str] | None = None
    raw_types = (view.tags or {}).get(EVENT_TYPES_TAG)
    if raw_types is not None:
        event_types = frozenset(t.strip().lower() for t in raw_types.split(",") if t.strip())
        if not event_types:
            raise DefinitionError(name, f"tags[{EVENT_TYPES_TAG}]", "names no event type")
    dtypes = {str(f.name): _dtype_name(f.dtype) for f in view.features if f.name != join_key}
    aggregations = [
        _aggregation(name, i, agg, columns, dtypes) for i, agg in enumerate(view.aggregations)
    ]
    produced = {a.feature for a in aggregations}
    if len(produced) != len(aggregations):
        raise DefinitionError(name, "aggregations", "two aggregations have the same name")
    # A schema field no aggregation produces is the latest value of the column of its name.
    for feature, dtype in dtypes.items():
        if feature in produced:
            continue
        kind = columns.get(feature)
        if kind is None:
            raise DefinitionError(
                name,
                f"schema[{feature}]",
                "no aggregation produces it and no event column has its name",
            )
        _check_dtype(name, f"schema[{feature}].dtype", "last", kind, dtype)
        aggregations.append(
            AggregationSpec(feature, "last", feature, kind, None, None, dtype)  # latest value
        )
    if not aggregations:
        raise DefinitionError(name, "schema", "declares no feature")
    lateness = _seconds(options.watermark_delay_threshold)
    ttl = _seconds(view.ttl)
    batch = getattr(source, "batch_source", None)
    return (
        ViewSpec(
            name=name,
            entity=entities[0],
            join_key=join_key,
            aggregations=tuple(aggregations),
            event_types=event_types,
            allowed_lateness_s=default_lateness_s if lateness is None else lateness,
            ttl_s=float("inf") if ttl is None else ttl,
            timestamp_column=str(getattr(batch, "timestamp_field", "") or "event_timestamp"),
        ),
        columns,
    )


def _dtype_name(dtype: Any) -> str:
    return str(dtype)


def load_definitions(
    stream_views: Iterable[Any],
    entities: Iterable[Any],
    *,
    events_topic: str = EVENTS_TOPIC,
    default_lateness_s: float,
) -> Definitions:
    """Every stream view of the registry as a spec; DefinitionError on the first bad one."""
    join_key_of = {str(e.name): str(e.join_key) for e in entities}
    views: list[ViewSpec] = []
    columns: dict[str, Literal["numeric", "categorical"]] = {}
    for view in sorted(stream_views, key=lambda v: str(v.name)):
        spec, declared = view_spec(
            view,
            join_key_of=join_key_of,
            events_topic=events_topic,
            default_lateness_s=default_lateness_s,
        )
        for column, kind in declared.items():
            if columns.setdefault(column, kind) != kind:
                raise DefinitionError(
                    spec.name,
                    f"source.schema_json[{column}]",
                    "declared numeric in one source and string in another",
                )
        views.append(spec)
    return Definitions(views=tuple(views), columns=columns)


def describe(views: Sequence[ViewSpec]) -> str:
    """One line per view (startup log)."""
    return "; ".join(
        f"{v.name} by {v.join_key}: {', '.join(a.feature for a in v.aggregations)}" for v in views
    )
