"""Pseudonymised entity ids and erasure, end to end on the real broker, Feast and Triton.

One HMAC key (``LOOPMESH_PRIVACY__*``) is given to ingestion and inference (in-process) and
to the features worker (``python -m loopmesh.features``). The app only ever says "alice":
her events land in Feast under her pseudonym (never under "alice"), ``Predict("alice")``
reads those features and logs the prediction under the pseudonym, and the trainer (joiner,
dataset, erasure consumer; in-process) stores the joined example under it. Then
``DeleteEntity("alice")`` erases her online features and, through ``EntityErased``, her
training rows: predictions and feedback about her after the erasure never become training
rows, while bob's still do.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import SecretStr

from loopmesh.devstack.process import free_port, log_tail
from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import (
    features_pb2,
    features_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)
from loopmesh.gen.loopmesh.v1 import ingestion_pb2 as ipb
from loopmesh.inference.app import InferenceGateway
from loopmesh.joiner.app import JoinerApp
from loopmesh.joiner.settings import JoinerTopics
from loopmesh.mesh import model_repo
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.events import EntityErased, FeedbackEvent, PredictionLogged
from loopmesh.mesh.privacy import PrivacySettings
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.trainer.app import TrainerApp
from loopmesh.trainer.settings import (
    TopicNames,
    TriggerSettings,
)
from tests.helpers import eventually, read_topic
from tests.support.mesh import MeshBuilder, started
from tests.test_features_service import MISSING, PRESENT, Worker, _serving
from tests.test_inference_support import load, onnx_model
from tests.test_ingestion_support import ingestion, ingestion_stub, running

pytestmark = pytest.mark.e2e  # assembles the mesh: several services on real parts

# Raw ids of this run: the session's Feast store is shared, and other tests use plain names.
ALICE, BOB = f"alice-{uuid.uuid4().hex[:8]}", f"bob-{uuid.uuid4().hex[:8]}"

FEATURES = ["entity_activity:events_total", "entity_numeric:value_mean"]
LOAD_TIMEOUT = 120.0


@dataclass
class Mesh:
    key: SecretStr
    model: str
    features: Any
    """FeatureService stub of the worker."""
    predict: Any
    """InferenceService stub of the gateway."""
    ingest: Any
    """IngestionService stub."""
    trainer: TrainerApp
    producer: EventProducer
    topics: TopicNames
    joins: JoinerTopics
    kafka: KafkaSettings

    def pseudonym(self, raw: str) -> str:
        return hmac.new(
            self.key.get_secret_value().encode(), raw.encode(), hashlib.sha256
        ).hexdigest()

    async def online(self, entity_id: str) -> dict[str, tuple[float | None, int]]:
        """``{ref: (value, status)}`` of one entity as stored."""
        reply = await self.features.GetOnlineFeatures(
            features_pb2.GetOnlineFeaturesRequest(entity_ids=[entity_id], feature_refs=FEATURES),
            timeout=10,
        )
        (entity,) = reply.entities
        return {
            ref: (v.value.number if v.value.WhichOneof("kind") else None, v.status)
            for ref, v in zip(reply.feature_refs, entity.values, strict=True)
        }

    async def predict_and_feed_back(self, raw: str, label: int) -> inference_pb2.PredictResponse:
        reply: inference_pb2.PredictResponse = await self.predict.Predict(
            inference_pb2.PredictRequest(entity_id=raw, model_name=self.model), timeout=30
        )
        await self.producer.publish(
            self.joins.topic("feedback"),
            FeedbackEvent(prediction_id=reply.prediction_id, label=label),
        )
        return reply

    def training_rows(self) -> list[str]:
        """Entity ids of the trainer's clean training rows."""
        core = self.trainer.core
        assert core is not None
        return [str(e) for e in core.dataset.load(self.model).entity_ids]


