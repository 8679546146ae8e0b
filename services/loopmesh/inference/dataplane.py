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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopmesh.inference.catalog import ModelCatalog
from loopmesh.inference.core import Counters
from loopmesh.inference.routing import RouteTable
from loopmesh.inference.settings import InferenceSettings
from loopmesh.mesh.errors import SetupError

log = logging.getLogger(__name__)
BINARY = "loopmesh-dataplane"


@dataclass(frozen=True, slots=True)
class Listening:
    """Where the data plane listens (its one line on stdout)."""

    grpc: str
    admin: str
    metrics: str | None


def find_binary(configured: Path | None) -> Path:
    """The data plane executable: the configured path, else beside this Python, else PATH."""
    if configured is not None:
        if not configured.is_file():
            raise SetupError("inference.dataplane.binary", f"{configured} does not exist")
        return configured
    beside = Path(sys.executable).parent / BINARY
    if beside.is_file():
        return beside
    found = shutil.which(BINARY)
    if found is None:
        raise SetupError(
            "inference.dataplane.binary",
            f"{BINARY} not found beside {sys.executable} or on PATH: build it with `make deps` "
            "(README, 'The inference data plane')",
        )
    return Path(found)


def config_of(settings: InferenceSettings, backend: str) -> dict[str, Any]:
    """The data plane's config: the public server, Triton, auth and telemetry settings."""
    scope = settings.inference
    server, plane = scope.server, scope.dataplane
    tls = None
    if server.tls_certfile is not None and server.tls_keyfile is not None:
        tls = {
            "cert_file": str(server.tls_certfile),
            "key_file": str(server.tls_keyfile),
            "client_ca_file": str(server.tls_client_cafile) if server.tls_client_cafile else None,
        }
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
        "tls": tls,
        "tokens": [
            {"name": t.name, "token": t.token.get_secret_value(), "roles": list(t.roles)}
            for t in settings.auth.tokens
        ],
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
        self._proc: asyncio.subprocess.Process | None = None
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
        return self._proc.pid if self._proc is not None else None

    @property
    def address(self) -> str:
        assert self.listening is not None, "data plane not started"
        return self.listening.grpc

    async def start(self, backend: str) -> None:
        """Start the child proxying to ``backend``; returns once it listens and has routes."""
        binary = find_binary(self._scope.binary)
        config = json.dumps(config_of(self._settings, backend)).encode()
        env = dict(os.environ)
        if self._scope.memory_limit is not None:
            env["GOMEMLIMIT"] = self._scope.memory_limit
        self._proc = proc = await asyncio.create_subprocess_exec(
            str(binary),
            "--config",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(config)
        await proc.stdin.drain()
        proc.stdin.close()
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self._scope.start_timeout_s)
        except TimeoutError:
            await self._terminate()
            raise SetupError(
                f"{BINARY} did not listen within {self._scope.start_timeout_s}s"
            ) from None
        if not line:
            code = await proc.wait()
            raise SetupError(f"{BINARY} exited with {code} before listening (its log is above)")
        said = json.loads(line)
        self.listening = Listening(said["grpc"], said["admin"], said.get("metrics"))
        await self.push_routes()
        self._tasks = [
            asyncio.create_task(self._watch_exit(), name="dataplane-watch"),
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
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(OSError):
            await self.drain_stats()
        await self._terminate()

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
        assert self.listening is not None
        request = urllib.request.Request(
            f"http://{self.listening.admin}{path}", data=body or None, method=method
        )
        if body:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=self._scope.admin_timeout_s) as answer:  # noqa: S310 (loopback http, our own child)
            return bytes(answer.read())

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

    async def _watch_exit(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        if not self.stopping:
            log.error("%s exited with %s", BINARY, code)
            self.crashed.set()

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self._scope.stop_timeout_s)
        except TimeoutError:
            log.warning(
                "%s did not stop within %ss; killing it", BINARY, self._scope.stop_timeout_s
            )
            proc.kill()
            await proc.wait()
