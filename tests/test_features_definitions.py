"""Feast declarations become what the features workers compute, or a start-up error that names
the view and the field: never a view that silently stays empty.

The declarations are real Feast objects, written the way a project writes them.
"""

from __future__ import annotations

import warnings
from datetime import timedelta
from typing import Any

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:Stream feature views are experimental")
warnings.filterwarnings("ignore", message="Stream feature views are experimental")

from feast import Entity, Field, FileSource, KafkaSource, StreamFeatureView, ValueType  # noqa: E402
from feast.aggregation import Aggregation  # noqa: E402
from feast.data_format import JsonFormat  # noqa: E402
from feast.types import Float64, Int64, String  # noqa: E402

from loopmesh.features.definitions import (  # noqa: E402
    DefinitionError,
    load_definitions,
    parse_schema,
)
from loopmesh.mesh.errors import SetupError  # noqa: E402
from tests.test_features_core import DEFAULT_VIEWS  # noqa: E402

user = Entity(name="user", join_keys=["entity_id"], value_type=ValueType.STRING)
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING)
SCHEMA = "event_id string, entity_id string, item_id string, event_type string, " + (
    "event_time timestamp, price double, page string"
)


def source(schema: str = SCHEMA, topic: str = "events.raw", **kwargs: Any) -> KafkaSource:
    return KafkaSource(
        name="events",
        topic=topic,
        kafka_bootstrap_servers="localhost:9092",
        timestamp_field=kwargs.pop("timestamp_field", "event_time"),
        message_format=JsonFormat(schema_json=schema),
        batch_source=FileSource(name="b", path="/tmp/x.parquet", timestamp_field="event_time"),
        **kwargs,
    )


def view(
    aggregations: list[Aggregation],
    fields: list[Field],
    *,
    entity: Entity = user,
    src: KafkaSource | None = None,
    **kwargs: Any,
) -> StreamFeatureView:
    return StreamFeatureView(
        name="v",
        entities=[entity],
        source=src or source(),
        timestamp_field="event_time",
        schema=[Field(name=entity.join_key, dtype=String), *fields],
        aggregations=aggregations,
        **kwargs,
    )


def load(*views: StreamFeatureView) -> Any:
    return load_definitions(views, [user, item], default_lateness_s=3600.0)


def test_the_default_project_is_exactly_the_features_served_before() -> None:
    import importlib.util

    from loopmesh.mesh.feature_repo import FEATURE_REPO_DIR

    spec = importlib.util.spec_from_file_location(
        "default_project", FEATURE_REPO_DIR / "features.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    definitions = load_definitions(
        [module.entity_activity, module.entity_numeric], [module.entity], default_lateness_s=1.0
    )
    assert definitions.views == DEFAULT_VIEWS


def test_a_valid_view_with_a_second_entity_kind_and_a_filter() -> None:
    definitions = load(
        view(
            [
                Aggregation(column="price", function="sum", time_window=timedelta(hours=1)),
                Aggregation(column="event_id", function="count", name="n"),
            ],
            [
                Field(name="sum_price_3600s", dtype=Float64),
                Field(name="n", dtype=Int64),
                Field(name="page", dtype=String),
            ],
            entity=item,
            tags={"loopmesh.event_types": "Buy, refund"},
            src=source(watermark_delay_threshold=timedelta(minutes=10)),
        )
    )
    (spec,) = definitions.views
    assert spec.join_key == "item_id"
    assert spec.event_types == frozenset({"buy", "refund"})
    assert spec.allowed_lateness_s == 600
    # Feast's default name, a tumbling window (slide = window), and the latest `page` value.
    assert [(a.feature, a.function, a.window_s, a.slide_s) for a in spec.aggregations] == [
        ("sum_price_3600s", "sum", 3600.0, 3600.0),
        ("n", "count", None, None),
        ("page", "last", None, None),
    ]


