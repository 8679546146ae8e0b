"""The native data plane (``loopmesh-dataplane``, Go, built from ``dataplane/``) under this
process, which is its control plane.

The gateway's public port belongs to the data plane. It serves the Open Inference Protocol
itself (parse, tensor checks, canary routing, fallback to stable, Triton call) and, unless
``dataplane.predict`` is off, Predict's hot path (features, routing, shadows, Triton); it
proxies every other call on that port (PredictStream, SetRoute, GetRoute, health, reflection,
and any Predict it cannot serve with certainty) to this process's gRPC server on a loopback
port. Measured on two cores, a Python gateway could not pass 0.4x Triton's throughput on
ModelInfer (``bench/inference_bench.py``) nor 0.09x on Predict; the Go path is the bar.

This module is the control plane's side of it:

* start the binary as a child, its config written on stdin (tokens and the entity id key
  never on argv or disk); learn its ports from the one JSON line it prints once every
  listener is bound;
* push the whole route table (stable, canary, weight, shadows, the versions the repository
  knows and their specs) whenever it changes and whenever the routes' readiness flips;
* drain the per-version figures of its calls every ``stats_interval_s`` into ``Counters``
  (and so into ``metrics.live`` for the canary guards, exactly like Predict's) and its counts
  into this process' instruments;
* hand it the Kafka settings: it produces the predictions it answers to ``predictions``
  itself (``PredictionLogged``, the Pydantic model its JSON is checked against), and its
  logged and dropped counts come back with the figures;
* if the child exits, set ``crashed``: the app stops with exit 1 rather than serve Predict
  behind a port nobody answers.

Running the child (finding it, its config on stdin, its listening line, the admin calls, the
exit watch) is ``loopmesh.mesh.dataplane``, shared with the features service's data plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loopmesh.inference import instruments
from loopmesh.inference.catalog import ModelCatalog
from loopmesh.inference.core import Counters
from loopmesh.inference.prediction_log import PredictionLogger
from loopmesh.inference.routing import RouteTable
from loopmesh.inference.settings import InferenceSettings
from loopmesh.mesh import dataplane as child
from loopmesh.mesh.dataplane import BINARY, DataPlaneProcess, Listening
from loopmesh.mesh.errors import LoopMeshError
from loopmesh.mesh.telemetry import rpc_instruments

log = logging.getLogger(__name__)
__all__ = [
    "BINARY",
    "DataPlane",
    "Listening",
    "config_of",
    "find_binary",
    "log_config",
    "predict_config",
    "spec_of",
]


def find_binary(configured: Path | None) -> Path:
    """The data plane executable: the configured path, else beside this Python, else PATH."""
    return child.find_binary(configured, setting="inference.dataplane.binary")


def config_of(settings: InferenceSettings, backend: str) -> dict[str, Any]:
    """The data plane's config: the public server, Triton, auth, telemetry and Predict."""
    scope = settings.inference
    server, plane = scope.server, scope.dataplane
    client = settings.triton_client
    triton_tls = None
    if client.tls_enabled:
        triton_tls = _tls_files(client.tls_cafile, client.tls_certfile, client.tls_keyfile)
    metrics = None
    if plane.metrics_port is not None:
        metrics = f"{settings.telemetry.metrics_host}:{plane.metrics_port}"
    return {
        "listen": f"{server.host}:{server.port}",
        "backend": backend,
        "tls": child.server_tls(server),
        "tokens": child.tokens(settings.auth),
        "triton": {
            "address": settings.triton_url,
            "channels": scope.triton_channels,
            "timeout_s": scope.triton_timeout_s,
            "tls": triton_tls,
        },
        "admin_listen": "127.0.0.1:0",
        "metrics_listen": metrics,
        "max_message_bytes": server.max_message_bytes,
        "max_concurrent_streams": plane.max_concurrent_streams,
        "otlp_endpoint": settings.telemetry.otlp_endpoint,
        "service_name": "inference-dataplane",
        "predict": predict_config(settings),
    }


