"""One life cycle for every deployable: start, serve, stop gracefully, exit 1 on a crash.

A deployable's ``app.py`` builds a ``Deployable`` (its parts, started and stopped together);
its ``__main__.py`` is one call to ``main``. SIGINT and SIGTERM stop it gracefully (the gRPC
server drains in-flight calls, producers flush); a background part that dies sets
``crashed`` and the process exits with status 1, so its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from aiokafka.errors import KafkaError

from loopmesh.mesh.settings import TelemetrySettings
from loopmesh.mesh.telemetry import setup_telemetry

log = logging.getLogger(__name__)


class Deployable(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def crashed(self) -> asyncio.Event:
        """Set when a part that must keep running (a consumer, a loop) died."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class _HasTelemetry(Protocol):
    @property
    def telemetry(self) -> TelemetrySettings: ...


SettingsT = TypeVar("SettingsT", bound=_HasTelemetry)
"""A deployable's settings: anything with ``telemetry`` (every ``MeshSettings``)."""


async def run(app: Deployable, *, retry_start_s: float | None = None) -> int:
    """Start ``app`` and serve until a signal (0) or a crash (1); always stop it.

    ``retry_start_s``: a start that fails because Kafka is not reachable yet is retried at
    that interval (a container start-order race), instead of failing the process.
    """
    stop = asyncio.Event()
    with _signals_set(stop):
        if not await _start(app, stop, retry_start_s):
            return 0  # stopped before it ever started
        log.info("%s started", app.name)
        try:
            waiters = {asyncio.create_task(stop.wait()), asyncio.create_task(app.crashed.wait())}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        finally:
            log.info("%s stopping", app.name)
            await app.stop()
    if app.crashed.is_set():
        log.error("%s: a part died; exiting with status 1 for a restart", app.name)
        return 1
    return 0


@contextlib.contextmanager
def _signals_set(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop`` instead of killing the process mid-call."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _start(app: Deployable, stop: asyncio.Event, retry_s: float | None) -> bool:
    while not stop.is_set():
        try:
            await app.start()
        except (KafkaError, OSError) as err:
            if retry_s is None:
                raise
            log.warning("%s: starting failed (%r); retrying in %.0fs", app.name, err, retry_s)
            try:
                await app.stop()  # whatever part did start
            except Exception:
                log.warning("%s: stopping after a failed start failed", app.name, exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_s)
        else:
            return True
    return False


def main(
    name: str,
    settings: SettingsT,
    build: Callable[[SettingsT], Deployable],
    *,
    retry_start_s: float | None = None,
) -> int:
    """The whole of a deployable's ``__main__``: telemetry, then ``run`` on a fresh loop."""
    setup_telemetry(name, settings.telemetry)

    async def serve() -> int:
        # Built on the loop: gRPC servers and asyncio primitives belong to it.
        return await run(build(settings), retry_start_s=retry_start_s)

    return asyncio.run(serve())
