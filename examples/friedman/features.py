"""Delivery zones and their recent activity, declared as any Feast user declares stream
features; LoopMesh computes them from the events the app ingests.

Each request's app event carries the request's first two inputs (``x0``, ``x1``); the zone's
recent mean of them and its request count are features the model reads from the store.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, Field, FileSource, KafkaSource, StreamFeatureView, ValueType
from feast.aggregation import Aggregation
from feast.data_format import JsonFormat
from feast.types import Float64, Int64, String

DATA = Path(__file__).resolve().parent / "data"

zone = Entity(name="zone", join_keys=["entity_id"], value_type=ValueType.STRING)

zone_events = KafkaSource(
    name="zone_events",
    topic="events.raw",
    kafka_bootstrap_servers="localhost:9092",
    timestamp_field="event_time",
    message_format=JsonFormat(
        schema_json=(
            "event_id string, entity_id string, event_type string, event_time timestamp, "
            "x0 double, x1 double"
        )
    ),
    watermark_delay_threshold=timedelta(minutes=30),
    batch_source=FileSource(
        name="zone_events_batch", path=str(DATA / "events.parquet"), timestamp_field="event_time"
    ),
)

zone_activity = StreamFeatureView(
    name="zone_activity",
    entities=[zone],
    source=zone_events,
    timestamp_field="event_time",
    ttl=timedelta(hours=6),
    schema=[
        Field(name="entity_id", dtype=String),
        Field(name="x0_mean_5m", dtype=Float64),
        Field(name="x1_mean_5m", dtype=Float64),
        Field(name="requests_5m", dtype=Int64),
    ],
    aggregations=[
        Aggregation(
            column="x0",
            function="mean",
            time_window=timedelta(minutes=5),
            slide_interval=timedelta(seconds=30),
            name="x0_mean_5m",
        ),
        Aggregation(
            column="x1",
            function="mean",
            time_window=timedelta(minutes=5),
            slide_interval=timedelta(seconds=30),
            name="x1_mean_5m",
        ),
        Aggregation(
            column="x0",
            function="count",
            time_window=timedelta(minutes=5),
            slide_interval=timedelta(seconds=30),
            name="requests_5m",
        ),
    ],
)