def predict_config(settings: InferenceSettings) -> dict[str, Any] | None:
    """The config's ``predict``: what serving Predict needs; None when Python serves it all."""
    scope = settings.inference
    if not scope.dataplane.predict:
        return None
    client = scope.features_client
    tls = None
    if client.tls_enabled:
        tls = {
            **_tls_files(client.tls_cafile, client.tls_certfile, client.tls_keyfile),
            "server_name": client.server_name_override,
        }
    token = settings.auth.client_token
    privacy = settings.privacy
    # The same condition as EntityIdMapper's: Go must store and log the ids Python would.
    key = privacy.entity_id_key if privacy.pseudonymise_entity_ids else None
    return {
        "default_model": scope.default_model,
        "features": {
            "address": scope.features_url,
            "timeout_s": scope.features_timeout_s,
            "tls": tls,
            "token": token.get_secret_value() if token is not None else None,
        },
        "on_features_unavailable": scope.on_features_unavailable,
        "batch_max_size": scope.batch_max_size,
        "batch_max_delay_ms": scope.batch_max_delay_ms,
        "batch_max_inflight": scope.batch_max_inflight,
        "shadow_max_inflight": scope.shadow_max_inflight,
        "shadow_timeout_ms": scope.shadow_timeout_ms,
        "log_queue_size": scope.log_queue_size,
        "log": log_config(settings),
        "entity_id_key": key.get_secret_value() if key is not None else None,
    }


def log_config(settings: InferenceSettings) -> dict[str, Any]:
    """The config's ``predict.log``: the Kafka settings and producer options every
    ``EventProducer`` has (``client_options``), for the predictions the data plane produces."""
    kafka = settings.kafka
    sasl = kafka.security_protocol.startswith("SASL")
    tls = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        tls = _tls_files(kafka.ssl_cafile, kafka.ssl_certfile, kafka.ssl_keyfile)
    password = kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
    return {
        "topic": settings.inference.predictions_topic,
        "brokers": [b.strip() for b in kafka.bootstrap_servers.split(",") if b.strip()],
        "client_id": f"{kafka.client_id}-inference-dataplane",
        "security_protocol": kafka.security_protocol,
        "sasl_mechanism": kafka.sasl_mechanism if sasl else None,
        "sasl_username": kafka.sasl_username if sasl else None,
        "sasl_password": password if sasl else None,
        "tls": tls,
        "linger_ms": settings.inference.log_linger_ms,
        "request_timeout_ms": kafka.request_timeout_ms,
    }


def _tls_files(ca: Path | None, cert: Path | None, key: Path | None) -> dict[str, str | None]:
    """A client's TLS files as the config names them (None: the system's CAs, no certificate)."""
    return {
        "ca_file": str(ca) if ca else None,
        "cert_file": str(cert) if cert else None,
        "key_file": str(key) if key else None,
    }


def spec_of(catalog: ModelCatalog, model_name: str, version: int) -> dict[str, Any]:
    """A version's spec as the route table carries it, or ``{"error": ...}`` when it has
    none Predict can use (the data plane then forwards its requests here, for the error)."""
    try:
        spec = catalog.spec(model_name, version)
    except LoopMeshError as exc:
        return {"error": str(exc)}
    return {
        "feature_names": list(spec.feature_names),
        "store_refs": list(spec.store_refs),
        # Resolved here, so there is one order of precedence: the model's, the gateway's,
        # then default_feature_value.
        "defaults": {n: catalog.default_for(spec, n) for n in spec.feature_names},
        "categorical": [
            {
                "name": f.name,
                "buckets": f.buckets,
                "vocabulary": list(f.vocabulary) if f.vocabulary is not None else None,
            }
            for f in spec.categorical
        ],
        "task": spec.task,
        "n_outputs": spec.n_outputs,
    }


