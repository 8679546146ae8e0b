"""A local ``redis-server`` (Debian's package) on a loopback port: the Redis online store.

Started like the other local components (a managed child in its own session) and used by the
tests that run the features service on Redis; compose and Kubernetes run the Redis image.
Nothing is persisted (no RDB snapshots, no AOF): the online store is rebuilt from the
changelog when the features workers start.
"""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

from loopmesh.devstack.process import ManagedProcess, free_port
from loopmesh.mesh.errors import SetupError


class RedisServer:
    """One ``redis-server`` bound to ``host:port``."""

    def __init__(self, state_dir: Path, *, host: str = "127.0.0.1", port: int | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise SetupError(
                "redis-server not found: install Debian's redis-server "
                "(`bash scripts/system-deps.sh` does)"
            )
        self.host = host
        self.port = port or free_port(host)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = state_dir / "redis.log"
        self._process = ManagedProcess(
            "redis-server",
            [
                binary,
                "--bind",
                host,
                "--port",
                str(self.port),
                "--dir",
                str(state_dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
            log_path=self.log_path,
        )

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self, timeout: float = 30.0, abort: threading.Event | None = None) -> None:
        self._process.start()
        self._process.wait_ready(self._pong, timeout, abort=abort)

    def _pong(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        self._process.stop()
