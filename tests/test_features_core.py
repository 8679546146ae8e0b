"""The features service's pure logic: the fold (hopping windows, idempotency, order, lateness,
erasure, bounded state), statuses, request checks, the point-in-time export and the online
store choice.

Expected values are computed here independently, straight from the event lists and the
definitions' rules (docs/features.md).
"""

from __future__ import annotations

import math
import random
import statistics
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from loopmesh.features.core import (
    DAY,
    HOUR,
    EntityFold,
    FeatureSchema,
    FeatureSpec,
    FeatureStatus,
    Outcome,
    RequestError,
    StoredValue,
    event_columns,
    state_bytes_bound,
    status_of,
    validate_entity_ids,
)
from loopmesh.features.definitions import AggregationSpec, ViewSpec
from loopmesh.features.export import export_training_frame
from loopmesh.features.repo import feast_config
from loopmesh.features.settings import FeaturesSettings
from loopmesh.mesh.events import InteractionEvent
from loopmesh.mesh.feature_repo import prepare_repo

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MINUTE = 60.0


def _agg(
    feature: str,
    function: str,
    column: str,
    kind: str,
    dtype: str,
    window: float | None = None,
    slide: float | None = None,
) -> AggregationSpec:
    return AggregationSpec(feature, function, column, kind, window, slide, dtype)  # type: ignore[arg-type]


DEFAULT_VIEWS = (
    ViewSpec(
        name="entity_activity",
        entity="entity",
        join_key="entity_id",
        aggregations=(
            _agg("events_1h", "count", "event_id", "categorical", "Int64", HOUR, MINUTE),
            _agg("events_24h", "count", "event_id", "categorical", "Int64", DAY, 15 * MINUTE),
            _agg("events_total", "count", "event_id", "categorical", "Int64"),
            _agg("last_event_ts", "max", "event_time", "numeric", "Float64"),
        ),
        event_types=None,
        allowed_lateness_s=DAY,
        ttl_s=7 * DAY,
        timestamp_column="event_time",
    ),
    ViewSpec(
        name="entity_numeric",
        entity="entity",
        join_key="entity_id",
        aggregations=(
            _agg("value_mean", "mean", "value", "numeric", "Float64"),
            _agg("amount_mean", "mean", "amount", "numeric", "Float64"),
            _agg("last_event_type", "last", "event_type", "categorical", "String"),
            _agg("last_category", "last", "category", "categorical", "String"),
        ),
        event_types=None,
        allowed_lateness_s=DAY,
        ttl_s=7 * DAY,
        timestamp_column="event_time",
    ),
)
"""The default project's views (feature_store/features.py; test_features_definitions checks
that the applied definitions give exactly these)."""


def ev(
    minutes: float,
    *,
    entity: str = "u",
    kind: str = "click",
    value: float | None = None,
    amount: float | None = None,
    category: str | None = None,
    event_id: str | None = None,
) -> InteractionEvent:
    numeric = {k: v for k, v in (("value", value), ("amount", amount)) if v is not None}
    return InteractionEvent(
        entity_id=entity,
        event_type=kind,
        event_time=T0 + timedelta(minutes=minutes),
        numeric=numeric,
        categorical={"category": category} if category is not None else {},
        **({"event_id": event_id} if event_id else {}),
    )


def fold(
    events: list[InteractionEvent], views: tuple[ViewSpec, ...] = DEFAULT_VIEWS, **kwargs: int
) -> EntityFold:
    state = EntityFold("entity_id", "u", views, **kwargs)
    for event in events:
        state.apply(event, event_columns(event))
    return state


def in_window(t: float, newest: float, width: float, slide: float) -> bool:
    """The hopping-window rule: the event's slide is one of the window's width/slide slides
    up to the newest event's."""
    return math.floor(t / slide) > math.floor(newest / slide) - round(width / slide)


