"""The features service's pure logic: fold (windows, idempotency, order, erasure), statuses,
request checks, the point-in-time export and the online store choice.

Expected values are computed here independently, straight from the event lists.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from loopmesh.features.core import (
    DAY,
    HOUR,
    EntityAggregate,
    FeatureSchema,
    FeatureSpec,
    FeatureStatus,
    Outcome,
    RequestError,
    StoredValue,
    status_of,
    validate_entity_ids,
)
from loopmesh.features.export import export_training_frame
from loopmesh.features.repo import feast_config
from loopmesh.features.settings import FeaturesSettings
from loopmesh.mesh.events import InteractionEvent
from loopmesh.mesh.feature_repo import prepare_repo

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


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


def fold(events: list[InteractionEvent], **kwargs: float) -> EntityAggregate:
    aggregate = EntityAggregate("u", **kwargs)
    for event in events:
        aggregate.apply(event)
    return aggregate


def expected(events: list[InteractionEvent]) -> dict[str, object]:
    """The feature values by definition, from distinct events."""
    distinct = list({e.event_id: e for e in events}.values())
    newest = max(e.event_time.timestamp() for e in distinct)
    latest = max(distinct, key=lambda e: (e.event_time, e.event_id))
    with_category = [e for e in distinct if "category" in e.categorical]
    values = [e.numeric["value"] for e in distinct if "value" in e.numeric]
    amounts = [e.numeric["amount"] for e in distinct if "amount" in e.numeric]
    return {
        "events_1h": sum(1 for e in distinct if e.event_time.timestamp() > newest - HOUR),
        "events_24h": sum(1 for e in distinct if e.event_time.timestamp() > newest - DAY),
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


def flat(aggregate: EntityAggregate) -> dict[str, object]:
    out: dict[str, object] = {}
    for row in aggregate.rows().values():
        out.update({k: v for k, v in row.items() if k not in ("entity_id", "event_timestamp")})
    return out


def test_windows_end_at_the_newest_event_not_the_clock() -> None:
    events = [
        ev(0, value=1.0, category="a"),
        ev(-30, value=2.0, amount=10.0),
        ev(-60, kind="view"),  # exactly 1 h before the newest: outside the 1 h window
        ev(-61, value=3.0, category="b"),
        ev(-23 * 60),
        ev(-24 * 60),  # exactly 24 h before: outside the 24 h window, still counted overall
    ]
    got = flat(fold(sorted(events, key=lambda e: e.event_time)))  # in order: nothing is late
    assert got == expected(events)
    assert got["events_1h"] == 2
    assert got["events_24h"] == 5
    assert got["events_total"] == 6
    assert got["value_mean"] == 2.0
    assert got["amount_mean"] == 10.0
    assert got["last_category"] == "a"


def test_redelivered_events_count_once_even_after_a_round_trip() -> None:
    events = [ev(i, value=float(i)) for i in range(5)]
    aggregate = fold(events)
    restored = EntityAggregate.from_bytes("u", aggregate.to_bytes())
    assert [restored.apply(e) for e in events] == [Outcome.DUPLICATE] * 5
    assert flat(restored) == flat(aggregate) == expected(events)


def test_an_older_event_never_overwrites_newer_last_values() -> None:
    aggregate = fold([ev(10, kind="buy", category="new")])
    assert aggregate.apply(ev(5, kind="view", category="old")) is Outcome.ACCEPTED
    got = flat(aggregate)
    assert got["last_event_type"] == "buy"
    assert got["last_category"] == "new"
    assert got["events_total"] == 2
    assert got["last_event_ts"] == (T0 + timedelta(minutes=10)).timestamp()


def test_events_beyond_the_allowed_lateness_are_dropped() -> None:
    aggregate = fold([ev(0)], allowed_lateness=HOUR)
    assert aggregate.apply(ev(-61)) is Outcome.TOO_LATE
    assert aggregate.apply(ev(-59)) is Outcome.ACCEPTED
    assert flat(aggregate)["events_total"] == 2


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
    assert flat(fold(shuffled)) == flat(in_order)
    want = expected(events)
    got = flat(in_order)
    for name in ("value_mean", "amount_mean"):
        mean, want_mean = got.pop(name), want.pop(name)
        assert mean == (None if want_mean is None else pytest.approx(want_mean, rel=1e-12))
    assert got == want


def test_erasure_forgets_history_and_refuses_older_events() -> None:
    aggregate = fold([ev(0, value=5.0, category="a"), ev(1)])
    aggregate.erase((T0 + timedelta(minutes=2)).timestamp())
    assert not aggregate.has_features
    assert aggregate.rows() == {}
    restored = EntityAggregate.from_bytes("u", aggregate.to_bytes())
    assert restored.apply(ev(1.5)) is Outcome.ERASED
    assert restored.apply(ev(3, kind="new")) is Outcome.ACCEPTED
    got = flat(restored)
    assert got["events_total"] == 1
    assert got["value_mean"] is None
    assert got["last_category"] is None
    assert got["last_event_type"] == "new"


def test_status_is_missing_stale_or_present() -> None:
    now = T0.timestamp()
    fresh, old = StoredValue(3, now - 10), StoredValue("x", now - 61)
    assert status_of(fresh, max_age=60, now=now) is FeatureStatus.PRESENT
    assert status_of(old, max_age=60, now=now) is FeatureStatus.STALE
    assert status_of(old, max_age=3600, now=now) is FeatureStatus.PRESENT
    assert status_of(StoredValue(None, now), max_age=60, now=now) is FeatureStatus.MISSING


def test_request_errors_name_the_field() -> None:
    schema = FeatureSchema([FeatureSpec("v", "a", "Int64"), FeatureSpec("v", "b", "String")])
    assert [s.ref for s in schema.resolve([])] == ["v:a", "v:b"]
    assert [s.ref for s in schema.resolve(["v:b"])] == ["v:b"]
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
    out = export_training_frame(rows, history, erased={"gone"})
    assert list(out["label"]) == [1, 0, 1, 0, 1, 0, 1]
    assert len(out) == len(rows)
    first = out.iloc[0]
    assert (first["events_total"], first["events_1h"], first["value_mean"]) == (2, 2, 2.0)
    assert (first["last_event_type"], first["last_category"]) == ("click", "x")
    at_90 = out.iloc[2]
    assert (at_90["events_total"], at_90["events_1h"]) == (3, 1)  # 30 is 1 h before: out
    assert (at_90["last_event_type"], at_90["last_category"]) == ("buy", "y")
    assert out.iloc[6]["events_total"] == 2
    for missing in (1, 3, 4, 5):
        assert out.iloc[missing][["events_total", "value_mean", "last_event_type"]].isna().all()
    assert str(out["events_total"].dtype) == "Int64"


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
