"""The native data plane in features mode (``loopmesh-dataplane``, Go, ``dataplane/``) under
this process, which is its control plane.

The features port belongs to the data plane. It serves ``GetOnlineFeatures`` itself, reading
the Feast online store directly (SQLite read-only, or Redis), and proxies every other call on
the port (GetFeatureSchema, DeleteEntity, health, reflection) to this process's gRPC server on
a loopback port. Measured on two cores, a Python FeatureService could not come within 5x of
Feast's in-process read at one entity (its per-call floor alone is about 1 ms); the Go path is
the bar (``bench/features_bench.py``).

It answers exactly what ``FeatureServicer.GetOnlineFeatures`` answers (the same checks and
messages, values, statuses, event times; ``tests/test_features_dataplane.py`` holds both to
it), from what this module sends it: the servable features in schema order with their join
keys, dtypes and max ages (a view's TTL, or ``stale_after_s``), the request limit, the store
timeout, each view's SQLite table and Redis name, and where the online store is. That is its
whole config at start; ``push`` sends it again (``PUT /features``) should the schema change.

Every ``stats_interval_s`` the calls it answered (method, status code, latencies) are drained
(``POST /calls/drain``) into this process's ``rpc.server.calls`` and ``rpc.server.duration``,
the instruments its gRPC server records: the features process's metrics count
``GetOnlineFeatures`` as before, although those calls no longer reach Python.

Only the applied repo's own store kinds are read: SQLite, and plain Redis (``redis://`` or
``rediss://`` with user, password and database, as ``features.redis_url`` gives them); a
Feast connection string with options the data plane does not implement is refused at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopmesh.features.settings import FeaturesSettings
from loopmesh.mesh import dataplane as child
from loopmesh.mesh.dataplane import DataPlaneProcess, Listening
from loopmesh.mesh.errors import SetupError
from loopmesh.mesh.telemetry import rpc_instruments

if TYPE_CHECKING:
    from loopmesh.features.store import FeastGateway

log = logging.getLogger(__name__)
SETTING = "features.dataplane"
_REDIS_OPTIONS = frozenset({"db", "ssl", "username", "password"})


def _versioned_name(view: Any, versioning: bool) -> str:
    """feast.infra.online_stores.helpers.compute_versioned_name."""
    name: str = view.name
    if versioning:
        version = getattr(view.projection, "version_tag", None)
        if version is None:
            version = getattr(view, "current_version_number", None)
        if version is not None and version > 0:
            name = f"{view.name}_v{version}"
    return name


def _redis(connection_string: str) -> dict[str, Any]:
    """Feast's ``host:port,db=N,ssl=true,username=..,password=..`` as the data plane takes it
    (parsed as feast's RedisOnlineStore._parse_connection_string does)."""
    nodes = [c for c in connection_string.split(",") if "=" not in c]
    params: dict[str, Any] = {}
    for item in connection_string.split(","):
        if "=" in item:
            key, raw = item.split("=", 1)
            try:
                params[key] = json.loads(raw)
            except json.JSONDecodeError:
                params[key] = raw
    unknown = sorted(set(params) - _REDIS_OPTIONS)
    if unknown or len(nodes) != 1:
        raise SetupError(
            SETTING,
            f"the data plane reads one plain Redis server with {sorted(_REDIS_OPTIONS)} only, "
            f"not {unknown or nodes}: set LOOPMESH_FEATURES__DATAPLANE__ENABLED=false to serve "
            "from Python",
        )
    host, _, port = nodes[0].partition(":")
    return {
        "address": f"{host}:{port or 6379}",
        "db": int(params.get("db", 0)),
        "username": None if params.get("username") is None else str(params["username"]),
        "password": None if params.get("password") is None else str(params["password"]),
        "tls": params.get("ssl") is True or str(params.get("ssl")).lower() == "true",
    }


def features_config(settings: FeaturesSettings, gateway: FeastGateway) -> dict[str, Any]:
    """What the data plane serves: the schema in order, limits, and where the rows are."""
    scope = settings.features
    config = gateway.store.config  # feast's RepoConfig, read by attribute only
    online = config.online_store
    versioning = bool(config.registry.enable_online_feature_view_versioning)
    views = {
        view.name: view
        for view in [
            *gateway.store.list_feature_views(),
            *gateway.store.list_stream_feature_views(),
        ]
    }
    features = []
    for spec in gateway.schema.features:
        max_age = scope.stale_after_s if scope.stale_after_s is not None else spec.max_age_seconds
        features.append(
            {
                "view": spec.view,
                "name": spec.name,
                "dtype": spec.dtype,
                "join_key": spec.join_key,
                "max_age_s": None if math.isinf(max_age) else max_age,
            }
        )
    served = {spec.view for spec in gateway.schema.features}
    layout = {}
    for name in sorted(served):
        versioned = _versioned_name(views[name], versioning)
        layout[name] = {"table": f"{config.project}_{versioned}", "name": versioned}
    store: dict[str, Any] = {
        "type": online.type,
        "project": config.project,
        "entity_key_serialization_version": config.entity_key_serialization_version,
    }
    if online.type == "sqlite":
        path = Path(online.path)
        if not path.is_absolute() and config.repo_path is not None:
            path = Path(config.repo_path) / path
        store["path"] = str(path.resolve())
    elif online.type == "redis":
        if getattr(online, "redis_type", "redis") != "redis":  # a str enum
            raise SetupError(SETTING, f"the data plane does not read {online.redis_type}")
        store["redis"] = _redis(online.connection_string)
    else:
        raise SetupError(SETTING, f"the data plane does not read a {online.type!r} online store")
    return {
        "max_entities": scope.max_entities,
        "store_timeout_s": scope.store_timeout_s,
        "features": features,
        "views": layout,
        "store": store,
    }


def config_of(settings: FeaturesSettings, backend: str, features: dict[str, Any]) -> dict[str, Any]:
    """The data plane's whole config: the public server, auth, telemetry and ``features``."""
    scope = settings.features
    server, plane = scope.server, scope.dataplane
    metrics = None
    if plane.metrics_port is not None:
        metrics = f"{settings.telemetry.metrics_host}:{plane.metrics_port}"
    return {
        "mode": "features",
        "listen": f"{server.host}:{server.port}",
        "backend": backend,
        "tls": child.server_tls(server),
        "tokens": child.tokens(settings.auth),
        "admin_listen": "127.0.0.1:0",
        "metrics_listen": metrics,
        "max_message_bytes": server.max_message_bytes,
        "max_concurrent_streams": plane.max_concurrent_streams,
        "otlp_endpoint": settings.telemetry.otlp_endpoint,
        "service_name": "features-dataplane",
        "features": features,
    }


class FeaturesDataPlane:
    """The child process on the features port, and the schema pushes."""

    def __init__(self, settings: FeaturesSettings, gateway: FeastGateway) -> None:
        self._settings = settings
        self._gateway = gateway
        self._scope = settings.features.dataplane
        self._process: DataPlaneProcess | None = None
        self._drain: asyncio.Task[None] | None = None
        self.listening: Listening | None = None

    @property
    def crashed(self) -> asyncio.Event:
        """Set when the child exited on its own."""
        assert self._process is not None, "data plane not started"
        return self._process.crashed

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def address(self) -> str:
        """The public address."""
        assert self.listening is not None, "data plane not started"
        return self.listening.grpc

    async def start(self, backend: str) -> None:
        """Start the child proxying to ``backend``; returns once it listens and serves."""
        features = features_config(self._settings, self._gateway)
        self._process = process = DataPlaneProcess(
            child.find_binary(self._scope.binary, setting=f"{SETTING}.binary"),
            start_timeout_s=self._scope.start_timeout_s,
            stop_timeout_s=self._scope.stop_timeout_s,
            admin_timeout_s=self._scope.admin_timeout_s,
            memory_limit=self._scope.memory_limit,
            hold_stdin=True,  # dies with this process, even on SIGKILL
        )
        self.listening = await process.start(config_of(self._settings, backend, features))
        process.watch()
        self._drain = asyncio.create_task(self._drain_calls(), name="features-dataplane-calls")
        log.info(
            "data plane serving GetOnlineFeatures on %s from %s (admin %s, metrics %s)",
            self.listening.grpc,
            features["store"]["type"],
            self.listening.admin,
            self.listening.metrics,
        )

    async def push(self, features: dict[str, Any] | None = None) -> None:
        """Send the schema and store location again (``PUT /features``): the gateway's, or
        ``features``."""
        assert self._process is not None, "data plane not started"
        body = features if features is not None else features_config(self._settings, self._gateway)
        await self._process.call("PUT", "/features", json.dumps(body).encode())

    async def drain_calls(self) -> int:
        """Record the calls answered since the last drain; how many."""
        assert self._process is not None, "data plane not started"
        raw = await self._process.call("POST", "/calls/drain")
        calls, duration = rpc_instruments("features")
        total = 0
        for entry in json.loads(raw).get("calls", []):
            method, count = str(entry["method"]), int(entry["count"])
            calls.add(count, {"rpc.method": method, "rpc.grpc.status_code": str(entry["code"])})
            for ms in entry.get("latencies_ms", []):
                duration.record(float(ms), {"rpc.method": method})
            total += count
        return total

    async def _drain_calls(self) -> None:
        while True:
            await asyncio.sleep(self._scope.stats_interval_s)
            try:
                await self.drain_calls()
            except OSError:
                log.warning("data plane admin call failed; retrying", exc_info=True)

    async def stop(self) -> None:
        """Stop the child (its in-flight calls finish), then record its last calls."""
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
            self._drain = None
        if self._process is not None:
            self._process.stopping = True
            with contextlib.suppress(OSError):
                await self.drain_calls()
            await self._process.stop()
