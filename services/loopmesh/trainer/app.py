"""The trainer process: dataset consumers, core and gRPC server wired together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc

from loopmesh.gen.loopmesh.v1 import trainer_pb2_grpc
from loopmesh.mesh.batch import BatchSink
from loopmesh.mesh.bus import EventConsumer, EventProducer, declare_topics
from loopmesh.mesh.events import LabelledExample, ModelPublished
from loopmesh.mesh.feature_repo import project_dir
from loopmesh.mesh.model_spec import ModelSpec, load_spec_files
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.trainer import instruments
from loopmesh.trainer.agents import TrainerHandlers, example_sink
from loopmesh.trainer.core import TrainerCore
from loopmesh.trainer.plan import plan_of
from loopmesh.trainer.server import METHOD_ROLES, SERVICE_NAME, TrainerServicer
from loopmesh.trainer.settings import TrainerSettings
from loopmesh.trainer.train import FitFn
from loopmesh.trainer.train import fit as default_fit

log = logging.getLogger(__name__)


class TrainerApp:
    """Everything ``python -m loopmesh.trainer`` runs, started and stopped together."""

    def __init__(
        self,
        settings: TrainerSettings,
        *,
        fit: FitFn = default_fit,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.name = "trainer"
        self.settings = settings
        # The model's spec, when the project has one, decides the task, the inputs and the
        # module; its training and gate sections go over the settings. A spec whose factory
        # cannot be imported, built or exported stops the start, naming its file and field.
        project = project_dir(settings.project)
        files = load_spec_files(project)
        found: tuple[str, ModelSpec | None] = files.get(settings.trainer.model_name, ("", None))
        source, spec = found
        plan, scope = plan_of(spec, source, settings.trainer, project)
        if spec is not None:
            plan.check(scope.training)
        self.plan = plan
        self.scope = scope
        self.producer = EventProducer(settings.kafka, "trainer")
        self._interceptors = interceptors
        self.core: TrainerCore | None = None
        self.server: GrpcServer | None = None
        self.sink: BatchSink[LabelledExample] | None = None
        self._consumers: list[EventConsumer[Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.crashed = asyncio.Event()
        self._stopping = False
        """Set when a consuming task died: the process should exit for its supervisor."""
        self.core = TrainerCore(
            scope, settings.model_repository, announce=self._announce, fit=fit, plan=plan
        )
        self._build_consumers(self.core)

    def _build_consumers(self, core: TrainerCore) -> None:
        kafka, topics, group = self.settings.kafka, self.scope.topics, self.scope.model_name
        self.sink = example_sink(
            kafka,
            topics.topic("examples"),
            f"trainer-{group}-examples",
            core.dataset,
            model_name=self.scope.model_name,
            dlq=self.producer,
            flush_rows=self.scope.dataset.flush_rows,
            flush_seconds=self.scope.dataset.flush_seconds,
            on_stored=lambda n: self._stored(core, n),
            observe=core.observe_examples,
        )
        handlers = TrainerHandlers(core)
        for which, handler in (
            ("erased", handlers.on_erased),
            ("rollouts", handlers.on_rollout),
        ):
            self._consumers.append(
                EventConsumer(
                    kafka,
                    topics.topic(which),
                    f"trainer-{group}-{which}",
                    handler,
                    dlq=self.producer,
                    service="trainer",
                )
            )

    def _stored(self, core: TrainerCore, count: int) -> None:
        instruments.record_examples_stored(self.scope.model_name, count)
        core.examples_stored()

    @property
    def address(self) -> str:
        return self.server.address if self.server is not None else ""

    async def _announce(self, event: ModelPublished) -> None:
        await self.producer.publish(self.scope.topics.topic("published"), event)

    async def _add_examples(self, examples: list[LabelledExample]) -> None:
        await self.producer.publish_many(self.scope.topics.topic("examples"), examples)

    async def start(self) -> None:
        await declare_topics(self.settings.kafka, self.scope.topics.all())
        await self.producer.start()
        if self.core is not None:
            await self.core.start()
            assert self.sink is not None
            await self.sink.start()
            self._spawn(self.sink.run(), "trainer-examples")
            for consumer in self._consumers:
                await consumer.start()
                self._spawn(consumer.run(), consumer.group_id)
            self.server = GrpcServer(
                "trainer",
                self.scope.server,
                auth=self.settings.auth,
                method_roles=METHOD_ROLES,
                interceptors=self._interceptors,
            )
            trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
                TrainerServicer(self.core, self._add_examples), self.server.server
            )
            await self.server.start([SERVICE_NAME])

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        task.add_done_callback(self._on_task_done)
        self._tasks.append(task)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping:
            return
        log.error("%s ended unexpectedly", task.get_name(), exc_info=task.exception())
        self.crashed.set()

    async def stop(self) -> None:
        self._stopping = True
        if self.server is not None:
            await self.server.stop()
        if self.core is not None:
            # First: no new runs (a last flush must not start one); a run in progress
            # finishes and publishes while the producer is still up.
            await self.core.stop()
        if self.sink is not None:
            await self.sink.stop()
        for consumer in self._consumers:
            await consumer.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.producer.stop()
