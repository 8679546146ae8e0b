"""Points of River's SEA stream, declared as any Feast user declares stream features;
LoopMesh computes them from the events the app ingests.

Each sample of the stream is an entity of its own (``point``, join key ``entity_id``): the app
ingests one ``observed`` event carrying the sample's three attributes, and the model reads
them back from the online store as the view's latest values when it is asked about that point.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, Field, FileSource, KafkaSource, StreamFeatureView, ValueType
from feast.aggregation import Aggregation
from feast.data_format import JsonFormat
from feast.types import Float64, String

DATA = Path(__file__).resolve().parent / "data"

point = Entity(name="point", join_keys=["entity_id"], value_type=ValueType.STRING)

point_events = KafkaSource(
    name="point_events",
    topic="events.raw",
    kafka_bootstrap_servers="localhost:9092",
    timestamp_field="event_time",
    message_format=JsonFormat(
        schema_json=(
            "event_id string, entity_id string, event_type string, event_time timestamp, "
            "x0 double, x1 double, x2 double"
        )
    ),
    watermark_delay_threshold=timedelta(minutes=30),
    batch_source=FileSource(
        name="point_events_batch", path=str(DATA / "events.parquet"), timestamp_field="event_time"
    ),
)

sea_point = StreamFeatureView(
    name="sea_point",
    entities=[point],
    source=point_events,
    timestamp_field="event_time",
    ttl=timedelta(hours=6),
    schema=[
        Field(name="entity_id", dtype=String),
        Field(name="x0", dtype=Float64),
        Field(name="x1", dtype=Float64),
        Field(name="x2", dtype=Float64),
    ],
    aggregations=[
        Aggregation(column="x0", function="last", name="x0"),
        Aggregation(column="x1", function="last", name="x1"),
        Aggregation(column="x2", function="last", name="x2"),
    ],
    tags={"loopmesh.event_types": "observed"},
)
