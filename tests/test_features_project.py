"""A project outside the package declares its own features; LoopMesh computes them.

``tests/projects/shop`` is a user's Feast repository: two entity kinds (customers, and items
named in each event's ``entities``), a windowed sum, a count filtered by event type, a mean
over two windows, latest values, a stddev over a window. A real ``python -m
loopmesh.features`` worker computes them from the events topic, on SQLite and on a real
redis-server. Every value read online must equal the aggregate computed here, straight from
the events sent, by the rules of docs/features.md: also after duplicates, late events (reported
to the DLQ, never counted), a SIGKILL restart, and an erasure of an item.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import statistics
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from loopmesh.devstack.process import free_port, log_tail
from loopmesh.devstack.redis import RedisServer
from loopmesh.gen.loopmesh.v1 import features_pb2, features_pb2_grpc
from loopmesh.mesh.bus import EventProducer, declare_topics
from loopmesh.mesh.events import DeadLetter, InteractionEvent
from loopmesh.mesh.feature_repo import apply_repo, prepare_repo
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import ENTITIES_ERASED, EVENTS_RAW, Topic
from tests.helpers import eventually, read_topic, unique_topic
from tests.test_features_core import in_window
from tests.test_features_service import Worker, _serving

PROJECT = Path(__file__).parent / "projects" / "shop"
MIN, HOUR = 60.0, 3600.0
LATENESS = 2 * HOUR
CUSTOMERS = [f"c{i}" for i in range(5)]
ITEMS = [f"i{i}" for i in range(4)]


@dataclass
class Shop:
    worker: Worker
    stub: features_pb2_grpc.FeatureServiceStub
    producer: EventProducer
    events: Topic
    kafka: KafkaSettings
    run: str
    address: str
    repo: Path


@pytest.fixture(params=["sqlite", "redis"])
async def shop(
    request: pytest.FixtureRequest,
    kafka_settings: KafkaSettings,
    tmp_path: Path,
) -> AsyncIterator[Shop]:
    store = request.param
    env_store: dict[str, str] = {}
    redis_url = None
    if store == "redis":
        server: RedisServer = request.getfixturevalue("redis")
        redis_url = server.url
        env_store = {
            "LOOPMESH_FEATURES__ONLINE_STORE": "redis",
            "LOOPMESH_FEATURES__REDIS_URL": redis_url,
        }
    repo = prepare_repo(
        tmp_path / "repo",
        project=PROJECT,
        online_store="redis" if redis_url else "sqlite",
        redis_url=redis_url,
    )
    apply_repo(repo)
    events, erasures = unique_topic(EVENTS_RAW), unique_topic(ENTITIES_ERASED)
    await declare_topics(kafka_settings, [events, erasures])
    port = free_port()
    env = {
        **os.environ,
        **env_store,
        "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "LOOPMESH_KAFKA__DEFAULT_PARTITIONS": str(kafka_settings.default_partitions),
        "LOOPMESH_FEATURES__REPO_PATH": str(repo),
        "LOOPMESH_FEATURES__SERVER__PORT": str(port),
        "LOOPMESH_FEATURES__APP_ID": f"shop-{uuid.uuid4().hex[:8]}",
        "LOOPMESH_FEATURES__EVENTS_TOPIC": events.name,
        "LOOPMESH_FEATURES__ERASURES_TOPIC": erasures.name,
        "LOOPMESH_FEATURES__STREAM__SESSION_TIMEOUT_S": "6",
        "LOOPMESH_FEATURES__STREAM__HEARTBEAT_INTERVAL_S": "1",
        "LOOPMESH_FEATURES__STREAM__REBALANCE_TIMEOUT_S": "10",
    }
    worker = Worker(env, tmp_path / "worker.log")
    worker.start()
    producer = EventProducer(kafka_settings, "shop-test")
    await producer.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        await eventually(lambda: _serving(address), timeout=120, interval=0.5)
        yield Shop(
            worker,
            features_pb2_grpc.FeatureServiceStub(channel),
            producer,
            events,
            kafka_settings,
            uuid.uuid4().hex[:6],
            address,
            repo,
        )
        assert worker.stop() == 0, log_tail(worker.log)
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.kill()
        await channel.close()
        await producer.stop()


# ----------------------------------------------------------------- the rules, independently


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def expected(events: Iterable[InteractionEvent], run: str) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(join key, id): {feature: value}}`` by the definitions in tests/projects/shop."""
    distinct = list({e.event_id: e for e in events}.values())
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for customer in {e.entity_id for e in distinct}:
        mine = [e for e in distinct if e.entity_id == customer]
        newest = max(e.event_time.timestamp() for e in mine)
        latest_channel = max(
            (e for e in mine if "channel" in e.categorical),
            key=lambda e: (e.event_time, e.event_id),
            default=None,
        )

        def prices(width: float, slide: float, among: list[InteractionEvent]) -> list[float]:
            top = max(e.event_time.timestamp() for e in among)
            return [
                e.numeric["price"]
                for e in among
                if "price" in e.numeric and in_window(e.event_time.timestamp(), top, width, slide)
            ]

        spend = prices(2 * HOUR, 10 * MIN, mine)
        row: dict[str, Any] = {
            "spend_2h": math.fsum(spend) if spend else None,
            "price_mean_30m": _mean(prices(30 * MIN, 5 * MIN, mine)),
            "price_mean_6h": _mean(prices(6 * HOUR, 30 * MIN, mine)),
            "channel": latest_channel.categorical["channel"] if latest_channel else None,
        }
        assert newest
        buys = [e for e in mine if e.event_type == "purchase"]
        if buys:
            top = max(e.event_time.timestamp() for e in buys)
            quantities = [e.numeric["quantity"] for e in buys if "quantity" in e.numeric]
            row["purchases_1h"] = sum(
                in_window(e.event_time.timestamp(), top, HOUR, 5 * MIN) for e in buys
            )
            row["max_quantity"] = max(quantities) if quantities else None
        else:
            row["purchases_1h"] = row["max_quantity"] = None  # no row of that view at all
        out[("entity_id", customer)] = row
    for item in {e.entities["item_id"] for e in distinct if "item_id" in e.entities}:
        mine = [e for e in distinct if e.entities.get("item_id") == item]
        top = max(e.event_time.timestamp() for e in mine)
        in_hour = [
            e.numeric["price"]
            for e in mine
            if "price" in e.numeric and in_window(e.event_time.timestamp(), top, HOUR, 10 * MIN)
        ]
        all_prices = [e.numeric["price"] for e in mine if "price" in e.numeric]
        out[("item_id", item)] = {
            "item_events": len(mine),
            "price_stddev_1h": statistics.stdev(in_hour) if len(in_hour) >= 2 else None,
            "min_price": min(all_prices) if all_prices else None,
            "last_event_type": max(mine, key=lambda e: (e.event_time, e.event_id)).event_type,
        }
    return out


