"""Shared parts of the rollout controller tests (no tests here).

The peers are simulated exactly as they talk to the controller: the trainer by writing a
version into the model repository and publishing ``ModelPublished``; the trainer's joiner by
publishing ``VersionMetrics`` per version to ``metrics.live`` (``MetricsFeeder``). The inference
gateway's view is the ``rollouts`` topic, read back by ``ChangeLog``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tritonclient.grpc.aio as triton_aio
from aiokafka import AIOKafkaConsumer

from loopmesh.mesh import model_repo
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.events import ModelPublished, RolloutChanged, VersionMetrics
from loopmesh.mesh.settings import GrpcServerSettings, KafkaSettings
from loopmesh.mesh.topics import Topic
from loopmesh.rollout.policy import RolloutPolicy
from loopmesh.rollout.settings import RolloutScope, RolloutSettings, RolloutTopics
from loopmesh.trainer.export import export_module
from tests.helpers import eventually

N_FEATURES = 4
WINDOW_SECONDS = 3600.0
"""Longer than any test: each snapshot's count is everything the version served so far."""


def unique_model() -> str:
    return f"ro{uuid.uuid4().hex[:10]}"


async def unload_models(triton_url: str, models: Iterable[str]) -> None:
    """Unload the models a test used: each loaded version is a python-backend process of
    several hundred MB, which the rest of the session should not carry."""
    client = triton_aio.InferenceServerClient(triton_url)
    try:
        for name in sorted(set(models)):
            await client.unload_model(name, client_timeout=60)
    finally:
        await client.close()


def unique_topics() -> RolloutTopics:
    tag = uuid.uuid4().hex[:8]
    return RolloutTopics(
        models_published=f"models.published.{tag}",
        metrics_live=f"metrics.live.{tag}",
        rollouts=f"rollouts.{tag}",
        policies=f"rollout.policies.{tag}",
    )


def quick_policy(**overrides: Any) -> RolloutPolicy:
    """Small thresholds and short steps so a rollout takes seconds."""
    base: dict[str, Any] = {
        "min_samples": 30,
        "min_step_seconds": 0.5,
        "step_timeout_seconds": 60.0,
        "drain_seconds": 600.0,
        "max_regression": 0.005,
    }
    return RolloutPolicy(**{**base, **overrides})


def rollout_settings(
    kafka: KafkaSettings, triton_url: str, repo: Path, policy: RolloutPolicy
) -> RolloutSettings:
    return RolloutSettings(
        kafka=kafka,
        triton_url=triton_url,
        model_repository=repo,
        rollout=RolloutScope(
            server=GrpcServerSettings(port=0, grace_seconds=1),
            topics=unique_topics(),
            consumer_group=f"rollout-{uuid.uuid4().hex[:8]}",
            default_policy=policy,
            tick_seconds=0.1,
            reconcile_seconds=1.0,
            load_timeout_seconds=180.0,
        ),
    )


def onnx_model(seed: int) -> bytes:
    """A small model.onnx, as the trainer exports it."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 1), torch.nn.Sigmoid())
    sample = np.random.default_rng(seed).normal(size=(8, N_FEATURES))
    return export_module(module, sample).onnx


def publish_version(repo: Path, model: str, version: int) -> ModelPublished:
    """What the trainer does after its gate: the version in the repository, then the event."""
    names = [f"f{i}" for i in range(N_FEATURES)]
    model_repo.write_version(
        repo, model, version, onnx_model(version), {"feature_names": names}, n_features=N_FEATURES
    )
    meta = model_repo.read_metadata(repo, model, version)
    return ModelPublished(
        model_name=model,
        model_version=version,
        parent_version=version - 1 or None,
        sha256=meta["sha256"],
        metrics={"log_loss": 0.5},
        feature_names=names,
    )


@dataclass
class Arm:
    log_loss: float
    per_tick: int
    """Joined examples added per publication."""
    log_loss_var: float = 0.05
    count: int = 0
    published: list[int] = field(default_factory=list)


class MetricsFeeder:
    """Publishes VersionMetrics per version, as the trainer's joiner does, every ``interval``."""

    def __init__(self, producer: EventProducer, topic: Topic, model: str, interval: float = 0.2):
        self.producer = producer
        self.topic = topic
        self.model = model
        self.interval = interval
        self.arms: dict[int, Arm] = {}
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            events = []
            for version, arm in list(self.arms.items()):
                arm.count += arm.per_tick
                events.append(
                    VersionMetrics(
                        model_name=self.model,
                        model_version=version,
                        window_seconds=WINDOW_SECONDS,
                        count=arm.count,
                        log_loss=arm.log_loss,
                        log_loss_var=arm.log_loss_var,
                        label_rate=0.3,
                    )
                )
            await self.producer.publish_many(self.topic, events)
            for version in self.arms:
                self.arms[version].published.append(self.arms[version].count)
            await asyncio.sleep(self.interval)  # the joiner's publication period, not a sync

    async def __aenter__(self) -> MetricsFeeder:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class ChangeLog:
    """Reads the rollouts topic from the beginning, as the gateway does; ``on_event`` runs
    for each event as soon as it is read (e.g. to probe Triton at that moment)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        on_event: Callable[[RolloutChanged], Awaitable[None]] | None = None,
    ) -> None:
        self.kafka = kafka
        self.topic = topic
        self.on_event = on_event
        self.events: list[RolloutChanged] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.kafka.bootstrap_servers,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
            metadata_max_age_ms=1000,
        )
        await consumer.start()
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        event = RolloutChanged.model_validate_json(record.value or b"")
                        if self.on_event is not None:
                            await self.on_event(event)
                        self.events.append(event)
        finally:
            await consumer.stop()

    async def __aenter__(self) -> ChangeLog:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def of(self, version: int) -> list[RolloutChanged]:
        return [e for e in self.events if version in (e.canary_version, e.stable_version)]

    async def wait_for(
        self, predicate: Callable[[RolloutChanged], bool], timeout: float = 120.0
    ) -> RolloutChanged:
        async def found() -> RolloutChanged | None:
            return next((e for e in self.events if predicate(e)), None)

        return await eventually(found, timeout=timeout)