def expected(events: list[InteractionEvent]) -> dict[str, object]:
    """The default project's feature values by definition, from distinct events."""
    distinct = list({e.event_id: e for e in events}.values())
    newest = max(e.event_time.timestamp() for e in distinct)
    latest = max(distinct, key=lambda e: (e.event_time, e.event_id))
    with_category = [e for e in distinct if "category" in e.categorical]
    values = [e.numeric["value"] for e in distinct if "value" in e.numeric]
    amounts = [e.numeric["amount"] for e in distinct if "amount" in e.numeric]
    times = [e.event_time.timestamp() for e in distinct]
    return {
        "events_1h": sum(in_window(t, newest, HOUR, MINUTE) for t in times),
        "events_24h": sum(in_window(t, newest, DAY, 15 * MINUTE) for t in times),
        "events_total": len(distinct),
        "last_event_ts": newest,
        "value_mean": math.fsum(values) / len(values) if values else None,
        "amount_mean": math.fsum(amounts) / len(amounts) if amounts else None,
        "last_event_type": latest.event_type,
        "last_category": max(with_category, key=lambda e: (e.event_time, e.event_id)).categorical[
            "category"
        ]
        if with_category
        else None,
    }


def flat(state: EntityFold) -> dict[str, object]:
    out: dict[str, object] = {}
    for row in state.rows().values():
        out.update({k: v for k, v in row.items() if k not in ("entity_id", "event_time")})
    return out


def approx_equal(got: dict[str, object], want: dict[str, object]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        if isinstance(value, float):
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-9), name
        else:
            assert got[name] == value, name


def test_windows_end_at_the_newest_event_not_the_clock() -> None:
    events = [
        ev(0, value=1.0, category="a"),
        ev(-30, value=2.0, amount=10.0),
        ev(-60, kind="view"),  # exactly 1 h before the newest: its slide left the window
        ev(-61, value=3.0, category="b"),
        ev(-23 * 60),
        ev(-24 * 60),  # exactly 24 h before: outside the 24 h window, still counted overall
    ]
    got = flat(fold(sorted(events, key=lambda e: e.event_time)))  # in order: nothing is late
    approx_equal(got, expected(events))
    assert got["events_1h"] == 2
    assert got["events_24h"] == 5
    assert got["events_total"] == 6
    assert got["value_mean"] == 2.0
    assert got["amount_mean"] == 10.0
    assert got["last_category"] == "a"


def test_a_window_moves_in_whole_slides() -> None:
    # 12:00:30 and 12:59:59 are in the hour that ends with the newest event's minute (12:59);
    # 11:59:59 is not, though less than an hour older than the newest event.
    times = [T0 - timedelta(seconds=1), T0 + timedelta(seconds=30), T0 + timedelta(seconds=3599)]
    events = [InteractionEvent(entity_id="u", event_type="x", event_time=t) for t in times]
    assert flat(fold(events))["events_1h"] == 2


def test_redelivered_records_and_rewritten_ids_count_once_even_after_a_round_trip() -> None:
    events = [ev(i, value=float(i)) for i in range(5)]
    state = EntityFold("entity_id", "u", DEFAULT_VIEWS)
    for offset, event in enumerate(events):
        assert state.apply(event, event_columns(event), source=("t", offset))[0] is Outcome.ACCEPTED
    restored = EntityFold.load(state.key, state.to_bytes(), DEFAULT_VIEWS)
    # The same records again (a crash before the commit), and the same ids at new offsets.
    for offset, event in enumerate(events):
        assert (
            restored.apply(event, event_columns(event), source=("t", offset))[0]
            is Outcome.DUPLICATE
        )
        assert (
            restored.apply(event, event_columns(event), source=("t", 100 + offset))[0]
            is Outcome.DUPLICATE
        )
    approx_equal(flat(restored), expected(events))


def test_state_stays_bounded_however_hot_the_entity() -> None:
    # Before: every event id of the last day was kept, and 20,000 events made a 1.1 MB state
    # (over Kafka's default 1 MiB record); now the windows keep slide summaries and the
    # dedup memory keeps the newest ids only.
    state = EntityFold("entity_id", "u", DEFAULT_VIEWS, dedup_ids=1000)
    for i in range(20_000):
        event = ev(i * 0.05, value=float(i % 7), category=f"c{i % 3}")
        state.apply(event, event_columns(event), source=("t", i))
    size = len(state.to_bytes())
    assert size <= state_bytes_bound(DEFAULT_VIEWS, 1000)
    assert size < 100_000, size
    assert flat(state)["events_total"] == 20_000
    assert flat(state)["events_1h"] == 1200  # 60 slides of 20 events