def shop_events(run: str, n: int, *, end: datetime, seed: int) -> list[InteractionEvent]:
    """``n`` events within 100 minutes before ``end``: none is late for another."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choice(["view", "view", "purchase"])
        numeric: dict[str, float] = {}
        if rng.random() < 0.8:
            numeric["price"] = round(rng.uniform(1, 200), 2)
        if kind == "purchase" and rng.random() < 0.7:
            numeric["quantity"] = float(rng.randint(1, 5))
        out.append(
            InteractionEvent(
                entity_id=f"{run}-{rng.choice(CUSTOMERS)}",
                event_type=kind,
                event_time=end - timedelta(minutes=0 if i == 0 else rng.uniform(0, 100)),
                numeric=numeric,
                categorical={"channel": rng.choice(["web", "app"])} if rng.random() < 0.5 else {},
                entities={"item_id": f"{run}-{rng.choice(ITEMS)}"},
            )
        )
    return out


# ----------------------------------------------------------------------------- reading


async def read_all(shop: Shop, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {}
    by_join_key: dict[str, list[str]] = {}
    for join_key, entity in keys:
        by_join_key.setdefault(join_key, []).append(entity)
    for join_key, entities in by_join_key.items():
        reply = await shop.stub.GetOnlineFeatures(
            features_pb2.GetOnlineFeaturesRequest(entity_ids=entities, join_key=join_key),
            timeout=10,
        )
        for entity in reply.entities:
            row = {}
            for ref, value in zip(reply.feature_refs, entity.values, strict=True):
                kind = value.value.WhichOneof("kind")
                row[ref.split(":")[1]] = getattr(value.value, kind) if kind else None
            out[(join_key, entity.entity_id)] = row
    return out


def matches(got: dict[str, Any], want: dict[str, Any]) -> bool:
    if got.keys() != want.keys():
        return False
    for name, value in want.items():
        if isinstance(value, float):
            if got[name] is None or not math.isclose(got[name], value, rel_tol=1e-9, abs_tol=1e-9):
                return False
        elif isinstance(value, int):
            if got[name] != float(value):
                return False
        elif got[name] != value:
            return False
    return True


async def served_as_expected(shop: Shop, want: dict[tuple[str, str], dict[str, Any]]) -> None:
    async def check() -> bool:
        got = await read_all(shop, want)
        return all(matches(got[key], row) for key, row in want.items())

    try:
        await eventually(check, timeout=120, interval=0.3)
    except AssertionError as err:
        got = await read_all(shop, want)
        wrong = {k: (got[k], w) for k, w in want.items() if not matches(got[k], w)}
        raise AssertionError(f"got vs want: {wrong}\n{log_tail(shop.worker.log)}") from err


# ------------------------------------------------------------------------------- tests


async def test_a_projects_own_views_are_computed_exactly(shop: Shop) -> None:
    end = datetime.now(UTC) - timedelta(minutes=5)
    events = shop_events(shop.run, 160, end=end, seed=11)
    # Everyone's newest event at `end`, so the late events below are late for every view.
    anchors = [
        InteractionEvent(
            entity_id=f"{shop.run}-{c}",
            event_type="purchase",
            event_time=end,
            numeric={"price": 10.0, "quantity": 1.0},
            entities={"item_id": f"{shop.run}-{ITEMS[i % len(ITEMS)]}"},
        )
        for i, c in enumerate(CUSTOMERS)
    ]
    sent = anchors + events
    rng = random.Random(5)
    duplicates = rng.sample(sent, 30)  # written again under the same ids
    await shop.producer.publish_many(shop.events, sent + duplicates)
    await served_as_expected(shop, expected(sent, shop.run))

    # Late: older than the views' newest by more than the allowed lateness (2 h).
    late = [
        InteractionEvent(
            entity_id=f"{shop.run}-{c}",
            event_type="purchase",
            event_time=end - timedelta(hours=3),
            numeric={"price": 1000.0, "quantity": 99.0},
            entities={"item_id": f"{shop.run}-{ITEMS[0]}"},
        )
        for c in CUSTOMERS[:2]
    ]
    await shop.producer.publish_many(shop.events, late)
    # Reported with the reason, where the offset of the event names it.
    records = await read_topic(shop.kafka, shop.events.dlq, expect=len(late), timeout=60)
    letters = [DeadLetter.model_validate_json(value or b"") for _, value, _ in records]
    reported = {InteractionEvent.model_validate_json(d.value or b"").event_id for d in letters}
    assert reported == {e.event_id for e in late}
    assert all(d.reason.startswith("late:") for d in letters), letters

    # A SIGKILL, then the same events again plus new ones: nothing counted twice.
    shop.worker.kill()
    shop.worker.start()
    await eventually(lambda: _serving(shop.address), timeout=120, interval=0.5)
    newer = shop_events(shop.run, 20, end=end + timedelta(minutes=2), seed=12)
    await shop.producer.publish_many(shop.events, newer + rng.sample(sent, 40))
    want = expected(sent + newer, shop.run)
    await served_as_expected(shop, want)

    # Erasing an item (its own join key) removes its values; the customers keep theirs.
    item = f"{shop.run}-{ITEMS[1]}"
    await shop.stub.DeleteEntity(
        features_pb2.DeleteEntityRequest(entity_id=item, join_key="item_id", reason="test"),
        timeout=30,
    )
    want[("item_id", item)] = dict.fromkeys(want[("item_id", item)])
    want[("item_id", item)]["item_events"] = None
    await served_as_expected(shop, want)


NEW_VIEW = """
from datetime import timedelta

