"""Wires the rollout controller to Kafka, Triton and gRPC; ``__main__`` and tests run this.

Every replica joins the leader group (``leader``); the one holding its partition leads and the
others wait as standbys. ``start`` returns once the role is known (and, for a leader, its term
has started), then serves gRPC: health ``""`` on every replica, ``loopmesh.v1.RolloutService``
SERVING only on the leader; a standby answers the service's calls UNAVAILABLE.

A term is what a leader runs, built afresh on every election so a takeover rebuilds state as a
restart does: ``rollouts`` and the policy overrides re-read to their end (the state); metrics
re-read from the lookback until caught up (so the first decisions see the figures the previous
leader saw); only then the decision loop starts, and the ``models.published`` consumer joins
its group beside it. Losing the leadership stops the term before the group moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

from grpc_health.v1 import health_pb2

from loopmesh.gen.loopmesh.v1 import rollout_pb2_grpc
from loopmesh.mesh.bus import EventConsumer, EventProducer, declare_topics
from loopmesh.mesh.events import ModelPublished, VersionMetrics, utcnow
from loopmesh.mesh.feature_repo import project_dir
from loopmesh.mesh.follow import TopicFollower, read_to_end
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.rollout import instruments
from loopmesh.rollout.agents import SERVICE, KafkaPublisher
from loopmesh.rollout.core import RolloutController
from loopmesh.rollout.leader import Leadership
from loopmesh.rollout.machine import Record
from loopmesh.rollout.policy import spec_policies
from loopmesh.rollout.server import METHOD_ROLES, SERVICE_NAME, RolloutServicer
from loopmesh.rollout.settings import RolloutSettings
from loopmesh.rollout.triton import TritonLoader

log = logging.getLogger(__name__)


class _Loops:
    """The background tasks of one owner: a task that ends while the owner runs is a crash."""

    def __init__(self, crashed: asyncio.Event) -> None:
        self._crashed = crashed
        self._tasks: list[asyncio.Task[None]] = []
        self.stopping = asyncio.Event()

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._done)
        self._tasks.append(task)

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.stopping.is_set():
            return
        log.error("%s stopped unexpectedly", task.get_name(), exc_info=task.exception())
        self._crashed.set()

    async def cancel(self) -> None:
        """Cancel every task and wait for each (``stopping`` must be set first)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class _Term:
    """One leadership: the controller with its state re-read, its loops and consumers."""

    def __init__(self, app: RolloutApp, leadership: Leadership, producer: EventProducer) -> None:
        self._app = app
        self._leadership = leadership
        self._producer = producer
        self.controller: RolloutController | None = None
        self._loader: TritonLoader | None = None
        self._metrics: TopicFollower[VersionMetrics] | None = None
        self._published: EventConsumer[ModelPublished] | None = None
        self._loops = _Loops(app.crashed)

    async def start(self) -> None:
        settings = self._app.settings
        scope, kafka = settings.rollout, settings.kafka
        published, metrics, rollouts, policies = scope.topics.table()
        fence = self._leadership.check
        self._loader = TritonLoader(
            settings.triton_url,
            settings.model_repository,
            timeout=scope.load_timeout_seconds,
            client=settings.triton_client,
            fence=fence,
        )
        controller = RolloutController(
            scope,
            KafkaPublisher(self._producer, rollouts, policies, fence=fence),
            self._loader,
            settings.model_repository,
        )
        timeout = scope.start_timeout_seconds
        dlq = self._producer
        controller.restore(
            await read_to_end(kafka, rollouts, service=SERVICE, timeout=timeout, dlq=dlq),
            await read_to_end(kafka, policies, service=SERVICE, timeout=timeout, dlq=dlq),
            await read_to_end(kafka, published, service=SERVICE, timeout=timeout, dlq=dlq),
        )
        self._metrics = TopicFollower(
            kafka,
            metrics,
            controller.on_metrics,
            service=SERVICE,
            dlq=dlq,
            since=utcnow() - timedelta(seconds=scope.metrics_lookback_seconds),
        )
        await self._metrics.start()
        self._loops.spawn(self._metrics.run(), "rollout-metrics")
        await self._metrics.wait_caught_up(timeout)

        self._loops.spawn(controller.run(self._loops.stopping), "rollout-loop")
        self._published = EventConsumer(
            kafka,
            published,
            scope.consumer_group,
            controller.on_published,
            dlq=dlq,
            service=SERVICE,
        )
        self._loops.spawn(self._consume_published(), "rollout-published")
        self.controller = controller
        instruments.watch(self._records)

    async def _consume_published(self) -> None:
        # Joining the group can wait out the session of a killed predecessor (seconds): the
        # rollouts in progress must not wait for it, so this runs beside the decision loop.
        assert self._published is not None
        await self._published.start()
        await self._published.run()

    def _records(self) -> list[Record]:
        return list(self.controller.records.values()) if self.controller is not None else []

    async def stop(self) -> None:
        """Stop every part; a change being published or a load under way is cancelled."""
        self._loops.stopping.set()
        instruments.unwatch(self._records)
        for part in (self._published, self._metrics):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.stop()
        await self._loops.cancel()
        if self._loader is not None:
            with contextlib.suppress(Exception):
                await self._loader.close()


