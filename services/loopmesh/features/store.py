"""The Feast online store behind the features service: read, guarded write, per-entity delete.

This is the one module of the mesh that imports ``feast`` (seconds of import time, and torch
with it). Feast is synchronous and, on SQLite, shares one connection: every call runs on a
small thread pool (one thread by default), off the event loop. Writes and deletes also hold
an asyncio lock, so a delete issued after a write lands after it.

Feast facts this module works around (pinned in tests/test_feast_store.py):

* the SQLite store writes whatever is written last, even an older row, so ``write`` reads the
  stored event time of each row first and skips rows older than what is stored (the Redis
  store skips them itself);
* a write must carry every feature of its view, which ``EntityFold.rows`` always does;
* Feast has no per-entity delete, so ``delete`` removes the rows itself: SQLite rows by
  serialized entity key in each view's table, or the entity's Redis hash.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import sqlite3
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd  # type: ignore[import-untyped]
from feast import FeatureStore, RepoConfig
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import compute_table_id
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from loopmesh.features.core import FeatureSchema, FeatureSpec, StoredValue
from loopmesh.features.definitions import Definitions, load_definitions
from loopmesh.features.repo import feast_config
from loopmesh.features.settings import FeaturesScope
from loopmesh.mesh.errors import Unavailable
from loopmesh.mesh.events import PRIMARY_JOIN_KEY
from loopmesh.mesh.model_spec import check_features, load_spec_files

# Feast warns on every StreamFeatureView it builds (it is "alpha" in Feast because Feast
# itself computes them only with Spark); LoopMesh computes them, so the warning misleads.
warnings.filterwarnings("ignore", message="Stream feature views are experimental")

T = TypeVar("T")
Rows = Mapping[str, Mapping[str, Any]]
"""One entity's rows by view name (``EntityFold.rows``)."""


def repo_config(scope: FeaturesScope) -> RepoConfig:
    """The applied repo's config with the online store the settings ask for."""
    repo, data = feast_config(scope)
    return RepoConfig(repo_path=repo, **data)


def _python_value(value: ValueProto) -> float | int | str | None:
    kind = value.WhichOneof("val")
    if kind in ("int64_val", "int32_val", "double_val", "float_val", "string_val"):
        scalar: float | int | str = getattr(value, kind)
        return scalar
    if kind == "bool_val":
        return int(value.bool_val)
    return None  # null, or a kind no view of ours declares


def _entity_key(join_key: str, entity_id: str) -> EntityKeyProto:
    return EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(string_val=entity_id)])


