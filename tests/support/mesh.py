"""One builder for every test that assembles the mesh in its own process.

``MeshBuilder`` names every topic of the mesh under one suffix (``<name>.<suffix>``), so a
test never shares data with another, and builds each deployable's settings on those topics
with the short group timeouts tests need (and on the user's project, when one is given: every
deployable reads its model specs); a test overrides only what it checks. ``start`` starts
parts together and stops them in reverse order.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from loopmesh.features.settings import FeaturesScope, FeaturesSettings, StreamTuning
from loopmesh.feedback.settings import FeedbackScope, FeedbackSettings
from loopmesh.inference.settings import InferenceScope, InferenceSettings
from loopmesh.joiner.settings import JoinerScope, JoinerSettings, JoinerTopics
from loopmesh.mesh.bus import declare_topics
from loopmesh.mesh.settings import GrpcServerSettings, KafkaSettings
from loopmesh.mesh.topics import EVENTS_RAW, Topic
from loopmesh.rollout.settings import RolloutScope, RolloutSettings, RolloutTopics
from loopmesh.trainer.settings import TopicNames, TrainerScope, TrainerSettings

FAST_GROUP = {"session_timeout_seconds": 6, "heartbeat_interval_seconds": 1}
"""Consumer-group timing that makes joins and rebalances take seconds, not half a minute."""


class Part(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class MeshBuilder:
    """Settings of every deployable on this test's own topics."""

    def __init__(
        self,
        kafka: KafkaSettings,
        work: Path,
        *,
        model_repository: Path | None = None,
        triton_url: str = "127.0.0.1:1",
        feast_repo: Path | None = None,
        suffix: str | None = None,
        project: Path | None = None,
    ) -> None:
        self.kafka = kafka
        self.project = project
        """``MeshSettings.project`` of every deployable (None: the default project)."""
        self.work = work
        self.model_repository = model_repository or work / "models"
        self.triton_url = triton_url
        self.feast_repo = feast_repo
        self.suffix = suffix or uuid.uuid4().hex[:8]
        self.trainer_topics = TopicNames(**self._renamed(TopicNames()))
        self.joiner_topics = JoinerTopics(**self._renamed(JoinerTopics()))
        self.rollout_topics = RolloutTopics(**self._renamed(RolloutTopics()))
        self.events = replace(EVENTS_RAW, name=self.name(EVENTS_RAW.name))
        # The trainer's erasures are the features' (co-partitioned with events.raw).
        self.erased = self.trainer_topics.topic("erased")

    @property
    def _project(self) -> dict[str, Any]:
        # Left out when None, so LOOPMESH_PROJECT still applies as it does for a deployable.
        return {} if self.project is None else {"project": self.project}

    def name(self, base: str) -> str:
        return f"{base}.{self.suffix}"

    def _renamed(self, names: Any) -> dict[str, str]:
        return {k: self.name(v) for k, v in names.model_dump().items()}

    def topics(self) -> list[Topic]:
        """Every topic the mesh reads or writes, under this suffix."""
        return [
            self.events,
            *self.joiner_topics.all(),
            *self.trainer_topics.all(),
            *self.rollout_topics.table(),
        ]

    async def declare(self) -> None:
        """Declare them all first: a producer would auto-create one with one partition."""
        await declare_topics(self.kafka, self.topics())

    def features(self, **scope: Any) -> FeaturesSettings:
        assert self.feast_repo is not None, "MeshBuilder(feast_repo=...) for features"
        fields: dict[str, Any] = {
            "repo_path": self.feast_repo,
            "app_id": f"features-{self.suffix}",
            "events_topic": self.events.name,
            "erasures_topic": self.erased.name,
            "stream": StreamTuning(
                session_timeout_s=6,
                heartbeat_interval_s=1,
                rebalance_timeout_s=10,
            ),
        } | scope
        return FeaturesSettings(kafka=self.kafka, **self._project, features=FeaturesScope(**fields))

    def joiner(self, **scope: Any) -> JoinerSettings:
        fields: dict[str, Any] = {
            "app_id": f"joiner-{self.suffix}",
            "topics": self.joiner_topics,
            "data_dir": self.work / "joiner",
            "server": GrpcServerSettings(port=0),
            **FAST_GROUP,
        } | scope
        return JoinerSettings(kafka=self.kafka, **self._project, joiner=JoinerScope(**fields))

    def trainer(self, model: str, **scope: Any) -> TrainerSettings:
        fields: dict[str, Any] = {
            "model_name": model,
            "data_dir": self.work / "trainer",
            "server": GrpcServerSettings(port=0, grace_seconds=1),
            "topics": self.trainer_topics,
        } | scope
        return TrainerSettings(
            kafka=self.kafka,
            **self._project,
            model_repository=self.model_repository,
            trainer=TrainerScope(**fields),
        )

    def rollout(self, **scope: Any) -> RolloutSettings:
        fields: dict[str, Any] = {
            "server": GrpcServerSettings(port=0, grace_seconds=1),
            "topics": self.rollout_topics,
            "consumer_group": f"rollout-{self.suffix}",
            "tick_seconds": 0.2,
        } | scope
        return RolloutSettings(
            kafka=self.kafka,
            **self._project,
            triton_url=self.triton_url,
            model_repository=self.model_repository,
            rollout=RolloutScope(**fields),
        )

    def inference(self, features_url: str = "127.0.0.1:1", **scope: Any) -> InferenceSettings:
        fields: dict[str, Any] = {
            "server": GrpcServerSettings(port=0, grace_seconds=1),
            "features_url": features_url,
            "predictions_topic": self.joiner_topics.predictions,
            "rollouts_topic": self.trainer_topics.rollouts,
            "triton_timeout_s": 5.0,
        } | scope
        return InferenceSettings(
            kafka=self.kafka,
            **self._project,
            triton_url=self.triton_url,
            model_repository=self.model_repository,
            inference=InferenceScope(**fields),
        )

    def feedback(self, **scope: Any) -> FeedbackSettings:
        """The feedback door on the joiner's feedback topic."""
        fields: dict[str, Any] = {
            "server": GrpcServerSettings(port=0, grace_seconds=1),
            "topic": self.joiner_topics.feedback,
        } | scope
        return FeedbackSettings(kafka=self.kafka, **self._project, feedback=FeedbackScope(**fields))


@contextlib.asynccontextmanager
async def started(*parts: Part) -> AsyncIterator[None]:
    """Start ``parts`` in order and stop them in reverse, whatever happens in between."""
    async with contextlib.AsyncExitStack() as stack:
        for part in parts:
            await part.start()
            stack.push_async_callback(part.stop)
        yield