@pytest.mark.parametrize(
    ("make", "field", "reason"),
    [
        (
            lambda: view(
                [Aggregation(column="price", function="median", name="m")],
                [Field(name="m", dtype=Float64)],
            ),
            "aggregations[0].function",
            "unknown function 'median'",
        ),
        (
            lambda: view(
                [Aggregation(column="item_id", function="count_distinct", name="m")],
                [Field(name="m", dtype=Int64)],
            ),
            "aggregations[0].function",
            "count_distinct needs unbounded state",
        ),
        (
            lambda: view(
                [Aggregation(column="amount", function="sum", name="s")],
                [Field(name="s", dtype=Float64)],
            ),
            "aggregations[0].column",
            "no event column 'amount'",
        ),
        (
            lambda: view(
                [Aggregation(column="page", function="mean", name="s")],
                [Field(name="s", dtype=Float64)],
            ),
            "aggregations[0].column",
            "mean needs a numeric column",
        ),
        (
            lambda: view(
                [Aggregation(column="price", function="sum", name="s")],
                [Field(name="s", dtype=Int64)],
            ),
            "schema[s].dtype",
            "sum of a numeric column is Float32/Float64, not Int64",
        ),
        (
            lambda: view([Aggregation(column="price", function="sum", name="s")], []),
            "aggregations[0].name",
            "'s' is not a field of the view's schema",
        ),
        (
            lambda: view([], [Field(name="nowhere", dtype=Float64)]),
            "schema[nowhere]",
            "no aggregation produces it and no event column has its name",
        ),
        (
            lambda: view(
                [
                    Aggregation(
                        column="price",
                        function="sum",
                        name="s",
                        time_window=timedelta(hours=1),
                        slide_interval=timedelta(minutes=7),
                    )
                ],
                [Field(name="s", dtype=Float64)],
            ),
            "aggregations[0].slide_interval",
            "whole number of slides",
        ),
        (
            lambda: view(
                [
                    Aggregation(
                        column="price",
                        function="sum",
                        name="s",
                        time_window=timedelta(days=7),
                        slide_interval=timedelta(minutes=1),
                    )
                ],
                [Field(name="s", dtype=Float64)],
            ),
            "aggregations[0].slide_interval",
            "10080 slides per window, at most 1440",
        ),
        (
            lambda: view(
                [Aggregation(column="price", function="sum", name="s")],
                [Field(name="s", dtype=Float64)],
                src=source(topic="clicks"),
            ),
            "source.topic",
            "'clicks': LoopMesh computes views over 'events.raw'",
        ),
        (
            lambda: view(
                [Aggregation(column="price", function="sum", name="s")],
                [Field(name="s", dtype=Float64)],
                tags={"loopmesh.filter": "x"},
            ),
            "tags[loopmesh.filter]",
            "unknown",
        ),
        (
            lambda: view(
                [Aggregation(column="price", function="sum", name="s")],
                [Field(name="s", dtype=Float64)],
                src=source(schema="event_id string, event_time timestamp, price double"),
                entity=item,
            ),
            "entities",
            "join key 'item_id' must be a string column",
        ),
        (
            lambda: view(
                [Aggregation(column="price", function="sum", name="s")],
                [Field(name="s", dtype=Float64)],
                udf=lambda df: df,
                mode="pandas",
            ),
            "udf",
            "LoopMesh runs no transformation",
        ),
    ],
)
def test_what_loopmesh_cannot_compute_is_refused_naming_view_and_field(
    make: Any, field: str, reason: str
) -> None:
    with pytest.raises(DefinitionError) as err:
        load(make())
    assert err.value.view == "v"
    assert err.value.field == f"stream feature view 'v', {field}"
    assert reason in err.value.message, err.value.message


def test_a_bad_source_schema_names_the_source_and_column() -> None:
    with pytest.raises(SetupError, match=r"source 'events': message_format.schema_json\[1\]"):
        parse_schema("price double, when timestamp", source="events")
    with pytest.raises(
        SetupError, match=r"schema_json\[0\]: type 'map<string' of 'price' is not one of"
    ):
        parse_schema("price map<string,int>", source="events")
