"""The default project in feature_store/ applies with SQLite and serves what is written to it.

Also pins down two behaviours of the SQLite online store that the features service has to
live with: the last write wins even when it is older, and TTL is not enforced on online reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from loopmesh.mesh.errors import SetupError
from loopmesh.mesh.feature_repo import (
    apply_repo,
    prepare_repo,
    redis_connection_string,
    render_config,
)

ACTIVITY = ["events_1h", "events_24h", "events_total", "last_event_ts"]
NUMERIC = ["value_mean", "amount_mean", "last_event_type", "last_category"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    repo = prepare_repo(tmp_path_factory.mktemp("feast") / "repo")
    started = time.monotonic()
    apply_repo(repo)
    print(f"feast apply took {time.monotonic() - started:.1f} s")
    # Imported here, not at module level: `import feast` costs seconds at collection time.
    from feast import FeatureStore

    yield FeatureStore(repo_path=str(repo))


def _push_activity(store: Any, entity_id: str, ts: datetime, counts: tuple[int, int, int]) -> None:
    df = pd.DataFrame(
        {
            "entity_id": [entity_id],
            "event_time": [ts],
            "events_1h": [counts[0]],
            "events_24h": [counts[1]],
            "events_total": [counts[2]],
            "last_event_ts": [ts.timestamp()],
        }
    )
    store.write_to_online_store("entity_activity", df)


def _read(store: Any, entity_id: str, view: str, names: list[str]) -> dict[str, Any]:
    response = store.get_online_features(
        features=[f"{view}:{name}" for name in names], entity_rows=[{"entity_id": entity_id}]
    ).to_dict()
    return {name: values[0] for name, values in response.items()}


def test_prepare_writes_absolute_sqlite_config(tmp_path: Path) -> None:
    repo = prepare_repo(tmp_path / "repo")
    assert (repo / "features.py").is_file()
    assert (repo / "data").is_dir()
    config = (repo / "feature_store.yaml").read_text()
    assert f'path: "{repo / "data" / "online.db"}"' in config
    assert f'registry: "{repo / "data" / "registry.db"}"' in config
    assert "entity_key_serialization_version: 3" in config


def test_redis_config() -> None:
    config = render_config(Path("/x"), online_store="redis", redis_url="redis://cache:6380/2")
    assert "type: redis" in config
    assert 'connection_string: "cache:6380,db=2"' in config
    tls = redis_connection_string("rediss://u:p%40ss@h")
    assert tls == "h:6379,ssl=true,username=u,password=p@ss"
    assert redis_connection_string("h:1,db=0") == "h:1,db=0"
    with pytest.raises(ValueError, match="redis_url"):
        render_config(Path("/x"), online_store="redis")


@pytest.mark.integration  # a real Feast store
def test_push_and_read_back(store: Any) -> None:
    ts = datetime.now(UTC) - timedelta(minutes=5)
    _push_activity(store, "user-1", ts, (2, 7, 40))
    assert _read(store, "user-1", "entity_activity", ACTIVITY) == {
        "entity_id": "user-1",
        "events_1h": 2,
        "events_24h": 7,
        "events_total": 40,
        "last_event_ts": ts.timestamp(),
    }

    numeric = pd.DataFrame(
        {
            "entity_id": ["user-1"],
            "event_time": [ts],
            "value_mean": [0.25],
            "amount_mean": [12.5],
            "last_event_type": ["purchase"],
            "last_category": ["shoes"],
        }
    )
    store.write_to_online_store("entity_numeric", numeric)
    assert _read(store, "user-1", "entity_numeric", NUMERIC) == {
        "entity_id": "user-1",
        "value_mean": 0.25,
        "amount_mean": 12.5,
        "last_event_type": "purchase",
        "last_category": "shoes",
    }

    # Unknown entities read as all-None, not as an error.
    assert _read(store, "nobody", "entity_activity", ["events_total"]) == {
        "entity_id": "nobody",
        "events_total": None,
    }


@pytest.mark.integration  # a real Feast store
def test_push_must_carry_every_feature(store: Any) -> None:
    partial = pd.DataFrame(
        {"entity_id": ["user-3"], "event_time": [datetime.now(UTC)], "value_mean": [1.0]}
    )
    # feast 0.67 indexes the frame by the view's full schema: a partial row is a KeyError.
    with pytest.raises(KeyError):
        store.write_to_online_store("entity_numeric", partial)


@pytest.mark.integration  # a real Feast store
def test_sqlite_lets_an_older_push_overwrite_a_newer_one(store: Any) -> None:
    now = datetime.now(UTC)
    newer, older = now - timedelta(minutes=1), now - timedelta(hours=2)
    _push_activity(store, "user-2", newer, (5, 5, 5))
    _push_activity(store, "user-2", older, (1, 1, 1))
    # Documented behaviour, not a wish: the SQLite store upserts without comparing event
    # times, so the features service must drop pushes older than what it already wrote.
    assert _read(store, "user-2", "entity_activity", ACTIVITY) == {
        "entity_id": "user-2",
        "events_1h": 1,
        "events_24h": 1,
        "events_total": 1,
        "last_event_ts": older.timestamp(),
    }


@pytest.mark.integration  # a real Feast store
def test_online_reads_ignore_ttl(store: Any) -> None:
    stale = datetime.now(UTC) - timedelta(days=30)
    _push_activity(store, "user-old", stale, (0, 0, 3))
    # The 7-day TTL is not applied by online reads: a month-old row is still served, so
    # consumers judge staleness from last_event_ts themselves.
    assert _read(store, "user-old", "entity_activity", ["events_total", "last_event_ts"]) == {
        "entity_id": "user-old",
        "events_total": 3,
        "last_event_ts": stale.timestamp(),
    }


@pytest.mark.integration  # a real Feast store
def test_apply_failure_raises_with_feast_output(tmp_path: Path) -> None:
    repo = prepare_repo(tmp_path / "repo")
    (repo / "broken_definitions.py").write_text('raise RuntimeError("marker-7f3a")\n')
    with pytest.raises(RuntimeError, match="marker-7f3a"):
        apply_repo(repo)


async def test_a_hung_store_answers_unavailable_within_the_timeout(store: Any) -> None:
    from loopmesh.features.store import FeastGateway
    from loopmesh.mesh.errors import Unavailable

    release = threading.Event()

    class Hanging:
        """The real store, except that online reads hang until released."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def get_online_features(self, **kwargs: Any) -> Any:
            release.wait(timeout=60)
            return store.get_online_features(**kwargs)

    gateway = FeastGateway(Hanging(), timeout_s=0.5)  # type: ignore[arg-type]
    try:
        specs = list(gateway.schema.features)[:1]
        # Before the timeout, this read waited for the store (here 60 s) and then succeeded.
        with pytest.raises(Unavailable, match=r"did not answer within 0\.5s"):
            await gateway.read(["someone"], specs)
    finally:
        release.set()
        gateway.close()