class DataPlane:
    """The child process, its route pushes and its stats drains."""

    def __init__(
        self,
        settings: InferenceSettings,
        *,
        routes: RouteTable,
        catalog: ModelCatalog,
        counters: Counters,
        logger: PredictionLogger,
        routes_ready: Callable[[], bool],
    ) -> None:
        self._settings = settings
        self._scope = settings.inference.dataplane
        self._routes = routes
        self._catalog = catalog
        self._counters = counters
        self._logger = logger
        self._routes_ready = routes_ready
        self._process: DataPlaneProcess | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._push_lock = asyncio.Lock()
        self.listening: Listening | None = None
        self.last_totals = {"triton_requests": 0, "rows": 0}
        """The data plane's Predict batching when it was last asked (at the latest, at stop)."""
        self.crashed = asyncio.Event()
        self.stopping = False
        routes.listen(self._changed.set)

    @property
    def pid(self) -> int | None:
        """The child's process id (None before start)."""
        return self._process.pid if self._process is not None else None

    @property
    def address(self) -> str:
        assert self.listening is not None, "data plane not started"
        return self.listening.grpc

    async def start(self, backend: str) -> None:
        """Start the child proxying to ``backend``; returns once it listens and has routes."""
        self._process = process = DataPlaneProcess(
            find_binary(self._scope.binary),
            start_timeout_s=self._scope.start_timeout_s,
            stop_timeout_s=self._scope.stop_timeout_s,
            admin_timeout_s=self._scope.admin_timeout_s,
            memory_limit=self._scope.memory_limit,
        )
        self.listening = await process.start(config_of(self._settings, backend))
        await self.push_routes()
        process.watch()
        self._tasks = [
            asyncio.create_task(self._watch_exit(process), name="dataplane-crash"),
            asyncio.create_task(self._sync(), name="dataplane-sync"),
        ]
        log.info(
            "data plane serving %s (admin %s, metrics %s)",
            self.listening.grpc,
            self.listening.admin,
            self.listening.metrics,
        )

    async def stop(self) -> None:
        """Stop the child: its in-flight calls finish, then it waits (at most 5 s) for Kafka to
        acknowledge the predictions it still holds."""
        self.stopping = True
        if self._process is not None:
            self._process.stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(OSError, ValueError):
            await self.drain_stats()
        with contextlib.suppress(OSError, ValueError, KeyError):
            self.last_totals = await self.predict_totals()
        if self._process is not None:
            await self._process.stop()
        # The calls that finished while the child stopped: only if its admin API still answers.
        with contextlib.suppress(OSError, ValueError):
            await self.drain_stats()

    # -- route table ---------------------------------------------------------------------------

    def table(self) -> dict[str, Any]:
        """The route table as the data plane takes it (``PUT /routes``)."""
        routes: dict[str, Any] = {}
        names = set(self._routes.all()) | set(self._catalog.models())
        for name in sorted(names):
            route = self._routes.get(name)
            known = self._catalog.versions(name)
            shadows = list(route.shadows) if route else []
            served = {*known, *shadows}
            if route is not None:
                served |= {v for v in (route.stable_version, route.canary_version) if v is not None}
            routes[name] = {
                "stable": route.stable_version if route else None,
                "canary": route.canary_version if route else None,
                "weight": route.canary_weight if route else 0.0,
                "known": known,
                "shadows": shadows,
                "shadow_share": route.shadow_share if route else 0.0,
                "specs": {str(v): spec_of(self._catalog, name, v) for v in sorted(served)},
            }
        return {"ready": self._routes_ready(), "routes": routes}

    async def push_routes(self) -> None:
        """Send the whole table now (serialised: the last push is the newest table)."""
        async with self._push_lock:
            self._changed.clear()
            body = json.dumps(self.table()).encode()
            await asyncio.to_thread(self._request, "PUT", "/routes", body)

    async def routes_in_force(self) -> dict[str, Any]:
        """The table the data plane routes by now (``GET /routes``): a change reaches it with
        the push that follows it in this process, a moment later."""
        return dict(json.loads(await asyncio.to_thread(self._request, "GET", "/routes", b"")))

    # -- figures ------------------------------------------------------------------------------

    async def drain_stats(self) -> int:
        """Move the calls finished since the last drain into the counters and the instruments;
        how many calls."""
        raw = await asyncio.to_thread(self._request, "POST", "/stats/drain", b"")
        drained = json.loads(raw)
        total = 0
        for entry in drained.get("versions", []):
            answered, failed = int(entry["answered"]), int(entry["failed"])
            model, version = entry["model"], int(entry["version"])
            # Callers choose pinned versions: only the repository's are kept (a caller pinning
            # made-up versions while Triton is down must not grow the counters).
            try:
                known = self._catalog.has_version(model, version)
            except ValueError:
                known = False
            if not known:
                continue
            self._counters.absorb(
                model,
                version,
                answered=answered,
                failed=failed,
                latencies_ms=[float(x) for x in entry.get("latencies_ms", [])],
                shadow=bool(entry.get("shadow", False)),
            )
            total += answered + failed
        # Counts by label: the data plane bounds them, so they are kept whatever the version.
        for entry in drained.get("predictions", []):
            count, degraded = int(entry["count"]), bool(entry["degraded"])
            instruments.record_prediction(
                entry["model"],
                _version(entry),
                arm=entry["arm"],
                degraded=degraded,
                count=count,
            )
            if degraded:
                self._counters.degraded += count
        for entry in drained.get("shadow_scores", []):
            instruments.record_shadow(
                entry["model"], _version(entry), entry["outcome"], count=int(entry["count"])
            )
        for entry in drained.get("triton_errors", []):
            instruments.record_triton_error(
                entry["model"], _version(entry), entry["code"], count=int(entry["count"])
            )
        # The Predict calls it answered, in this process' rpc.server metrics as before (the
        # ones it forwards, this server records itself).
        calls, duration = rpc_instruments("inference")
        for entry in drained.get("calls", []):
            method = str(entry["method"])
            attributes = {"rpc.method": method, "rpc.grpc.status_code": str(entry["code"])}
            calls.add(int(entry["count"]), attributes)
            for ms in entry.get("latencies_ms", []):
                duration.record(float(ms), {"rpc.method": method})
        # The predictions it produced to Kafka, in the log's own counts.
        produced = drained.get("log", {})
        self._logger.logged += int(produced.get("logged", 0))
        self._logger.dropped += int(produced.get("dropped", 0))
        return total

    async def predict_totals(self) -> dict[str, int]:
        """The data plane's Predict batching so far: ``triton_requests`` and ``rows``."""
        raw = await asyncio.to_thread(self._request, "GET", "/predict/totals", b"")
        totals = json.loads(raw)
        return {"triton_requests": int(totals["triton_requests"]), "rows": int(totals["rows"])}

    # -- internals ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes) -> bytes:
        assert self._process is not None
        return self._process.request(method, path, body)

    async def _sync(self) -> None:
        """Push routes when they change (or readiness flips, or the repository moves on) and
        drain figures every interval; a failed round is logged and retried next round."""
        ready = self._routes_ready()
        rounds = 0
        refresh_every = max(1, round(self._scope.known_refresh_s / self._scope.stats_interval_s))
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._scope.stats_interval_s)
            rounds += 1
            try:
                now_ready = self._routes_ready()
                if self._changed.is_set() or now_ready != ready or rounds % refresh_every == 0:
                    await self.push_routes()
                    ready = now_ready
                await self.drain_stats()
            except OSError:
                log.warning("data plane admin call failed; retrying", exc_info=True)

    async def _watch_exit(self, process: DataPlaneProcess) -> None:
        await process.crashed.wait()
        self.crashed.set()


def _version(entry: dict[str, Any]) -> int | None:
    version = entry.get("version")
    return int(version) if version is not None else None
