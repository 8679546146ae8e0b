"""Shadow first, on the real broker and tritonserver: the gateway, the joiner and the rollout
controller in this process on their own topics; versions published as the trainer does.

A client sends Predict (its features in the context) and the feedback of a world where
P(label) = sigmoid(3 f0). Version 1 answers sigmoid(f0) (too timid); version 2 reads ``f0``
backwards; version 3 answers the world's own probability. Version 2 is shadowed, found worse
on the same requests and dropped without answering one user; version 3 is shadowed, found
better and goes straight to stable.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import inference_pb2, inference_pb2_grpc
from loopmesh.inference.app import InferenceGateway
from loopmesh.joiner.app import JoinerApp
from loopmesh.mesh import model_repo
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.events import FeedbackEvent, ModelPublished, PredictionLogged, RolloutChanged
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import Topic
from loopmesh.rollout.app import RolloutApp
from loopmesh.rollout.policy import RolloutPolicy
from loopmesh.trainer.export import export_module
from tests.helpers import read_topic
from tests.support.mesh import MeshBuilder
from tests.test_rollout_support import ChangeLog, unload_models

pytestmark = pytest.mark.e2e  # assembles the mesh: several services on real parts

N_FEATURES = 4
NAMES = [f"f{i}" for i in range(N_FEATURES)]
POLICY = RolloutPolicy(
    shadow_share=1.0,
    min_samples=150,
    max_regression=0.0,
    min_step_seconds=0.5,
    step_timeout_seconds=180.0,
    shadow_timeout_seconds=180.0,
    guard_min_requests=50,
    drain_seconds=600.0,
)
DEADLINE = 180.0


def _publish(repo: Path, model: str, version: int, slope: float) -> ModelPublished:
    """A version answering sigmoid(slope * f0), written as the trainer writes one."""
    module = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 1), torch.nn.Sigmoid())
    with torch.no_grad():
        module[0].weight.zero_()
        module[0].weight[0, 0] = slope
        module[0].bias.zero_()
    sample = np.random.default_rng(version).normal(size=(8, N_FEATURES))
    model_repo.write_version(
        repo,
        model,
        version,
        export_module(module, sample).onnx,
        {"feature_names": NAMES},
        n_features=N_FEATURES,
    )
    meta = model_repo.read_metadata(repo, model, version)
    return ModelPublished(
        model_name=model,
        model_version=version,
        sha256=meta["sha256"],
        metrics={"log_loss": 0.5},
        feature_names=NAMES,
    )


class Traffic:
    """Predict, then the world's feedback, in a loop; remembers who answered."""

    def __init__(self, stub: inference_pb2_grpc.InferenceServiceStub, producer: EventProducer):
        self.stub = stub
        self.producer = producer
        self.answered: Counter[int] = Counter()
        self.rng = np.random.default_rng(11)
        self.feedback_topic = ""

    async def run(self, topic: Topic) -> None:
        while True:
            batch = []
            for _ in range(20):
                x = self.rng.normal(size=N_FEATURES)
                batch.append((x, self._predict(x)))
            answers = await asyncio.gather(*(call for _, call in batch))
            events = []
            for (x, _), answer in zip(batch, answers, strict=True):
                self.answered[answer.model_version] += 1
                # P(label) = sigmoid(3 f0): version 3 is the world's own model.
                label = int(self.rng.random() < 1.0 / (1.0 + np.exp(-3.0 * x[0])))
                events.append(FeedbackEvent(prediction_id=answer.prediction_id, label=label))
            await self.producer.publish_many(topic, events)

    def _predict(self, x: np.ndarray) -> grpc.aio.UnaryUnaryCall:  # type: ignore[type-arg]
        context = dict(zip(NAMES, map(float, x), strict=True))
        request = inference_pb2.PredictRequest(entity_id=uuid.uuid4().hex[:12], context=context)
        return self.stub.Predict(request, timeout=30)


