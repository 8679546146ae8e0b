"""``python -m services.inference`` (or ``loopmesh serve inference``): run the gateway."""

from __future__ import annotations

import asyncio
import logging

from services.inference.app import InferenceGateway
from services.inference.settings import InferenceSettings
from services.mesh.rpc import install_signal_handlers
from services.mesh.telemetry import setup_telemetry

log = logging.getLogger("services.inference")


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
