"""The native data plane (``loopmesh-dataplane``, Go, built from ``dataplane/``) as a child
process: what the inference gateway and the features service share of running it.

The binary serves a deployable's public port in one of its modes (inference: the Open
Inference Protocol; features: ``GetOnlineFeatures``) and proxies every other call on that port
to the deployable's own gRPC server on a loopback port. This module:

* finds the binary (the configured path, else beside this Python, else ``PATH``);
* starts it with its JSON config on stdin (tokens never on argv or disk) and learns its
  ports from the one JSON line it prints once every listener is bound;
* calls its loopback admin HTTP API;
* sets ``crashed`` if it exits on its own (the deployable then stops with exit 1 rather than
  keep a port nobody answers), and stops it with SIGTERM (in-flight calls finish), then
  SIGKILL after ``stop_timeout_s``.

With ``hold_stdin`` the pipe stays open for the child's life and the child is told to stop
when it closes (``stop_on_stdin_eof``): a control plane killed with SIGKILL then never leaves
its data plane holding the port.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopmesh.mesh.auth import AuthSettings
from loopmesh.mesh.errors import SetupError
from loopmesh.mesh.settings import GrpcServerSettings

log = logging.getLogger(__name__)
BINARY = "loopmesh-dataplane"


@dataclass(frozen=True, slots=True)
class Listening:
    """Where the data plane listens (its one line on stdout)."""

    grpc: str
    admin: str
    metrics: str | None


def find_binary(configured: Path | None, *, setting: str) -> Path:
    """The data plane executable: the configured path, else beside this Python, else PATH.

    ``setting`` names the setting that configures it, for the error.
    """
    if configured is not None:
        if not configured.is_file():
            raise SetupError(setting, f"{configured} does not exist")
        return configured
    found = binary_beside_python()
    if found is None:
        raise SetupError(
            setting,
            f"{BINARY} not found beside {sys.executable} or on PATH: build it with `make deps` "
            "(README, 'The inference data plane')",
        )
    return found


def binary_beside_python() -> Path | None:
    """The data plane beside this Python, else on PATH, else None."""
    beside = Path(sys.executable).parent / BINARY
    if beside.is_file():
        return beside
    found = shutil.which(BINARY)
    return Path(found) if found is not None else None


def server_tls(server: GrpcServerSettings) -> dict[str, str | None] | None:
    """The config's ``tls``: the public server's certificate (and client CA for mTLS)."""
    if server.tls_certfile is None or server.tls_keyfile is None:
        return None
    return {
        "cert_file": str(server.tls_certfile),
        "key_file": str(server.tls_keyfile),
        "client_ca_file": str(server.tls_client_cafile) if server.tls_client_cafile else None,
    }


def tokens(auth: AuthSettings) -> list[dict[str, Any]]:
    """The config's ``tokens``: every bearer token and its roles."""
    return [
        {"name": t.name, "token": t.token.get_secret_value(), "roles": list(t.roles)}
        for t in auth.tokens
    ]


class DataPlaneProcess:
    """One ``loopmesh-dataplane`` child: start, admin calls, exit watch, stop."""

    def __init__(
        self,
        binary: Path,
        *,
        start_timeout_s: float,
        stop_timeout_s: float,
        admin_timeout_s: float,
        memory_limit: str | None = None,
        hold_stdin: bool = False,
    ) -> None:
        self.binary = binary
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._admin_timeout_s = admin_timeout_s
        self._memory_limit = memory_limit
        self._hold_stdin = hold_stdin
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self.listening: Listening | None = None
        self.crashed = asyncio.Event()
        """Set when the child exited without being asked to."""
        self.stopping = False

    @property
    def pid(self) -> int | None:
        """The child's process id (None before start)."""
        return self._proc.pid if self._proc is not None else None

    async def start(self, config: dict[str, Any]) -> Listening:
        """Start the child with ``config``; returns once every listener of it is bound."""
        if self._hold_stdin:
            config = {**config, "stop_on_stdin_eof": True}
        env = dict(os.environ)
        if self._memory_limit is not None:
            env["GOMEMLIMIT"] = self._memory_limit
        self._proc = proc = await asyncio.create_subprocess_exec(
            str(self.binary),
            "--config",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(config).encode())
        await proc.stdin.drain()
        if not self._hold_stdin:
            proc.stdin.close()
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self._start_timeout_s)
        except TimeoutError:
            await self.terminate()
            raise SetupError(f"{BINARY} did not listen within {self._start_timeout_s}s") from None
        if not line:
            code = await proc.wait()
            raise SetupError(f"{BINARY} exited with {code} before listening (its log is above)")
        said = json.loads(line)
        self.listening = Listening(said["grpc"], said["admin"], said.get("metrics"))
        return self.listening

    def watch(self) -> None:
        """From now on, an exit the control plane did not ask for sets ``crashed``."""
        self._watch = asyncio.create_task(self._watch_exit(), name="dataplane-watch")

    def request(self, method: str, path: str, body: bytes = b"") -> bytes:
        """One call to the admin API (blocking: run it in a thread)."""
        assert self.listening is not None, "data plane not started"
        request = urllib.request.Request(
            f"http://{self.listening.admin}{path}", data=body or None, method=method
        )
        if body:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=self._admin_timeout_s) as answer:  # noqa: S310 (loopback http, our own child)
            return bytes(answer.read())

    async def call(self, method: str, path: str, body: bytes = b"") -> bytes:
        """``request`` off the event loop."""
        return await asyncio.to_thread(self.request, method, path, body)

    async def stop(self) -> None:
        """SIGTERM (in-flight calls finish), SIGKILL after ``stop_timeout_s``."""
        self.stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await self.terminate()

    async def _watch_exit(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        if not self.stopping:
            log.error("%s exited with %s", BINARY, code)
            self.crashed.set()

    async def terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            self._close_stdin()
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self._stop_timeout_s)
        except TimeoutError:
            log.warning("%s did not stop within %ss; killing it", BINARY, self._stop_timeout_s)
            proc.kill()
            await proc.wait()
        self._close_stdin()

    def _close_stdin(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()
