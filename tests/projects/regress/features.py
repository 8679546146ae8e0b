"""A video app's own features: one entity kind (viewers) and one stream view over its events.

The ``minutes`` model (``models/minutes.yaml``) reads only what the caller sends with Predict;
this view is the project's Feast side, declared the way any Feast user declares it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, Field, FileSource, KafkaSource, StreamFeatureView, ValueType
from feast.aggregation import Aggregation
from feast.data_format import JsonFormat
from feast.types import Float64, Int64, String

DATA = Path(__file__).resolve().parent / "data"

viewer = Entity(name="viewer", join_keys=["entity_id"], value_type=ValueType.STRING)

plays = KafkaSource(
    name="plays",
    topic="events.raw",
    kafka_bootstrap_servers="localhost:9092",
    timestamp_field="event_time",
    message_format=JsonFormat(
        schema_json="event_id string, entity_id string, event_time timestamp, minutes double"
    ),
    watermark_delay_threshold=timedelta(hours=1),
    batch_source=FileSource(
        name="plays_batch", path=str(DATA / "plays.parquet"), timestamp_field="event_time"
    ),
)

viewer_plays = StreamFeatureView(
    name="viewer_plays",
    entities=[viewer],
    source=plays,
    timestamp_field="event_time",
    ttl=timedelta(days=7),
    schema=[
        Field(name="entity_id", dtype=String),
        Field(name="plays_1h", dtype=Int64),
        Field(name="minutes_mean_1h", dtype=Float64),
    ],
    aggregations=[
        Aggregation(
            column="event_id",
            function="count",
            time_window=timedelta(hours=1),
            slide_interval=timedelta(minutes=5),
            name="plays_1h",
        ),
        Aggregation(
            column="minutes",
            function="mean",
            time_window=timedelta(hours=1),
            slide_interval=timedelta(minutes=5),
            name="minutes_mean_1h",
        ),
    ],
)
