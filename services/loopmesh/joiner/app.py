"""The joiner process: the faust joiner of ``predictions`` and ``feedback``, with its topics."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from loopmesh.joiner.agents import Joiner
from loopmesh.joiner.core import LabelRules
from loopmesh.joiner.settings import JoinerSettings
from loopmesh.mesh.bus import declare_topics
from loopmesh.mesh.feature_repo import project_dir
from loopmesh.mesh.model_spec import load_specs
from loopmesh.mesh.rpc import GrpcServer

log = logging.getLogger(__name__)


class JoinerApp:
    """Everything ``python -m loopmesh.joiner`` runs, started and stopped together."""

    def __init__(self, settings: JoinerSettings) -> None:
        self.name = "joiner"
        self.settings = settings
        # Each model's label rule from its spec (a bad spec stops the start, naming it).
        rules = LabelRules.of(
            load_specs(project_dir(settings.project)),
            reward_threshold=settings.joiner.reward_threshold,
        )
        self.joiner = Joiner(settings.kafka, settings.joiner, rules=rules)
        self.crashed = asyncio.Event()
        # Health only (no API of its own): probes see SERVING once the table is recovered.
        self.server = GrpcServer("joiner", settings.joiner.server)
        self._watch: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        await declare_topics(self.settings.kafka, self.settings.joiner.topics.all())
        await self.joiner.start()
        self._watch = asyncio.create_task(self._watch_app())
        await self.server.start([])

    async def _watch_app(self) -> None:
        while not self.joiner.crashed:  # noqa: ASYNC110 (faust exposes a flag, no event)
            await asyncio.sleep(1.0)
        log.error("the joiner crashed (its faust app or its erasure follower)")
        self.crashed.set()

    async def stop(self) -> None:
        await self.server.stop()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await self.joiner.stop()
