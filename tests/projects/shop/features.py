"""A shop's own features, declared the way any Feast user declares stream features.

Two entity kinds: customers (the event's own ``entity_id``) and items (``item_id``, carried
in each event's ``entities``). LoopMesh computes every view below from the events topic.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, Field, FileSource, KafkaSource, StreamFeatureView, ValueType
from feast.aggregation import Aggregation
from feast.data_format import JsonFormat
from feast.types import Float64, Int64, String

DATA = Path(__file__).resolve().parent / "data"

customer = Entity(name="customer", join_keys=["entity_id"], value_type=ValueType.STRING)
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING)

shop_events = KafkaSource(
    name="shop_events",
    topic="events.raw",
    kafka_bootstrap_servers="localhost:9092",
    timestamp_field="event_time",
    message_format=JsonFormat(
        schema_json=(
            "event_id string, entity_id string, item_id string, event_type string, "
            "event_time timestamp, price double, quantity double, channel string"
        )
    ),
    watermark_delay_threshold=timedelta(hours=2),
    batch_source=FileSource(
        name="shop_events_batch", path=str(DATA / "events.parquet"), timestamp_field="event_time"
    ),
)

customer_spend = StreamFeatureView(
    name="customer_spend",
    entities=[customer],
    source=shop_events,
    timestamp_field="event_time",
    ttl=timedelta(days=30),
    schema=[
        Field(name="entity_id", dtype=String),
        Field(name="spend_2h", dtype=Float64),
        Field(name="price_mean_30m", dtype=Float64),
        Field(name="price_mean_6h", dtype=Float64),
        Field(name="channel", dtype=String),  # no aggregation: the latest `channel` value
    ],
    aggregations=[
        Aggregation(
            column="price",
            function="sum",
            time_window=timedelta(hours=2),
            slide_interval=timedelta(minutes=10),
            name="spend_2h",
        ),
        Aggregation(
            column="price",
            function="mean",
            time_window=timedelta(minutes=30),
            slide_interval=timedelta(minutes=5),
            name="price_mean_30m",
        ),
        Aggregation(
            column="price",
            function="mean",
            time_window=timedelta(hours=6),
            slide_interval=timedelta(minutes=30),
            name="price_mean_6h",
        ),
    ],
)

customer_purchases = StreamFeatureView(
    name="customer_purchases",
    entities=[customer],
    source=shop_events,
    timestamp_field="event_time",
    ttl=timedelta(days=30),
    tags={"loopmesh.event_types": "purchase"},
    schema=[
        Field(name="entity_id", dtype=String),
        Field(name="purchases_1h", dtype=Int64),
        Field(name="max_quantity", dtype=Float64),
    ],
    aggregations=[
        Aggregation(
            column="event_id",
            function="count",
            time_window=timedelta(hours=1),
            slide_interval=timedelta(minutes=5),
            name="purchases_1h",
        ),
        Aggregation(column="quantity", function="max", name="max_quantity"),
    ],
)

item_stats = StreamFeatureView(
    name="item_stats",
    entities=[item],
    source=shop_events,
    timestamp_field="event_time",
    ttl=timedelta(days=30),
    schema=[
        Field(name="item_id", dtype=String),
        Field(name="item_events", dtype=Int64),
        Field(name="price_stddev_1h", dtype=Float64),
        Field(name="min_price", dtype=Float64),
        Field(name="last_event_type", dtype=String),
    ],
    aggregations=[
        Aggregation(column="event_id", function="count", name="item_events"),
        Aggregation(
            column="price",
            function="stddev",
            time_window=timedelta(hours=1),
            slide_interval=timedelta(minutes=10),
            name="price_stddev_1h",
        ),
        Aggregation(column="price", function="min", name="min_price"),
        Aggregation(column="event_type", function="last", name="last_event_type"),
    ],
)