@contextlib.asynccontextmanager
async def running(task: asyncio.Task[None]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_worse_candidate_is_dropped_in_shadow_unseen_and_a_better_one_goes_to_stable(
    kafka_settings: KafkaSettings,
    triton: TritonServer,
    model_repository: Path,
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:8]
    model = f"shadow{tag}"
    build = MeshBuilder(
        kafka_settings,
        tmp_path,
        model_repository=model_repository,
        triton_url=triton.grpc_url,
        suffix=tag,
    )
    await build.declare()
    rollout = RolloutApp(
        build.rollout(
            default_policy=POLICY,
            tick_seconds=0.1,
            reconcile_seconds=1.0,
            load_timeout_seconds=180.0,
        )
    )
    joiner = JoinerApp(
        build.joiner(metrics_publish_interval_seconds=0.5, metrics_window_seconds=600.0)
    )
    gateway = InferenceGateway(
        build.inference(default_model=model, metrics_topic=build.rollout_topics.metrics_live)
    )
    published = build.rollout_topics.table()[0]
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(unload_models, triton.grpc_url, [model])
        await asyncio.gather(rollout.start(), joiner.start(), gateway.start())
        for part in (rollout, joiner, gateway):
            stack.push_async_callback(part.stop)
        producer = EventProducer(kafka_settings, "shadow-test")
        await producer.start()
        stack.push_async_callback(producer.stop)
        changes = await stack.enter_async_context(
            ChangeLog(kafka_settings, build.rollout_topics.rollouts)
        )

        await producer.publish(published, _publish(model_repository, model, 1, 1.0))
        await changes.wait_for(lambda e: e.state == "stable" and e.stable_version == 1)
        await producer.publish(published, _publish(model_repository, model, 2, -2.0))
        await changes.wait_for(lambda e: e.state == "shadow" and e.shadow_versions == [2])

        channel = await stack.enter_async_context(grpc.aio.insecure_channel(gateway.address))
        traffic = Traffic(inference_pb2_grpc.InferenceServiceStub(channel), producer)
        loop = asyncio.create_task(traffic.run(build.joiner_topics.topic("feedback")))
        await stack.enter_async_context(running(loop))

        dropped = await changes.wait_for(lambda e: e.state == "dropped", timeout=DEADLINE)
        assert dropped.stable_version == 1 and dropped.canary_version == 2, dropped
        assert "v2 dropped in shadow, having answered no user" in dropped.reason
        assert "shadow is worse" in dropped.reason and "paired" in dropped.reason
        served_while_shadowed = dict(traffic.answered)
        # Every user was answered by stable; v2 scored the same requests in the shadow only.
        assert set(served_while_shadowed) == {1}, served_while_shadowed
        assert 2 not in gateway.counters.for_model(model)

        await producer.publish(published, _publish(model_repository, model, 3, 3.0))
        promoted = await changes.wait_for(
            lambda e: e.state == "stable" and e.stable_version == 3, timeout=DEADLINE
        )
        assert "v3 promoted to stable from shadow" in promoted.reason, promoted.reason
        between = [e for e in changes.events if e.event_time < promoted.event_time]
        assert any(e.state == "shadow" and e.shadow_versions == [3] for e in between)
        assert not any(e.canary_version == 3 and e.canary_weight > 0 for e in changes.events)
        assert 2 not in traffic.answered

    # The log carries the shadow's answers next to stable's, for the same prediction ids.
    logged = await read_topic(
        kafka_settings, build.joiner_topics.predictions, expect=sum(served_while_shadowed.values())
    )
    predictions = [PredictionLogged.model_validate_json(value or b"") for _, value, _ in logged]
    with_v2 = [p for p in predictions if any(s.model_version == 2 for s in p.shadow)]
    assert len(with_v2) >= POLICY.min_samples
    assert all(p.model_version == 1 for p in with_v2)
    assert all(isinstance(e, RolloutChanged) for e in changes.events)