def test_an_older_event_never_overwrites_newer_last_values() -> None:
    state = fold([ev(10, kind="buy", category="new")])
    old = ev(5, kind="view", category="old")
    assert state.apply(old, event_columns(old)) == (Outcome.ACCEPTED, [])
    got = flat(state)
    assert got["last_event_type"] == "buy"
    assert got["last_category"] == "new"
    assert got["events_total"] == 2
    assert got["last_event_ts"] == (T0 + timedelta(minutes=10)).timestamp()


def test_events_beyond_the_allowed_lateness_are_reported_not_folded() -> None:
    views = tuple(ViewSpec(**{**v.__dict__, "allowed_lateness_s": HOUR}) for v in DEFAULT_VIEWS)
    state = fold([ev(0)], views)
    late = ev(-61)
    assert state.apply(late, event_columns(late)) == (
        Outcome.TOO_LATE,
        ["entity_activity", "entity_numeric"],
    )
    on_time = ev(-59)
    assert state.apply(on_time, event_columns(on_time)) == (Outcome.ACCEPTED, [])
    assert flat(state)["events_total"] == 2


@pytest.mark.parametrize("seed", range(40))
def test_any_arrival_order_and_redelivery_give_the_same_values(seed: int) -> None:
    rng = random.Random(seed)
    # Within the allowed lateness (24 h) of the newest event, where order must not matter.
    offsets = [rng.randint(-24 * 60 + 1, 0) for _ in range(rng.randint(1, 30))]
    events = [
        ev(
            m,
            kind=rng.choice(["a", "b", "c"]),
            value=rng.choice([None, rng.uniform(-1e6, 1e6)]),
            amount=rng.choice([None, rng.uniform(0, 1e3)]),
            category=rng.choice([None, "x", "y"]),
        )
        for m in offsets
    ]
    in_order = fold(sorted(events, key=lambda e: e.event_time))
    shuffled = events + rng.sample(events, k=len(events) // 2)  # some delivered twice
    rng.shuffle(shuffled)
    approx_equal(flat(fold(shuffled)), flat(in_order))
    approx_equal(flat(in_order), expected(events))


@pytest.mark.parametrize("seed", range(10))
def test_every_function_over_hopping_windows_matches_its_definition(seed: int) -> None:
    rng = random.Random(seed)
    window, slide = 10 * MINUTE, 2 * MINUTE
    functions = ("count", "sum", "mean", "min", "max", "stddev")
    view = ViewSpec(
        name="stats",
        entity="entity",
        join_key="entity_id",
        aggregations=(
            *(
                _agg(
                    f, f, "value", "numeric", "Int64" if f == "count" else "Float64", window, slide
                )
                for f in functions
            ),
            _agg("total", "sum", "value", "numeric", "Float64"),
        ),
        event_types=frozenset({"buy"}),
        allowed_lateness_s=DAY,
        ttl_s=DAY,
        timestamp_column="event_time",
    )
    events = [
        ev(
            rng.uniform(0, 30),
            kind=rng.choice(["buy", "buy", "view"]),
            value=rng.choice([None, rng.uniform(-50, 50)]),
        )
        for _ in range(rng.randint(2, 60))
    ]
    rng.shuffle(events)
    state = fold(events, (view,))
    buys = [e for e in events if e.event_type == "buy"]
    if not buys:
        assert state.rows() == {}
        return
    newest = max(e.event_time.timestamp() for e in buys)
    inside = [
        e.numeric["value"]
        for e in buys
        if "value" in e.numeric and in_window(e.event_time.timestamp(), newest, window, slide)
    ]
    want: dict[str, object] = {
        "count": len(inside),
        "sum": math.fsum(inside) if inside else None,
        "mean": statistics.fmean(inside) if inside else None,
        "min": min(inside) if inside else None,
        "max": max(inside) if inside else None,
        "stddev": statistics.stdev(inside) if len(inside) >= 2 else None,
        "total": math.fsum(e.numeric["value"] for e in buys if "value" in e.numeric)
        if any("value" in e.numeric for e in buys)
        else None,
    }
    approx_equal(flat(state), want)


def test_erasure_forgets_history_and_refuses_older_events() -> None:
    state = fold([ev(0, value=5.0, category="a"), ev(10)])
    # Erased "at" 2 minutes, but the newest folded event (10) is erased history too.
    state.erase((T0 + timedelta(minutes=2)).timestamp())
    assert not state.has_features
    assert state.rows() == {}
    restored = EntityFold.load(state.key, state.to_bytes(), DEFAULT_VIEWS)
    for minutes in (1.5, 10):
        old = ev(minutes)
        assert restored.apply(old, event_columns(old))[0] is Outcome.ERASED
    new = ev(11, kind="new")
    assert restored.apply(new, event_columns(new))[0] is Outcome.ACCEPTED
    got = flat(restored)
    assert got["events_total"] == 1
    assert got["value_mean"] is None
    assert got["last_category"] is None
    assert got["last_event_type"] == "new"


def test_a_changed_view_definition_starts_afresh_and_others_are_kept() -> None:
    state = fold([ev(0, value=1.0), ev(1, value=3.0)])
    activity, numeric = DEFAULT_VIEWS
    changed = ViewSpec(**{**numeric.__dict__, "event_types": frozenset({"buy"})})
    restored = EntityFold.load(state.key, state.to_bytes(), (activity, changed))
    assert restored.known_views() == {"entity_activity"}
    assert flat(restored)["events_total"] == 2


def test_status_is_missing_stale_or_present() -> None:
    now = T0.timestamp()
    fresh, old = StoredValue(3, now - 10), StoredValue("x", now - 61)
    assert status_of(fresh, max_age=60, now=now) is FeatureStatus.PRESENT
    assert status_of(old, max_age=60, now=now) is FeatureStatus.STALE
    assert status_of(old, max_age=3600, now=now) is FeatureStatus.PRESENT
    assert status_of(StoredValue(None, now), max_age=60, now=now) is FeatureStatus.MISSING


def test_request_errors_name_the_field() -> None:
    schema = FeatureSchema(
        [
            FeatureSpec("v", "a", "Int64"),
            FeatureSpec("v", "b", "String"),
            FeatureSpec("items", "c", "Int64", join_key="item_id"),
        ]
    )
    assert [s.ref for s in schema.resolve([])] == ["v:a", "v:b"]
    assert [s.ref for s in schema.resolve([], "item_id")] == ["items:c"]
    assert [s.ref for s in schema.resolve(["v:b"])] == ["v:b"]
    with pytest.raises(RequestError, match=r"^feature_refs\[0\]: 'items:c' is keyed by item_id"):
        schema.resolve(["items:c"])
    with pytest.raises(RequestError, match=r"^join_key: no view has join key 'shop_id'"):
        schema.resolve([], "shop_id")
    with pytest.raises(RequestError) as err:
        schema.resolve(["v:a", "v:zzz"])
    assert err.value.field == "feature_refs[1]"
    with pytest.raises(RequestError, match=r"^feature_refs\[0\]: 'a' is not"):
        schema.resolve(["a"])
    with pytest.raises(RequestError, match=r"^entity_ids\[1\]: must not be empty"):
        validate_entity_ids(["x", " "], limit=5)
    with pytest.raises(RequestError, match=r"^entity_ids: 3 ids, at most 2"):
        validate_entity_ids(["a", "b", "c"], limit=2)
    with pytest.raises(RequestError, match=r"^entity_ids: at least one"):
        validate_entity_ids([], limit=2)


def test_export_is_point_in_time_correct_and_keeps_every_row() -> None:
    history = [
        ev(0, entity="a", value=1.0, category="x"),
        ev(30, entity="a", value=3.0),
        ev(90, entity="a", kind="buy", category="y"),
        ev(0, entity="gone", value=9.0),
        ev(0, entity="other"),
    ]
    rows = pd.DataFrame(
        {
            "entity_id": ["a", "a", "a", "nobody", "a", "gone", "a"],
            "event_timestamp": [
                T0 + timedelta(minutes=45),
                T0 - timedelta(minutes=1),  # before any event of "a"
                T0 + timedelta(minutes=90),  # inclusive: sees the event at 90
                T0,
                T0 + timedelta(days=30),  # newest event older than the TTL
                T0 + timedelta(minutes=1),
                T0 + timedelta(minutes=30),
            ],
            "label": [1, 0, 1, 0, 1, 0, 1],
        }
    )
    out = export_training_frame(rows, history, DEFAULT_VIEWS, erased={"gone"})
    assert list(out["label"]) == [1, 0, 1, 0, 1, 0, 1]
    assert len(out) == len(rows)
    first = out.iloc[0]
    assert (
        first["entity_activity__events_total"],
        first["entity_activity__events_1h"],
        first["entity_numeric__value_mean"],
    ) == (2, 2, 2.0)
    assert (
        first["entity_numeric__last_event_type"],
        first["entity_numeric__last_category"],
    ) == ("click", "x")
    at_90 = out.iloc[2]
    # 30 is exactly 1 h before 90: its slide left the window
    assert (at_90["entity_activity__events_total"], at_90["entity_activity__events_1h"]) == (3, 1)
    assert (
        at_90["entity_numeric__last_event_type"],
        at_90["entity_numeric__last_category"],
    ) == ("buy", "y")
    assert out.iloc[6]["entity_activity__events_total"] == 2
    names = [
        "entity_activity__events_total",
        "entity_numeric__value_mean",
        "entity_numeric__last_event_type",
    ]
    for missing in (1, 3, 4, 5):
        assert out.iloc[missing][names].isna().all()
    assert str(out["entity_activity__events_total"].dtype) == "Int64"


def test_online_store_is_sqlite_by_default_and_redis_when_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = prepare_repo(tmp_path / "repo")  # copies and configures; `feast apply` not needed
    monkeypatch.setenv("LOOPMESH_FEATURES__REPO_PATH", str(repo))
    path, config = feast_config(FeaturesSettings().features)
    assert path == repo
    assert config["online_store"] == {"type": "sqlite", "path": str(repo / "data" / "online.db")}
    assert config["registry"] == str(repo / "data" / "registry.db")

    monkeypatch.setenv("LOOPMESH_FEATURES__ONLINE_STORE", "redis")
    with pytest.raises(ValueError, match="redis_url"):
        FeaturesSettings()
    monkeypatch.setenv("LOOPMESH_FEATURES__REDIS_URL", "redis://:s3cret@cache:6380/1")
    _, config = feast_config(FeaturesSettings().features)
    assert config["online_store"] == {
        "type": "redis",
        "connection_string": "cache:6380,db=1,password=s3cret",
    }
    assert config["registry"] == str(repo / "data" / "registry.db")


def test_an_event_written_before_an_erasure_is_erased_whatever_its_event_time() -> None:
    # The door takes events stamped up to minutes ahead: one written before the erasure but
    # folded after it (another topic, another partition) must not bring the entity back.
    state = fold([ev(0)])
    erased_written_ms = 1_000_000
    state.erase((T0 + timedelta(minutes=1)).timestamp(), erased_written_ms)
    ahead = ev(5)  # stamped after the erasure's time
    outcome, _ = state.apply(ahead, event_columns(ahead), written_ms=erased_written_ms - 10)
    assert outcome is Outcome.ERASED
    restored = EntityFold.load(state.key, state.to_bytes(), DEFAULT_VIEWS)
    after = ev(6)
    outcome, _ = restored.apply(after, event_columns(after), written_ms=erased_written_ms + 10)
    assert outcome is Outcome.ACCEPTED
    assert flat(restored)["events_total"] == 1