from feast import Field, StreamFeatureView
from feast.aggregation import Aggregation
from feast.types import Float64, Int64, String

from features import customer, shop_events

customer_views = StreamFeatureView(
    name="customer_views",
    entities=[customer],
    source=shop_events,
    timestamp_field="event_time",
    ttl=timedelta(days=30),
    tags={"loopmesh.event_types": "view"},
    schema=[
        Field(name="entity_id", dtype=String),
        Field(name="views_total", dtype=Int64),
        Field(name="view_price_sum", dtype=Float64),
    ],
    aggregations=[
        Aggregation(column="event_id", function="count", name="views_total"),
        Aggregation(column="price", function="sum", name="view_price_sum"),
    ],
)
"""


def views_expected(events: Iterable[InteractionEvent]) -> dict[tuple[str, str], dict[str, Any]]:
    distinct = list({e.event_id: e for e in events}.values())
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for customer in {e.entity_id for e in distinct}:
        seen = [e for e in distinct if e.entity_id == customer and e.event_type == "view"]
        prices = [e.numeric["price"] for e in seen if "price" in e.numeric]
        out[("entity_id", customer)] = {
            "views_total": len(seen) if seen else None,
            "view_price_sum": math.fsum(prices) if prices else None,
        }
    return out


async def test_a_view_added_to_a_running_mesh_fills_from_the_retained_events(shop: Shop) -> None:
    end = datetime.now(UTC) - timedelta(minutes=5)
    before = shop_events(shop.run, 80, end=end, seed=21)
    await shop.producer.publish_many(shop.events, before)
    await served_as_expected(shop, expected(before, shop.run))
    assert shop.worker.stop() == 0, log_tail(shop.worker.log)

    # The project gains a view; it is applied and the worker restarts.
    (shop.repo / "views.py").write_text(NEW_VIEW)
    apply_repo(shop.repo)
    shop.worker.start()
    await eventually(lambda: _serving(shop.address), timeout=120, interval=0.5)
    after = shop_events(shop.run, 20, end=end + timedelta(minutes=1), seed=22)
    await shop.producer.publish_many(shop.events, after)

    # The new view counts every retained event once (the backfill up to the committed
    # offsets, the live fold after them); the old views are not recounted.
    want = expected(before + after, shop.run)
    for key, row in views_expected(before + after).items():
        want[key] = {**want[key], **row}
    await served_as_expected(shop, want)
    assert "backfilled" in shop.worker.log.read_text()


@pytest.mark.parametrize("shop", ["sqlite"], indirect=True)
async def test_two_workers_one_killed_mid_stream_still_count_each_event_once(
    shop: Shop, tmp_path: Path
) -> None:
    # A second member of the same group, on its own port: the partitions are split.
    env = {**shop.worker.env, "LOOPMESH_FEATURES__SERVER__PORT": str(free_port())}
    second = Worker(env, tmp_path / "second.log")
    second.start()
    try:
        # Started means assigned: its agents return from start once partitions are theirs.
        async def joined() -> bool:
            return "features started" in second.log.read_text()

        await eventually(joined, timeout=120, interval=0.5)
        end = datetime.now(UTC) - timedelta(minutes=5)
        events = shop_events(shop.run, 3000, end=end, seed=31)
        chunks = [events[i : i + 250] for i in range(0, len(events), 250)]
        for i, chunk in enumerate(chunks):
            await shop.producer.publish_many(shop.events, chunk)
            if i == len(chunks) // 2:
                second.kill()  # mid-stream: its partitions move to the first worker
        await served_as_expected(shop, expected(events, shop.run))
    finally:
        if second.proc is not None and second.proc.poll() is None:
            second.proc.kill()


def test_a_model_spec_reading_an_undeclared_feature_stops_the_features_service(
    tmp_path: Path,
) -> None:
    """Issue 18: a spec's inputs are checked against the project's declarations at start."""
    from loopmesh.features.settings import FeaturesScope
    from loopmesh.features.store import FeastGateway
    from loopmesh.mesh.model_spec import SpecError

    project = tmp_path / "project"
    shutil.copytree(PROJECT, project)
    (project / "models").mkdir()
    spec = (
        "name: {name}\ntask: regression\ninputs: {{features: [{refs}]}}\nlabel: {{source: value}}\n"
    )
    (project / "models" / "good.yaml").write_text(
        spec.format(name="good", refs='"customer_spend:spend_2h"')
    )

    def opened(where: str) -> FeastGateway:
        repo = prepare_repo(tmp_path / where, project=project)
        apply_repo(repo)
        return FeastGateway.open(FeaturesScope(repo_path=repo))

    opened("ok").close()  # declared: the service starts
    (project / "models" / "bad.yaml").write_text(
        spec.format(name="bad", refs='"customer_spend:spend_2h", "customer_spend:nope"')
    )
    with pytest.raises(SpecError, match="declares no 'customer_spend:nope'") as caught:
        opened("bad")
    assert caught.value.field == "models/bad.yaml: inputs.features[1]"