class RolloutApp:
    """The whole controller process: ``await start()``, then ``await stop()``."""

    def __init__(self, settings: RolloutSettings) -> None:
        self.name = "rollout"
        # The project's model specs may carry rollout overrides; a setting per model wins.
        policies = spec_policies(project_dir(settings.project), settings.rollout.default_policy)
        merged = {**policies, **settings.rollout.policies}
        self.settings = settings.model_copy(
            update={"rollout": settings.rollout.model_copy(update={"policies": merged})}
        )
        self.controller: RolloutController | None = None
        """The leader's controller while its term runs; None on a standby."""
        self.leadership: Leadership | None = None
        self.server: GrpcServer | None = None
        self._producer: EventProducer | None = None
        self._term: _Term | None = None
        self._ready = asyncio.Event()
        self.crashed = asyncio.Event()
        """Set when a loop died unexpectedly: the process should exit for its supervisor."""
        self._loops = _Loops(self.crashed)

    @property
    def address(self) -> str:
        assert self.server is not None, "start() first"
        return self.server.address

    @property
    def leading(self) -> bool:
        """Whether this replica leads (its gate is open; its term may still be starting)."""
        return self.leadership is not None and self.leadership.leading

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        scope = self.settings.rollout
        kafka = self.settings.kafka
        await declare_topics(kafka, scope.topics.table())
        # One partition: its holder is the leader. No DLQ: nothing is ever written to it.
        single = kafka.model_copy(update={"default_partitions": 1})
        await declare_topics(single, [scope.topics.leader_topic()], with_dlq=False)

        self._producer = EventProducer(kafka, SERVICE)
        await self._producer.start()
        self.leadership = Leadership(
            kafka,
            scope.topics.leader_topic(),
            scope.leader_group,
            scope.leader,
            service=SERVICE,
            elected=self._take_over,
            deposed=self._step_down,
            failed=self.crashed,
        )
        instruments.watch_leadership(self._leads)
        await self.leadership.start()
        self._loops.spawn(self.leadership.run(), "rollout-leader")
        # The role is known at the first assignment; a leader's term then re-reads the state.
        await self._until(self.leadership.decided, scope.start_timeout_seconds)
        if self.leadership.leading:
            await self._until(self._ready, scope.start_timeout_seconds)

        self.server = GrpcServer(
            "rollout", scope.server, auth=self.settings.auth, method_roles=METHOD_ROLES
        )
        rollout_pb2_grpc.add_RolloutServiceServicer_to_server(
            RolloutServicer(lambda: self.controller), self.server.server
        )
        await self.server.start([SERVICE_NAME])
        await self._announce()

    async def _until(self, event: asyncio.Event, timeout: float) -> None:
        """Wait for ``event``; a crash meanwhile (a term that failed to start) fails start."""
        waiters = [asyncio.create_task(event.wait()), asyncio.create_task(self.crashed.wait())]
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self.crashed.is_set():
            raise RuntimeError("rollout: taking over the leadership failed (see the log)")
        if not done:
            raise TimeoutError(f"rollout: not started within {timeout:.0f}s")

    def _leads(self) -> bool:
        return self.leading

    async def _take_over(self) -> None:
        """Started by ``Leadership`` on election (cancelled if it is lost meanwhile)."""
        assert self._producer is not None and self.leadership is not None
        began = time.monotonic()
        term = _Term(self, self.leadership, self._producer)
        self._term = term
        try:
            await term.start()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("rollout: taking over failed; exiting for a restart")
            self.crashed.set()
            return
        self.controller = term.controller
        self._ready.set()
        await self._announce()
        log.info(
            "rollout: leading: %d rollouts restored in %.1fs",
            len(self.controller.records) if self.controller is not None else 0,
            time.monotonic() - began,
        )

    async def _step_down(self) -> None:
        """Awaited by ``Leadership`` when the leadership goes: nothing acts after this."""
        self.controller = None
        term, self._term = self._term, None
        if term is not None:
            await term.stop()
        with contextlib.suppress(Exception):
            await self._announce()

    async def _announce(self) -> None:
        """RolloutService health: SERVING while this replica leads, else NOT_SERVING (a
        standby is alive, which health ``""`` says, but has nothing to answer)."""
        if self.server is None or self._loops.stopping.is_set():
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.controller is not None
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.server.health.set(SERVICE_NAME, status)

    async def stop(self) -> None:
        """Stop serving, stop acting, then leave the leader group (a standby takes over)."""
        if self._loops.stopping.is_set():
            return
        self._loops.stopping.set()
        instruments.unwatch_leadership(self._leads)
        if self.server is not None:
            await self.server.stop()
        await self._loops.cancel()
        if self.leadership is not None:
            with contextlib.suppress(Exception):
                await self.leadership.stop()
        # A term still starting when start() failed (no leadership callback will stop it).
        await self._step_down()
        if self._producer is not None:
            await self._producer.stop()