def test_a_users_project_is_copied_with_its_name_and_without_its_data(tmp_path: Path) -> None:
    project = tmp_path / "shop"
    (project / "pkg").mkdir(parents=True)
    (project / "data").mkdir()
    (project / "features.py").write_text("# views\n")
    (project / "pkg" / "more.py").write_text("# more views\n")
    (project / "data" / "online.db").write_text("not to be copied")
    (project / "feature_store.yaml").write_text("project: shop\nprovider: local\n")
    repo = prepare_repo(tmp_path / "work", project=project)
    assert (repo / "features.py").read_text() == "# views\n"
    assert (repo / "pkg" / "more.py").is_file()
    assert not (repo / "data" / "online.db").exists()
    assert "project: shop\n" in (repo / "feature_store.yaml").read_text()
    # A file the project no longer has leaves the working copy on the next prepare.
    (project / "pkg" / "more.py").unlink()
    prepare_repo(tmp_path / "work", project=project)
    assert not (repo / "pkg" / "more.py").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SetupError, match="holds no Feast definitions"):
        prepare_repo(tmp_path / "work2", project=tmp_path / "empty")
    with pytest.raises(SetupError, match="must not lie inside the project"):
        prepare_repo(project / "work", project=project)


async def test_a_hung_redis_write_does_not_hold_up_reads(tmp_path: Path, redis: Any) -> None:
    import asyncio

    from feast import FeatureStore

    from loopmesh.features.store import FeastGateway

    repo = prepare_repo(tmp_path / "repo", online_store="redis", redis_url=redis.url)
    apply_repo(repo)
    store = FeatureStore(repo_path=str(repo))
    release, entered = threading.Event(), threading.Event()

    class HangingWrites:
        """The real Redis-backed store, except that writes hang until released."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def write_to_online_store(self, *args: Any, **kwargs: Any) -> Any:
            entered.set()
            release.wait(timeout=60)
            return store.write_to_online_store(*args, **kwargs)

    gateway = FeastGateway(HangingWrites(), timeout_s=5.0)  # type: ignore[arg-type]
    row = {
        "entity_activity": {
            "entity_id": "w",
            "event_time": datetime.now(UTC),
            "events_1h": 1,
            "events_24h": 1,
            "events_total": 1,
            "last_event_ts": 1.0,
        }
    }
    try:
        writing = asyncio.create_task(gateway.write([row]))
        assert await asyncio.to_thread(entered.wait, 30)  # the write hangs on its thread
        specs = list(gateway.schema.features)[:1]
        # Before: one thread served both, so this read queued behind the hung write and
        # failed with Unavailable when the 5 s timeout passed.
        (values,) = await gateway.read(["someone"], specs)
        assert values[0].value is None
        release.set()
        assert await writing == 1
    finally:
        release.set()
        gateway.close()
