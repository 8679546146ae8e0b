"""Wires the rollout controller to Kafka, Triton and gRPC; ``__main__`` and tests run this.

Start-up order is what makes a restart safe: topics declared; ``rollouts`` and the policy
overrides re-read to their end (the state); metrics re-read from the lookback until caught up
(so the first decisions see the figures the previous run saw); only then the decision loop and
the gRPC server start, and the ``models.published`` consumer joins its group beside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

from loopmesh.gen.loopmesh.v1 import rollout_pb2_grpc
from loopmesh.mesh.bus import EventConsumer, EventProducer, declare_topics
from loopmesh.mesh.events import ModelPublished, VersionMetrics, utcnow
from loopmesh.mesh.follow import TopicFollower, read_to_end
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.rollout import instruments
from loopmesh.rollout.agents import SERVICE, KafkaPublisher
from loopmesh.rollout.core import RolloutController
from loopmesh.rollout.machine import Record
from loopmesh.rollout.server import METHOD_ROLES, SERVICE_NAME, RolloutServicer
from loopmesh.rollout.settings import RolloutSettings
from loopmesh.rollout.triton import TritonLoader

log = logging.getLogger(__name__)


class RolloutApp:
    """The whole controller process: ``await start()``, then ``await stop()``."""

    def __init__(self, settings: RolloutSettings) -> None:
        self.name = "rollout"
        self.settings = settings
        self.controller: RolloutController | None = None
        self.server: GrpcServer | None = None
        self._producer: EventProducer | None = None
        self._loader: TritonLoader | None = None
        self._metrics: TopicFollower[VersionMetrics] | None = None
        self._published: EventConsumer[ModelPublished] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self.crashed = asyncio.Event()
        """Set when a loop died unexpectedly: the process should exit for its supervisor."""

    @property
    def address(self) -> str:
        assert self.server is not None, "start() first"
        return self.server.address

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        scope = self.settings.rollout
        kafka = self.settings.kafka
        published, metrics, rollouts, policies = scope.topics.table()
        await declare_topics(kafka, [published, metrics, rollouts, policies])

        self._producer = EventProducer(kafka, SERVICE)
        await self._producer.start()
        self._loader = TritonLoader(
            self.settings.triton_url,
            self.settings.model_repository,
            timeout=scope.load_timeout_seconds,
            client=self.settings.triton_client,
        )
        controller = RolloutController(
            scope,
            KafkaPublisher(self._producer, rollouts, policies),
            self._loader,
            self.settings.model_repository,
        )
        self.controller = controller
        instruments.watch(self._records)
        timeout = scope.start_timeout_seconds
        controller.restore(
            await read_to_end(
                kafka, rollouts, service=SERVICE, timeout=timeout, dlq=self._producer
            ),
            await read_to_end(
                kafka, policies, service=SERVICE, timeout=timeout, dlq=self._producer
            ),
            await read_to_end(
                kafka, published, service=SERVICE, timeout=timeout, dlq=self._producer
            ),
        )

        self._metrics = TopicFollower(
            kafka,
            metrics,
            controller.on_metrics,
            service=SERVICE,
            dlq=self._producer,
            since=utcnow() - timedelta(seconds=scope.metrics_lookback_seconds),
        )
        await self._metrics.start()
        self._spawn(self._metrics.run(), "rollout-metrics")
        await self._metrics.wait_caught_up(timeout)

        self._spawn(controller.run(self._stop), "rollout-loop")
        self.server = GrpcServer(
            "rollout", scope.server, auth=self.settings.auth, method_roles=METHOD_ROLES
        )
        rollout_pb2_grpc.add_RolloutServiceServicer_to_server(
            RolloutServicer(controller), self.server.server
        )
        await self.server.start([SERVICE_NAME])

        self._published = EventConsumer(
            kafka,
            published,
            scope.consumer_group,
            controller.on_published,
            dlq=self._producer,
            service=SERVICE,
        )
        self._spawn(self._consume_published(), "rollout-published")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stop.is_set():
            return
        log.error("%s stopped unexpectedly", task.get_name(), exc_info=task.exception())
        self.crashed.set()

    async def _consume_published(self) -> None:
        # Joining the group can wait out the session of a killed predecessor (seconds): the
        # rollouts in progress must not wait for it, so this runs beside the decision loop.
        assert self._published is not None
        await self._published.start()
        await self._published.run()

    def _records(self) -> list[Record]:
        return list(self.controller.records.values()) if self.controller is not None else []

    async def stop(self) -> None:
        """Stop serving, then the loops; a change being published finishes or is retried."""
        if self._stop.is_set():
            return
        self._stop.set()
        instruments.unwatch(self._records)
        if self.server is not None:
            await self.server.stop()
        for part in (self._published, self._metrics):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._loader is not None:
            await self._loader.close()
        if self._producer is not None:
            await self._producer.stop()
