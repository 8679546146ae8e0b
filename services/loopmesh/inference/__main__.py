"""``python -m loopmesh.inference`` (or ``loopmesh serve inference``): run the gateway."""

from __future__ import annotations

import asyncio
import logging

from loopmesh.inference.app import InferenceGateway
from loopmesh.inference.settings import InferenceSettings
from loopmesh.mesh.rpc import install_signal_handlers
from loopmesh.mesh.telemetry import setup_telemetry

log = logging.getLogger("loopmesh.inference")


async def serve(settings: InferenceSettings) -> None:
    gateway = InferenceGateway(settings)
    await gateway.start()
    log.info("inference gateway on %s (Triton %s)", gateway.address, settings.triton_url)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    try:
        await stop.wait()
    finally:
        await gateway.stop()


def main() -> None:
    settings = InferenceSettings()
    setup_telemetry("inference", settings.telemetry)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
