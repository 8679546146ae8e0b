"""``python -m loopmesh.rollout``: the rollout controller until SIGINT/SIGTERM.

Settings come from the environment (``LOOPMESH_ROLLOUT__...``, see settings.py). Run one
replica: the controller is the only writer of the ``rollouts`` topic.
"""

from __future__ import annotations

import asyncio
import logging

from loopmesh.mesh.rpc import install_signal_handlers
from loopmesh.mesh.telemetry import setup_telemetry
from loopmesh.rollout.app import RolloutApp
from loopmesh.rollout.settings import RolloutSettings

log = logging.getLogger("loopmesh.rollout")


async def run(settings: RolloutSettings) -> int:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    app = RolloutApp(settings)
    try:
        await app.start()
        log.info("rollout controller serving on %s", app.address)
        stopped = asyncio.create_task(stop.wait())
        crashed = asyncio.create_task(app.crashed.wait())
        await asyncio.wait({stopped, crashed}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (stopped, crashed):
            waiter.cancel()
    finally:
        await app.stop()
    # A dead loop ends the process with status 1, for the supervisor to restart it.
    return 1 if app.crashed.is_set() else 0


def main() -> int:
    settings = RolloutSettings()
    setup_telemetry("rollout", settings.telemetry)
    return asyncio.run(run(settings))


if __name__ == "__main__":
    raise SystemExit(main())
