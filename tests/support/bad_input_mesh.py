"""The mesh under hostile input: every Kafka consumer of every service, in one process.

Used by ``tests/test_bad_input_topics.py``: the features agents (with a Feast repo), the
trainer (joiner, dataset sink, consumers), the rollout controller (with Triton) and the
inference gateway, each configured with topics of their own, plus a raw producer and a
reader of every dead-letter topic.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from loopmesh.features.agents import FeatureAgents
from loopmesh.features.store import FeastGateway
from loopmesh.inference.app import InferenceGateway
from loopmesh.joiner.app import JoinerApp
from loopmesh.mesh.events import Event
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.rollout.app import RolloutApp
from loopmesh.rollout.settings import RolloutTopics
from loopmesh.trainer.app import TrainerApp
from loopmesh.trainer.settings import (
    DatasetSettings,
    TriggerSettings,
)
from tests.helpers import eventually
from tests.support.hostile import Bad, DeadLetters, Sent, send_all
from tests.support.mesh import MeshBuilder, started

TIMEOUT = 60.0

# Every topic some service consumes, with how many consumers read it continuously. The test
# below derives the consumed set from the services' own settings, so a new consumer of a
# topic without a case here fails it.
CONSUMERS: dict[str, int] = {
    "events.raw": 1,  # features agents
    "entities.erased": 2,  # features agents, trainer
    "predictions": 1,  # joiner
    "feedback": 1,  # joiner
    "training.examples": 1,  # trainer dataset sink
    "metrics.live": 1,  # rollout controller
    "models.published": 1,  # rollout controller
    "rollouts": 2,  # trainer, inference routes (+ rollout controller at start-up)
    "rollout.policies": 0,  # rollout controller, at start-up only
}


@dataclass
class Mesh:
    suffix: str
    kafka: KafkaSettings
    producer: AIOKafkaProducer
    letters: DeadLetters
    features: FeatureAgents
    store: FeastGateway
    joiner: JoinerApp
    trainer: TrainerApp
    rollout: RolloutApp
    gateway: InferenceGateway

    def topic(self, name: str) -> str:
        return f"{name}.{self.suffix}"

    @property
    def model(self) -> str:
        return self.trainer.scope.model_name

    async def round(
        self,
        base: str,
        bad: list[Bad],
        good: list[tuple[Event, str]],
        effect: Callable[[], Any],
    ) -> None:
        """Produce ``bad`` interleaved with ``good`` (event, key) and wait for it all."""
        topic = self.topic(base)
        messages: list[tuple[bytes | None, bytes | None, Any]] = []
        hostile_at: list[int] = []
        for i, item in enumerate(bad):
            hostile_at.append(len(messages))
            messages.append((item.value, item.key, item.headers))
            if i < len(good):
                messages.append(valid(*good[i]))
        messages.extend(valid(*pair) for pair in good[len(bad) :])
        sent = await send_all(self.producer, topic, messages)
        bad_sent = [sent[i] for i in hostile_at]
        consumers = CONSUMERS[base]

        async def done() -> bool:
            missing = [s for s in bad_sent if len(self.letters.groups_for(topic, s)) < consumers]
            return not missing and bool(await effect())

        try:
            await eventually(done, timeout=TIMEOUT, interval=0.2)
        except AssertionError:
            missing = [
                (b.kind, s.partition, s.offset, self.letters.groups_for(topic, s))
                for b, s in zip(bad, bad_sent, strict=True)
                if len(self.letters.groups_for(topic, s)) < consumers
            ]
            raise AssertionError(f"not dead-lettered: {missing}; effect {await effect()}") from None
        self.assert_running()

    def assert_running(self) -> None:
        assert not self.features.crashed, "features agents crashed"
        assert not self.trainer.crashed.is_set(), "a trainer consumer died"
        assert not self.joiner.crashed.is_set(), "the joiner crashed"
        assert not self.joiner.joiner.app.crashed, "the joiner's faust app crashed"
        assert not self.rollout.crashed.is_set(), "a rollout loop died"

    async def committed_past(self, group: str, sent: Sent) -> bool:
        """Whether ``group`` committed beyond ``sent`` (its handler returned for it)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka.bootstrap_servers)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
        return any(
            tp.partition == sent.partition and meta.offset > sent.offset
            for tp, meta in offsets.items()
        )


def valid(event: Event, key: str) -> tuple[bytes, bytes, tuple[()]]:
    return event.model_dump_json(by_alias=True).encode(), key.encode(), ()


@contextlib.asynccontextmanager
async def running_mesh(
    kafka_settings: KafkaSettings,
    feast_repo: Path,
    triton_url: str,
    model_repository: Path,
    tmp: Path,
) -> AsyncIterator[Mesh]:
    """Every consumer of the mesh in this process, on topics of its own."""
    build = MeshBuilder(
        kafka_settings,
        tmp,
        model_repository=model_repository,
        triton_url=triton_url,
        feast_repo=feast_repo,
    )
    suffix = build.suffix
    await build.declare()
    names = [build.name(name) for name in CONSUMERS]
    async with contextlib.AsyncExitStack() as stack:
        letters = DeadLetters(kafka_settings.bootstrap_servers, names)
        await letters.start()
        stack.push_async_callback(letters.stop)
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka_settings.bootstrap_servers, acks="all", linger_ms=5
        )
        await producer.start()
        stack.push_async_callback(producer.stop)
        features_settings = build.features(run_server=False)
        store = FeastGateway.open(features_settings.features)
        features = FeatureAgents(
            features_settings, store, partitions=kafka_settings.default_partitions
        )
        joiner = JoinerApp(build.joiner(metrics_publish_interval_seconds=0.5))
        trainer = TrainerApp(
            build.trainer(
                f"bad_{suffix}",
                dataset=DatasetSettings(flush_rows=100, flush_seconds=0.2),
                triggers=TriggerSettings(min_new_examples=None, drift_detector=None),
            )
        )
        rollout = RolloutApp(build.rollout())
        gateway = InferenceGateway(build.inference())
        await stack.enter_async_context(started(features, joiner, trainer, rollout, gateway))
        yield Mesh(
            suffix,
            kafka_settings,
            producer,
            letters,
            features,
            store,
            joiner,
            trainer,
            rollout,
            gateway,
        )


def rollout_topics(suffix: str) -> RolloutTopics:
    return RolloutTopics(
        models_published=f"models.published.{suffix}",
        metrics_live=f"metrics.live.{suffix}",
        rollouts=f"rollouts.{suffix}",
        policies=f"rollout.policies.{suffix}",
    )


def tag() -> str:
    return uuid.uuid4().hex[:10]