@pytest.fixture
async def mesh(
    kafka_settings: KafkaSettings,
    feast_repo: Path,
    triton: TritonServer,
    model_repository: Path,
    tmp_path: Path,
) -> AsyncIterator[Mesh]:
    suffix = uuid.uuid4().hex[:8]
    key = SecretStr(uuid.uuid4().hex + uuid.uuid4().hex)
    privacy = PrivacySettings(pseudonymise_entity_ids=True, entity_id_key=key)
    build = MeshBuilder(
        kafka_settings,
        tmp_path,
        model_repository=model_repository,
        triton_url=triton.grpc_url,
        suffix=suffix,
    )
    await build.declare()  # events and erasures co-partitioned, before use
    events, erasures = build.events, build.erased
    topics, joins = build.trainer_topics, build.joiner_topics
    model = f"privacy_{suffix}"

    # The features worker boots (feast import) while the rest starts here.
    port = free_port()
    worker = Worker(
        {
            **os.environ,
            "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
            "LOOPMESH_KAFKA__DEFAULT_PARTITIONS": str(kafka_settings.default_partitions),
            "LOOPMESH_PRIVACY__PSEUDONYMISE_ENTITY_IDS": "true",
            "LOOPMESH_PRIVACY__ENTITY_ID_KEY": key.get_secret_value(),
            "LOOPMESH_FEATURES__REPO_PATH": str(feast_repo),
            "LOOPMESH_FEATURES__SERVER__PORT": str(port),
            "LOOPMESH_FEATURES__APP_ID": f"features-privacy-{suffix}",
            "LOOPMESH_FEATURES__DATA_DIR": str(tmp_path / "faust"),
            "LOOPMESH_FEATURES__EVENTS_TOPIC": events.name,
            "LOOPMESH_FEATURES__ERASURES_TOPIC": erasures.name,
            "LOOPMESH_FEATURES__STREAM__SESSION_TIMEOUT_S": "6",
            "LOOPMESH_FEATURES__STREAM__HEARTBEAT_INTERVAL_S": "1",
            "LOOPMESH_FEATURES__STREAM__REBALANCE_TIMEOUT_S": "10",
            "LOOPMESH_FEATURES__STREAM__COMMIT_INTERVAL_S": "0.2",
        },
        tmp_path / "features.log",
    )
    worker.start()
    features_url = f"127.0.0.1:{port}"

    model_repo.write_version(
        model_repository,
        model,
        1,
        onnx_model(1, n_features=len(FEATURES)),
        {"feature_names": FEATURES},
        n_features=len(FEATURES),
    )
    trainer = TrainerApp(
        build.trainer(model, triggers=TriggerSettings(min_new_examples=10**9, drift_detector=None))
    )
    inference = build.inference(
        features_url, features_timeout_s=10.0, on_features_unavailable="fail"
    ).model_copy(update={"privacy": privacy})
    producer = EventProducer(kafka_settings, "privacy-test")
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(_reap, worker)
        await stack.enter_async_context(started(trainer, JoinerApp(build.joiner())))
        await producer.start()
        stack.push_async_callback(producer.stop)
        await load(triton.grpc_url, model)
        stack.push_async_callback(_unload, triton.grpc_url, model)
        gateway = InferenceGateway(inference)
        await gateway.start()
        stack.push_async_callback(gateway.stop)
        channel = await stack.enter_async_context(
            running(ingestion(kafka_settings, events.name, privacy=privacy))
        )
        features_channel = await stack.enter_async_context(grpc.aio.insecure_channel(features_url))
        gateway_channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(gateway.address)
        )

        async def serving() -> bool:
            if worker.proc is not None and worker.proc.poll() is not None:
                raise AssertionError(f"features worker exited:\n{log_tail(worker.log)}")
            return await _serving(features_url)

        await eventually(serving, timeout=120, interval=0.5)
        yield Mesh(
            key=key,
            model=model,
            features=features_pb2_grpc.FeatureServiceStub(features_channel),
            predict=inference_pb2_grpc.InferenceServiceStub(gateway_channel),
            ingest=ingestion_stub(channel),
            trainer=trainer,
            producer=producer,
            topics=topics,
            joins=joins,
            kafka=kafka_settings,
        )
        assert worker.stop() == 0, log_tail(worker.log)


