"""The six services in-process on free ports, for the bad-input tests (no tests here).

Each runs on the session's Kafka, tritonserver and Feast repo with its own topics, and with a
small receive limit (``MAX_MESSAGE_BYTES``) so oversized messages are cheap to send. The
gateway reads features from the real FeatureService started here and serves one model
version loaded into Triton.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loopmesh.features.server import METHOD_ROLES as FEATURE_ROLES
from loopmesh.features.server import FeatureServicer
from loopmesh.features.settings import FeaturesScope
from loopmesh.features.store import FeastGateway
from loopmesh.gen.loopmesh.v1 import features_pb2_grpc
from loopmesh.inference.app import InferenceGateway
from loopmesh.inference.settings import InferenceScope, InferenceSettings
from loopmesh.mesh.bus import EventProducer, declare_topics
from loopmesh.mesh.events import EntityErased
from loopmesh.mesh.intake_server import IntakeServer
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.mesh.settings import GrpcServerSettings, KafkaSettings
from loopmesh.mesh.topics import ENTITIES_ERASED, PREDICTIONS, ROLLOUTS
from loopmesh.rollout.app import RolloutApp
from loopmesh.trainer.app import TrainerApp
from loopmesh.trainer.settings import TopicNames, TrainerScope, TrainerSettings, TriggerSettings
from tests.helpers import unique_topic
from tests.test_bad_input_support import MAX_MESSAGE_BYTES
from tests.test_inference_support import FEATURES, load, publish
from tests.test_ingestion_support import feedback, ingestion, new_topic
from tests.test_rollout_support import quick_policy, rollout_settings

pytestmark = pytest.mark.e2e  # assembles the mesh: several services on real parts

BATCH_LIMIT = 50
"""Events per Ingest request the door accepts."""
MAX_ENTITIES = 20
"""Entities per GetOnlineFeatures request the feature service accepts."""


def server_settings() -> GrpcServerSettings:
    return GrpcServerSettings(port=0, grace_seconds=1, max_message_bytes=MAX_MESSAGE_BYTES)


@dataclass
class Mesh:
    addresses: dict[str, str]
    """Service full name -> address."""
    ingestion_topic: str
    feedback_topic: str
    model: str
    trainer_model: str
    kafka: KafkaSettings


@contextlib.asynccontextmanager
async def _door(server: IntakeServer) -> AsyncIterator[str]:
    await declare_topics(server.kafka, [server.topic])
    await server.start()
    try:
        yield server.address
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def _features(kafka: KafkaSettings, feast_repo: Path, data: Path) -> AsyncIterator[str]:
    erasures = unique_topic(ENTITIES_ERASED)
    await declare_topics(kafka, [erasures])
    scope = FeaturesScope(
        repo_path=feast_repo,
        server=server_settings(),
        data_dir=data,
        erasures_topic=erasures.name,
        run_agents=False,
        max_entities=MAX_ENTITIES,
    )
    store = FeastGateway.open(scope)
    producer = EventProducer(kafka, "features-bad-input")
    await producer.start()

    async def publish_erasure(event: EntityErased) -> None:
        await producer.publish(erasures, event)

    server = GrpcServer("features", scope.server, method_roles=FEATURE_ROLES)
    servicer = FeatureServicer(store, publish_erasure, max_entities=MAX_ENTITIES)
    features_pb2_grpc.add_FeatureServiceServicer_to_server(servicer, server.server)
    try:
        await server.start(["loopmesh.v1.FeatureService"])
        yield server.address
    finally:
        await server.stop()
        await producer.stop()
        store.close()


def _trainer_settings(kafka: KafkaSettings, repo: Path, data: Path) -> TrainerSettings:
    suffix = uuid.uuid4().hex[:8]
    topics = TopicNames(**{k: f"{v}.{suffix}" for k, v in TopicNames().model_dump().items()})
    return TrainerSettings(
        kafka=kafka,
        model_repository=repo,
        trainer=TrainerScope(
            model_name=f"bad_{suffix}",
            data_dir=data,
            server=server_settings(),
            topics=topics,
            triggers=TriggerSettings(
                min_new_examples=1_000_000, drift_detector=None, check_interval_seconds=5
            ),
        ),
    )


@contextlib.asynccontextmanager
async def running_mesh(
    kafka: KafkaSettings, triton_url: str, repo: Path, feast_repo: Path, data: Path
) -> AsyncIterator[Mesh]:
    model = f"bad{uuid.uuid4().hex[:8]}"
    publish(repo, model, [1], FEATURES)
    await load(triton_url, model)
    ingestion_topic, feedback_topic = new_topic("events.raw"), new_topic("feedback")
    limits = {"max_batch_items": BATCH_LIMIT}
    server = {"max_message_bytes": MAX_MESSAGE_BYTES}
    trainer = TrainerApp(_trainer_settings(kafka, repo, data / "trainer"))
    settings = rollout_settings(kafka, triton_url, repo, quick_policy())
    settings.rollout.server = server_settings()
    rollout = RolloutApp(settings)
    async with contextlib.AsyncExitStack() as stack:
        ingest = await stack.enter_async_context(
            _door(ingestion(kafka, ingestion_topic, server=server, limits=limits))
        )
        door = feedback(kafka, feedback_topic, server=server, limits=limits)
        feedback_address = await stack.enter_async_context(_door(door))
        features = await stack.enter_async_context(_features(kafka, feast_repo, data / "f"))
        gateway = InferenceGateway(
            InferenceSettings(
                kafka=kafka,
                triton_url=triton_url,
                model_repository=repo,
                inference=InferenceScope(
                    server=server_settings(),
                    features_url=features,
                    predictions_topic=unique_topic(PREDICTIONS).name,
                    rollouts_topic=unique_topic(ROLLOUTS).name,
                    default_model=model,
                    triton_timeout_s=10.0,
                ),
            )
        )
        await gateway.start()
        stack.push_async_callback(gateway.stop)
        await trainer.start()
        stack.push_async_callback(trainer.stop)
        await rollout.start()
        stack.push_async_callback(rollout.stop)
        yield Mesh(
            addresses={
                "loopmesh.v1.IngestionService": ingest,
                "loopmesh.v1.FeedbackService": feedback_address,
                "loopmesh.v1.FeatureService": features,
                "loopmesh.v1.InferenceService": gateway.address,
                "inference.GRPCInferenceService": gateway.address,
                "loopmesh.v1.TrainerService": trainer.address,
                "loopmesh.v1.RolloutService": rollout.address,
            },
            ingestion_topic=ingestion_topic,
            feedback_topic=feedback_topic,
            model=model,
            trainer_model=trainer.settings.trainer.model_name,
            kafka=kafka,
        )