class FeastGateway:
    """Async facade over one ``FeatureStore``; owns its thread pool."""

    def __init__(
        self,
        store: FeatureStore,
        *,
        threads: int = 1,
        redis_url: str | None = None,
        timeout_s: float = 10.0,
        default_lateness_s: float = 24 * 3600.0,
        project: Path | None = None,
    ):
        """``project``: the repository copy holding the model specs checked against the
        declared features (None: no check)."""
        self.store = store
        self._redis_url = redis_url
        self._timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="feast-read")
        # On Redis, writes have a thread of their own: a write that hangs (a store that stopped
        # answering) must not hold up every read behind it. Feast's SQLite store shares one
        # connection, which two threads must not use at once: there they share the pool.
        self._write_pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="feast-write")
            if store.config.online_store.type == "redis"
            else self._pool
        )
        self._write_lock = asyncio.Lock()
        # Validated first: a declaration LoopMesh cannot compute stops the service here.
        self.definitions: Definitions = load_definitions(
            store.list_stream_feature_views(),
            store.list_entities(),
            default_lateness_s=default_lateness_s,
        )
        self._views = {
            **{v.name: v for v in store.list_feature_views()},
            **{v.name: v for v in store.list_stream_feature_views()},
        }
        self._join_key_of = {v.name: v.join_key for v in self.definitions.views}
        self._timestamp_of = {v.name: v.timestamp_column for v in self.definitions.views}
        self.schema = FeatureSchema(self._load_specs())
        self._check_model_inputs(project)

    def _check_model_inputs(self, project: Path | None) -> None:
        """Every model spec of the project reads only features the project declares (a
        SpecError names the spec's file and field, and the service does not start)."""
        if project is None:
            return
        services = {
            str(service.name): [
                f"{projection.name_alias or projection.name}:{feature.name}"
                for projection in service.feature_view_projections
                for feature in projection.features
            ]
            for service in self.store.list_feature_services()
        }
        for source, spec in load_spec_files(project).values():
            check_features(spec, source, self.schema.by_ref, services)

    @classmethod
    def open(cls, scope: FeaturesScope) -> FeastGateway:
        store = FeatureStore(config=repo_config(scope))
        url = scope.redis_url.get_secret_value() if scope.redis_url else None
        return cls(
            store,
            threads=scope.store_threads,
            redis_url=url,
            timeout_s=scope.store_timeout_s,
            default_lateness_s=scope.allowed_lateness_s,
            project=scope.repo_path,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._write_pool is not self._pool:
            self._write_pool.shutdown(wait=True)

    async def _call(self, fn: Callable[[], T], pool: ThreadPoolExecutor | None = None) -> T:
        """``fn()`` on the store's threads, within ``timeout_s``: a hung store answers callers
        UNAVAILABLE (a read) or is retried (a push) instead of holding them forever. The
        thread itself cannot be interrupted; calls queued behind it time out alike."""
        call = asyncio.get_running_loop().run_in_executor(pool or self._pool, fn)
        try:
            return await asyncio.wait_for(call, self._timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"the online store did not answer within {self._timeout_s}s"
            ) from None

    def _load_specs(self) -> list[FeatureSpec]:
        specs = []
        entities = {e.name: e.join_key for e in self.store.list_entities()}
        computed = {v.name: v for v in self.definitions.views}
        for view in sorted(self._views.values(), key=lambda v: v.name):
            ttl = view.ttl.total_seconds() if view.ttl else float("inf")
            keys = [entities.get(name, name) for name in view.entities]
            if len(keys) != 1:
                continue  # a view of a composite key is read by neither door of ours
            # Declaration order for computed views (Feast's registry does not keep it).
            order = (
                {a.feature: i for i, a in enumerate(computed[view.name].aggregations)}
                if (view.name in computed)
                else {}
            )
            features = sorted(view.features, key=lambda f: order.get(f.name, len(order)))
            for feature in features:
                if feature.name == keys[0]:
                    continue  # a stream view keeps its join key among its fields
                specs.append(
                    FeatureSpec(
                        view=view.name,
                        name=feature.name,
                        dtype=str(feature.dtype),
                        description=feature.description,
                        max_age_seconds=ttl,
                        join_key=keys[0],
                    )
                )
        return specs

    # ------------------------------------------------------------------------------ reads

    async def read(
        self,
        entity_ids: Sequence[str],
        specs: Sequence[FeatureSpec],
        join_key: str = PRIMARY_JOIN_KEY,
    ) -> list[list[StoredValue]]:
        """Stored values per entity (in order) per spec (in order)."""
        return await self._call(lambda: self.read_sync(entity_ids, specs, join_key))

    def read_sync(
        self,
        entity_ids: Sequence[str],
        specs: Sequence[FeatureSpec],
        join_key: str = PRIMARY_JOIN_KEY,
    ) -> list[list[StoredValue]]:
        unique = list(dict.fromkeys(entity_ids))
        response = self.store.get_online_features(
            features=[spec.ref for spec in specs],
            entity_rows=[{join_key: entity_id} for entity_id in unique],
            full_feature_names=True,
        ).proto
        # Feast orders its columns its own way; find each requested one by its full name.
        column = {name: i for i, name in enumerate(response.metadata.feature_names.val)}
        results = response.results
        per_spec: list[list[StoredValue]] = []
        for spec in specs:
            vector = results[column[f"{spec.view}__{spec.name}"]]
            # Feast keeps event times to the second; 0 means "no row".
            times = [ts.seconds or None for ts in vector.event_timestamps]
            per_spec.append(list(map(StoredValue, map(_python_value, vector.values), times)))
        row_of = {entity_id: i for i, entity_id in enumerate(unique)}
        return [[column_values[row_of[e]] for column_values in per_spec] for e in entity_ids]

    # ----------------------------------------------------------------------------- writes

    async def write(self, rows: Sequence[Rows]) -> int:
        """Write each entity's rows, view by view, unless the store already holds a newer row
        of that view; returns how many rows were written."""
        if not rows:
            return 0
        async with self._write_lock:
            return await self._call(lambda: self._write_sync(rows), self._write_pool)

    def _write_sync(self, rows: Sequence[Rows]) -> int:
        by_view: dict[str, dict[str, Mapping[str, Any]]] = {}
        for entity_rows in rows:
            for view, row in entity_rows.items():
                # The last row of an entity in the batch is its newest state.
                by_view.setdefault(view, {})[row[self._join_key_of[view]]] = row
        written = 0
        # Feast's Redis store keeps the newer row by itself (it skips older ones); only the
        # SQLite store needs the stored times read first.
        redis = self.store.config.online_store.type == "redis"
        for view, latest in by_view.items():
            stored = {} if redis else self._stored_times(view, list(latest))
            timestamp = self._timestamp_of[view]
            fresh = [
                dict(row)
                for entity_id, row in latest.items()
                # Feast keeps event times to the second: a row of the same second is written.
                if math.floor(row[timestamp].timestamp()) >= stored.get(entity_id, -math.inf)
            ]
            if fresh:
                self.store.write_to_online_store(view, pd.DataFrame(fresh))
                written += len(fresh)
        return written

    def _stored_times(self, view: str, entity_ids: list[str]) -> dict[str, float]:
        """Event time (whole seconds) of the stored row of each entity that has one."""
        spec = next(s for s in self.schema.features if s.view == view)
        out = {}
        for entity_id, (value,) in zip(
            entity_ids, self.read_sync(entity_ids, [spec], spec.join_key), strict=True
        ):
            if value.event_time is not None:
                out[entity_id] = value.event_time
        return out

    def _specs_of(self, join_key: str) -> list[FeatureSpec]:
        return [spec for spec in self.schema.features if spec.join_key == join_key]

    async def exists(self, entity_id: str, join_key: str = PRIMARY_JOIN_KEY) -> bool:
        """Whether the online store holds any value of the entity."""
        specs = self._specs_of(join_key)
        if not specs:
            return False
        (values,) = await self.read([entity_id], specs, join_key)
        return any(v.value is not None for v in values)

    async def delete(self, entity_id: str, join_key: str = PRIMARY_JOIN_KEY) -> bool:
        """Remove every online value of the entity; True when it had any."""
        async with self._write_lock:
            return await self._call(
                lambda: self._delete_sync(entity_id, join_key), self._write_pool
            )

    def _delete_sync(self, entity_id: str, join_key: str) -> bool:
        specs = self._specs_of(join_key)
        existed = False
        if specs:
            (values,) = self.read_sync([entity_id], specs, join_key)
            existed = any(v.value is not None for v in values)
        config = self.store.config
        key = serialize_entity_key(
            _entity_key(join_key, entity_id),
            entity_key_serialization_version=config.entity_key_serialization_version,
        )
        if config.online_store.type == "redis":
            self._delete_redis(key + config.project.encode())
        else:
            self._delete_sqlite(key)
        return existed

    def _delete_sqlite(self, key: bytes) -> None:
        config = self.store.config
        path = Path(config.online_store.path)
        if not path.is_absolute() and config.repo_path is not None:
            path = Path(config.repo_path) / path
        versioning = config.registry.enable_online_feature_view_versioning
        tables = [
            compute_table_id(config.project, view, versioning) for view in self._views.values()
        ]
        # A connection of our own: Feast's is private to its store object.
        conn = sqlite3.connect(path, timeout=30)
        try:
            with conn:
                for table in tables:
                    quoted = '"' + table.replace('"', '""') + '"'
                    conn.execute(f"DELETE FROM {quoted} WHERE entity_key = ?", (key,))  # noqa: S608
        finally:
            conn.close()

    def _delete_redis(self, key: bytes) -> None:
        # Feast keeps every view of an entity in one hash at <serialized key><project>
        # (feast.infra.online_stores.helpers._redis_key); deleting it removes them all.
        # Feast's redis extra: only needed (and installed) where Redis is configured.
        redis = importlib.import_module("redis")
        if self._redis_url is None:
            raise RuntimeError("redis online store without features.redis_url")
        client = redis.Redis.from_url(self._redis_url)
        try:
            client.delete(key)
        finally:
            client.close()