def _reap(worker: Worker) -> None:
    if worker.proc is not None and worker.proc.poll() is None:
        worker.proc.kill()
        worker.proc.wait(timeout=30)


async def _unload(triton_url: str, model: str) -> None:
    import tritonclient.grpc.aio as aioclient

    async with aioclient.InferenceServerClient(triton_url) as client:
        await client.unload_model(model, client_timeout=LOAD_TIMEOUT)


async def test_one_key_pseudonymises_everywhere_and_erasure_reaches_features_and_training(
    mesh: Mesh,
) -> None:
    alice, bob = mesh.pseudonym(ALICE), mesh.pseudonym(BOB)
    assert alice != bob and ALICE not in alice

    # Ingest with raw ids: the features appear under the pseudonym, never under "alice".
    values = {ALICE: [2.0, 4.0, 6.0], BOB: [10.0]}
    reply = await mesh.ingest.Ingest(
        ipb.IngestRequest(
            events=[
                ipb.InteractionEvent(
                    event_id=uuid.uuid4().hex,
                    entity_id=raw,
                    event_type="click",
                    numeric={"value": value},
                )
                for raw, vs in values.items()
                for value in vs
            ]
        ),
        timeout=30,
    )
    assert reply.accepted == 4
    want = {
        alice: {FEATURES[0]: (3.0, PRESENT), FEATURES[1]: (4.0, PRESENT)},
        bob: {FEATURES[0]: (1.0, PRESENT), FEATURES[1]: (10.0, PRESENT)},
    }
    for entity, row in want.items():

        async def stored(entity: str = entity, row: dict[str, Any] = row) -> bool:
            return await mesh.online(entity) == row

        await eventually(stored, timeout=90, interval=0.3)
    assert {s for _, s in (await mesh.online(ALICE)).values()} == {MISSING}

    # Predict("alice") reads her pseudonym's features and logs the prediction under it.
    first = {
        raw: await mesh.predict_and_feed_back(raw, label) for raw, label in ((ALICE, 1), (BOB, 0))
    }
    assert all(not r.degraded and not r.defaulted_features for r in first.values())
    logged = {
        p.prediction_id: p
        for p in (
            PredictionLogged.model_validate_json(value or b"")
            for _, value, _ in await read_topic(mesh.kafka, mesh.joins.predictions, expect=2)
        )
    }
    for raw, entity in ((ALICE, alice), (BOB, bob)):
        event = logged[first[raw].prediction_id]
        assert event.entity_id == entity
        assert event.features == {ref: value for ref, (value, _) in want[entity].items()}
    sink = mesh.trainer.sink
    assert sink is not None
    await eventually(lambda: _now(sink.stored == 2), timeout=90, interval=0.3)
    assert sorted(mesh.training_rows()) == sorted([alice, bob])

    # DeleteEntity("alice"): the raw id maps to the same pseudonym, whose features go.
    deleted = await mesh.features.DeleteEntity(
        features_pb2.DeleteEntityRequest(entity_id=ALICE, reason="user request"), timeout=10
    )
    assert deleted.existed
    assert {s for _, s in (await mesh.online(alice)).values()} == {MISSING}
    assert (await mesh.online(bob)) == want[bob]
    erasures = await read_topic(mesh.kafka, mesh.topics.erased, expect=1)
    assert [EntityErased.model_validate_json(v or b"").entity_id for _, v, _ in erasures] == [alice]
    core = mesh.trainer.core
    assert core is not None
    await eventually(lambda: _now(alice in core.dataset.erased()), timeout=60, interval=0.3)
    assert mesh.training_rows() == [bob]

    # Traffic after the erasure: alice's feedback makes no training row, bob's still does.
    second = {raw: await mesh.predict_and_feed_back(raw, 1) for raw in (ALICE, BOB)}
    assert set(second[ALICE].defaulted_features) == set(FEATURES)  # nothing stored any more
    await eventually(lambda: _now(sink.stored == 4), timeout=90, interval=0.3)
    assert mesh.training_rows() == [bob, bob]
    assert {s for _, s in (await mesh.online(alice)).values()} == {MISSING}


async def _now(value: bool) -> bool:
    return value
