"""``python -m loopmesh.trainer`` (or ``loopmesh serve trainer``): run the trainer."""

from __future__ import annotations

import asyncio
import logging

from loopmesh.mesh.rpc import install_signal_handlers
from loopmesh.mesh.telemetry import setup_telemetry
from loopmesh.trainer.app import TrainerApp
from loopmesh.trainer.settings import TrainerSettings

log = logging.getLogger("loopmesh.trainer")


async def serve(settings: TrainerSettings) -> int:
    app = TrainerApp(settings)
    await app.start()
    log.info(
        "trainer (%s) for model %r on %s, repository %s",
        settings.trainer.role,
        settings.trainer.model_name,
        app.address or "-",
        settings.model_repository,
    )
    stop = asyncio.Event()
    install_signal_handlers(stop)
    try:
        waiters = {asyncio.create_task(stop.wait()), asyncio.create_task(app.crashed.wait())}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
    finally:
        await app.stop()
    # A dead consumer ends the process with status 1, for the supervisor to restart it.
    return 1 if app.crashed.is_set() else 0


def main() -> int:
    settings = TrainerSettings()
    setup_telemetry("trainer", settings.telemetry)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    raise SystemExit(main())
