"""The native data plane (``loopmesh-dataplane``, Go, built from ``dataplane/``) under this
process, which is its control plane.

The gateway's public port belongs to the data plane. It serves the Open Inference Protocol
itself (parse, tensor checks, canary routing, fallback to stable, Triton call) and proxies
every other service on that port (Predict, SetRoute, health, reflection) to this process's
gRPC server on a loopback port. Measured on two cores, a Python gateway could not pass 0.4x
Triton's throughput on ModelInfer (``bench/inference_bench.py``); the Go path is the bar.

This module is the control plane's side of it:

* start the binary as a child, its config written on stdin (tokens never on argv or disk);
  learn its ports from the one JSON line it prints once every listener is bound;
* push the whole route table (stable, canary, weight, and the versions the repository knows)
  whenever it changes and whenever the routes' readiness flips;
* drain the per-version figures of its ModelInfer calls every ``stats_interval_s`` into
  ``Counters`` (and so into ``metrics.live`` for the canary guards, exactly like Predict's);
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

from loopmesh.inference.catalog import ModelCatalog
from loopmesh.inference.core import Counters
from loopmesh.inference.routing import RouteTable
from loopmesh.inference.settings import InferenceSettings
from loopmesh.mesh import dataplane as child
from loopmesh.mesh.dataplane import BINARY, DataPlaneProcess, Listening

log = logging.getLogger(__name__)
__all__ = ["BINARY", "DataPlane", "Listening", "config_of", "find_binary"]


def find_binary(configured: Path | None) -> Path:
    """The data plane executable: the configured path, else beside this Python, else PATH."""
    return child.find_binary(configured, setting="inference.dataplane.binary")


def config_of(settings: InferenceSettings, backend: str) -> dict[str, Any]:
    """The data plane's config: the public server, Triton, auth and telemetry settings."""
    scope = settings.inference
    server, plane = scope.server, scope.dataplane
    client = settings.triton_client
    triton_tls = None
    if client.tls_enabled:
        triton_tls = {
            "ca_file": str(client.tls_cafile) if client.tls_cafile else None,
            "cert_file": str(client.tls_certfile) if client.tls_certfile else None,
            "key_file": str(client.tls_keyfile) if client.tls_keyfile else None,
        }
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
        routes_ready: Callable[[], bool],
    ) -> None:
        self._settings = settings
        self._scope = settings.inference.dataplane
        self._routes = routes
        self._catalog = catalog
        self._counters = counters
        self._routes_ready = routes_ready
        self._process: DataPlaneProcess | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._push_lock = asyncio.Lock()
        self.listening: Listening | None = None
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
        """Stop the child (in-flight calls finish), then take its last figures."""
        self.stopping = True
        if self._process is not None:
            self._process.stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(OSError):
            await self.drain_stats()
        if self._process is not None:
            await self._process.stop()

    # -- route table ---------------------------------------------------------------------------

    def table(self) -> dict[str, Any]:
        """The route table as the data plane takes it (``PUT /routes``)."""
        routes: dict[str, Any] = {}
        names = set(self._routes.all()) | set(self._catalog.models())
        for name in sorted(names):
            route = self._routes.get(name)
            routes[name] = {
                "stable": route.stable_version if route else None,
                "canary": route.canary_version if route else None,
                "weight": route.canary_weight if route else 0.0,
                "known": self._catalog.versions(name),
            }
        return {"ready": self._routes_ready(), "routes": routes}

    async def push_routes(self) -> None:
        """Send the whole table now (serialised: the last push is the newest table)."""
        async with self._push_lock:
            self._changed.clear()
            body = json.dumps(self.table()).encode()
            await asyncio.to_thread(self._request, "PUT", "/routes", body)

    # -- figures ------------------------------------------------------------------------------

    async def drain_stats(self) -> int:
        """Move the calls finished since the last drain into the counters; how many."""
        raw = await asyncio.to_thread(self._request, "POST", "/stats/drain", b"")
        total = 0
        for entry in json.loads(raw).get("versions", []):
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
            )
            total += answered + failed
        return total

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
