"""The default LoopMesh project's features: ordinary Feast definitions, computed by LoopMesh.

Nothing here is special to LoopMesh's code: any project declares its features the same way
(README, "Declare your features"; the rules are in docs/features.md). LoopMesh's features
workers read the applied registry, compute every ``StreamFeatureView`` over the ``events``
stream from the events topic, and write the rows to the online store.

One entity (``entity``, join key ``entity_id``: the id every interaction event carries) and
two views:

``entity_activity``
    ``events_1h``, ``events_24h`` (Int64): events in the last hour (day) before the entity's
    newest event, in steps of one minute (fifteen minutes): hopping windows that end at the
    entity's own newest event, never at the clock, so arrival order does not change them.
    ``events_total`` (Int64): events seen overall (each ``event_id`` once).
    ``last_event_ts`` (Float64, unix seconds): time of the latest event. Recency ("seconds
    since the last event") changes while nothing happens, so it cannot be stored; consumers
    derive it as ``now - last_event_ts``.

``entity_numeric``
    ``value_mean``, ``amount_mean`` (Float64): means of the numeric attributes ``value`` and
    ``amount`` over the events that carried them (null when none did).
    ``last_event_type`` (String): type of the latest event.
    ``last_category`` (String): the categorical attribute ``category`` of the latest event
    that carried one (null when none did).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, Field, FileSource, KafkaSource, StreamFeatureView, ValueType
from feast.aggregation import Aggregation
from feast.data_format import JsonFormat
from feast.types import Float64, Int64, String

# Absolute, so `feast apply` gives the same result whatever the cwd.
DATA_DIR = Path(__file__).resolve().parent / "data"

# Generous: the store only serves the latest value per entity, and a quiet entity's
# features are still the best thing known about it. Older values are served as STALE.
FEATURE_TTL = timedelta(days=7)

entity = Entity(
    name="entity",
    join_keys=["entity_id"],
    # Declared so Feast never has to infer the key type from the (empty) batch source.
    value_type=ValueType.STRING,
    description="Anything that emits interaction events (a user, a device, an item).",
)

# The interaction events stream (the topic `events.raw`), flattened into the columns a view
# may name: the event's own fields, its numeric and categorical attributes.
events = KafkaSource(
    name="events",
    topic="events.raw",
    kafka_bootstrap_servers="localhost:9092",  # LoopMesh uses the mesh's Kafka settings
    timestamp_field="event_time",
    message_format=JsonFormat(
        schema_json=(
            "event_id string, entity_id string, event_type string, event_time timestamp, "
            "value double, amount double, category string"
        )
    ),
    # Allowed lateness: an event older than an entity's newest by more is counted late.
    watermark_delay_threshold=timedelta(hours=24),
    # Feast requires a batch source; LoopMesh never reads it (the stream is the truth).
    batch_source=FileSource(
        name="events_batch",
        path=str(DATA_DIR / "events.parquet"),
        timestamp_field="event_time",
    ),
)

entity_activity = StreamFeatureView(
    name="entity_activity",
    entities=[entity],
    ttl=FEATURE_TTL,
    source=events,
    timestamp_field="event_time",
    schema=[
        Field(name="entity_id", dtype=String),
        Field(name="events_1h", dtype=Int64, description="Events in the hour before the last."),
        Field(name="events_24h", dtype=Int64, description="Events in the day before the last."),
        Field(name="events_total", dtype=Int64, description="Events seen overall."),
        Field(name="last_event_ts", dtype=Float64, description="Latest event, unix seconds."),
    ],
    aggregations=[
        Aggregation(
            column="event_id",
            function="count",
            time_window=timedelta(hours=1),
            slide_interval=timedelta(minutes=1),
            name="events_1h",
        ),
        Aggregation(
            column="event_id",
            function="count",
            time_window=timedelta(hours=24),
            slide_interval=timedelta(minutes=15),
            name="events_24h",
        ),
        Aggregation(column="event_id", function="count", name="events_total"),
        Aggregation(column="event_time", function="max", name="last_event_ts"),
    ],
    online=True,
)

entity_numeric = StreamFeatureView(
    name="entity_numeric",
    entities=[entity],
    ttl=FEATURE_TTL,
    source=events,
    timestamp_field="event_time",
    schema=[
        Field(name="entity_id", dtype=String),
        Field(name="value_mean", dtype=Float64, description="Mean of numeric attr `value`."),
        Field(name="amount_mean", dtype=Float64, description="Mean of numeric attr `amount`."),
        Field(name="last_event_type", dtype=String, description="Type of the latest event."),
        Field(name="last_category", dtype=String, description="Latest `category` attribute."),
    ],
    aggregations=[
        Aggregation(column="value", function="mean", name="value_mean"),
        Aggregation(column="amount", function="mean", name="amount_mean"),
        Aggregation(column="event_type", function="last", name="last_event_type"),
        Aggregation(column="category", function="last", name="last_category"),
    ],
    online=True,
)
