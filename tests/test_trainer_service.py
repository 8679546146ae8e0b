"""The trainer end to end on the real broker and tritonserver: traffic -> joiner -> dataset ->
trigger -> PyTorch -> gate -> model repository -> Triton, plus the gRPC API and erasure."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as grpcclient

from loopmesh.devstack.synthetic import SyntheticConfig, SyntheticWorld, traffic
from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import trainer_pb2, trainer_pb2_grpc
from loopmesh.joiner.app import JoinerApp
from loopmesh.joiner.settings import JoinerTopics
from loopmesh.mesh import model_repo, quality
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.events import DeadLetter, EntityErased, ModelPublished
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.trainer.app import TrainerApp
from loopmesh.trainer.settings import (
    DatasetSettings,
    TopicNames,
    TrainerSettings,
    TrainingSettings,
    TriggerSettings,
)
from loopmesh.trainer.train import FitResult, fit, load_scoring, predict
from tests.helpers import eventually, read_topic
from tests.support.mesh import MeshBuilder, started

N_TRIGGER = 700
LOAD_TIMEOUT = 120.0


class SwitchableFit:
    """The real fit; with ``shuffle`` on it learns from permuted labels (a worse candidate)."""

    def __init__(self) -> None:
        self.shuffle = False

    def __call__(
        self,
        x: Any,
        y: Any,
        xv: Any,
        yv: Any,
        st: Any,
        cfg: Any,
        *,
        warm: Any = None,
        plan: Any = None,
    ) -> FitResult:
        if self.shuffle:
            rng = np.random.default_rng(0)
            y, yv, warm = rng.permutation(y), rng.permutation(yv), None
        return fit(x, y, xv, yv, st, cfg, warm=warm, plan=plan)


@dataclass
class Stack:
    app: TrainerApp
    settings: TrainerSettings
    fit: SwitchableFit
    producer: EventProducer
    stub: trainer_pb2_grpc.TrainerServiceStub
    world: SyntheticWorld
    joins: JoinerTopics
    sent: int = 0

    @property
    def model(self) -> str:
        return self.settings.trainer.model_name

    @property
    def topics(self) -> TopicNames:
        return self.settings.trainer.topics

    async def send_traffic(self, n: int) -> None:
        """n predictions and their feedback, scored by a placeholder serving version 1."""
        batch = self.world.sample(n)
        labels = self.world.draw_labels(batch)
        start = datetime.now(UTC) - timedelta(hours=1) + timedelta(seconds=self.sent)
        pairs = traffic(
            batch,
            labels,
            model_name=self.model,
            model_version=1,
            scores=[0.5] * n,
            start=start,
            spacing=timedelta(milliseconds=1),
        )
        await self.producer.publish_many(self.joins.topic("predictions"), [p for p, _ in pairs])
        await self.producer.publish_many(self.joins.topic("feedback"), [f for _, f in pairs])
        self.sent += n
        sink = self.app.sink
        assert sink is not None
        await eventually(lambda: _ready(sink.stored == self.sent), timeout=60)


@pytest.fixture(scope="module")
async def stack(
    kafka_settings: KafkaSettings, model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    build = MeshBuilder(
        kafka_settings, tmp_path_factory.mktemp("stack"), model_repository=model_repository
    )
    settings = build.trainer(
        f"trainer_{build.suffix}",
        dataset=DatasetSettings(flush_rows=100, flush_seconds=0.2, min_rows=100),
        training=TrainingSettings(max_epochs=40, patience=5),
        triggers=TriggerSettings(
            min_new_examples=N_TRIGGER,
            drift_detector=None,
            cooldown_seconds=0,
            check_interval_seconds=0.3,
        ),
    )
    joins = build.joiner_topics
    joiner = JoinerApp(build.joiner(metrics_publish_interval_seconds=0.3))
    switch = SwitchableFit()
    app = TrainerApp(settings, fit=switch)
    producer = EventProducer(kafka_settings, "test")
    await app.start()
    await producer.start()
    channel = grpc.aio.insecure_channel(app.address)
    try:
        async with started(joiner):
            yield Stack(
                app,
                settings,
                switch,
                producer,
                trainer_pb2_grpc.TrainerServiceStub(channel),
                SyntheticWorld(SyntheticConfig(seed=11)),
                joins,
            )
    finally:
        await channel.close()
        await producer.stop()
        await app.stop()


async def test_examples_trigger_one_run_and_the_version_serves_in_triton(
    stack: Stack, triton: TritonServer
) -> None:
    core = stack.app.core
    assert core is not None
    # A small first version (the gate compares it with a constant predictor)...
    await stack.send_traffic(200)
    assert core.runs() == []  # 200 < N: nothing started by itself

    bootstrap = await stack.stub.TriggerTraining(
        trainer_pb2.TriggerTrainingRequest(reason="bootstrap", wait=True), timeout=120
    )
    assert bootstrap.started and bootstrap.run.status == trainer_pb2.RUN_STATUS_PUBLISHED
    assert bootstrap.run.version == 1 and bootstrap.run.reference_kind == "baseline"
    assert bootstrap.run.reasons == ["manual: bootstrap"]

    # ...then N more examples: exactly one automatic run, compared with version 1 on the same
    # holdout rows.
    await stack.send_traffic(N_TRIGGER + 50)
    await eventually(
        lambda: _ready(len(core.runs()) == 2 and core.runs()[0].status != "running"), timeout=120
    )
    assert core.maybe_trigger() is None
    auto = core.runs()[0]
    assert len(core.runs()) == 2
    assert auto.status == "published", auto.decision
    assert auto.reasons and "new examples" in auto.reasons[0]
    assert auto.version == 2 and auto.reference_kind == "stable" and auto.reference_version == 1
    assert auto.warm_started
    assert auto.candidate["auc"] > auto.reference["auc"]
    assert auto.candidate["count"] == auto.reference["count"] == auto.holdout_rows

    published = [
        ModelPublished.model_validate_json(v or b"")
        for _, v, _ in await read_topic(stack.settings.kafka, stack.topics.published, expect=2)
    ]
    assert [e.model_version for e in published] == [1, 2]
    repo = stack.settings.model_repository
    for event in published:
        meta = model_repo.read_metadata(repo, stack.model, event.model_version)
        assert event.sha256 == meta["sha256"] and event.feature_names == meta["feature_names"]
    assert published[1].parent_version == 1

    # Version 2 loads in Triton, answers like its model.onnx, and beats version 1 there.
    # Newest rows (as many as the run held out; more rows arrived since, so not the same ones).
    frame = core.dataset.load(stack.model)
    holdout = frame.take(np.arange(len(frame) - auto.holdout_rows, len(frame)))
    names = model_repo.read_metadata(repo, stack.model, 2)["feature_names"]
    x = holdout.matrix(names).astype(np.float32)
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        await asyncio.to_thread(client.load_model, stack.model, client_timeout=LOAD_TIMEOUT)
        served = {v: await asyncio.to_thread(_infer, client, stack.model, v, x) for v in (1, 2)}
    finally:
        await asyncio.to_thread(client.unload_model, stack.model, client_timeout=LOAD_TIMEOUT)
        client.close()
    published = model_repo.version_dir(repo, stack.model, 2) / model_repo.MODEL_FILE
    local = predict(load_scoring(published), x)
    np.testing.assert_allclose(served[2], local, atol=1e-5)
    auc = {v: quality.roc_auc(holdout.labels, p) for v, p in served.items()}
    assert auc[2] is not None and auc[1] is not None and auc[2] > auc[1]

    status = await stack.stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
    assert (status.newest_version, status.stable_version, status.runs_total) == (2, 2, 2)
    assert status.dataset_rows == stack.sent and not status.HasField("running")
    versions = await stack.stub.ListVersions(trainer_pb2.ListVersionsRequest(), timeout=10)
    assert [v.version for v in versions.versions] == [1, 2]
    assert all(v.intact for v in versions.versions) and versions.versions[1].stable
    assert versions.versions[1].parent_version == 1
    assert versions.versions[1].metrics["holdout_auc"] == pytest.approx(auto.candidate["auc"])
    runs = await stack.stub.ListRuns(trainer_pb2.ListRunsRequest(limit=1), timeout=10)
    assert [r.run_id for r in runs.runs] == [auto.run_id]


async def test_worse_candidate_is_rejected_and_runs_never_overlap(stack: Stack) -> None:
    core = stack.app.core
    assert core is not None
    if core.dataset.row_count(stack.model) < 300:  # when run on its own
        await stack.send_traffic(300)
    versions_before = model_repo.list_versions(stack.settings.model_repository, stack.model)
    stack.fit.shuffle = True
    try:
        first = await stack.stub.TriggerTraining(
            trainer_pb2.TriggerTrainingRequest(reason="shuffled"), timeout=10
        )
        second = await stack.stub.TriggerTraining(trainer_pb2.TriggerTrainingRequest(), timeout=10)
        assert first.started and not second.started
        assert second.run.run_id == first.run.run_id
        assert second.run.status == trainer_pb2.RUN_STATUS_RUNNING
        record = await core.wait_idle()
    finally:
        stack.fit.shuffle = False
    assert record is not None and record.run_id == first.run.run_id
    assert record.status == "rejected", record.decision
    assert record.candidate["log_loss"] > record.reference["log_loss"]
    assert "log_loss" in record.decision
    assert model_repo.list_versions(stack.settings.model_repository, stack.model) == versions_before
    history = core.history.all()
    assert history[-1].run_id == record.run_id and history[-1].status == "rejected"
    runs = await stack.stub.ListRuns(trainer_pb2.ListRunsRequest(), timeout=10)
    assert runs.runs[0].status == trainer_pb2.RUN_STATUS_REJECTED
    assert runs.runs[0].candidate["auc"] == pytest.approx(record.candidate["auc"])


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (
            trainer_pb2.TriggerTrainingRequest(model_name="../x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model_name",
        ),
        (
            trainer_pb2.TriggerTrainingRequest(model_name="other"),
            grpc.StatusCode.NOT_FOUND,
            "model_name",
        ),
        (
            trainer_pb2.TriggerTrainingRequest(reason="r" * 300),
            grpc.StatusCode.INVALID_ARGUMENT,
            "reason",
        ),
        (trainer_pb2.ListRunsRequest(limit=5000), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        (
            trainer_pb2.ListVersionsRequest(model_name="a/b"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model_name",
        ),
    ],
)
async def test_bad_requests_name_the_field(
    stack: Stack, request_: Any, code: grpc.StatusCode, field: str
) -> None:
    method = {
        trainer_pb2.TriggerTrainingRequest: stack.stub.TriggerTraining,
        trainer_pb2.ListRunsRequest: stack.stub.ListRuns,
        trainer_pb2.ListVersionsRequest: stack.stub.ListVersions,
    }[type(request_)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await method(request_, timeout=10)
    assert caught.value.code() == code
    assert (caught.value.details() or "").startswith(f"{field}: ")


async def test_erased_entity_leaves_the_dataset_and_bad_examples_are_dead_lettered(
    stack: Stack,
) -> None:
    core = stack.app.core
    assert core is not None
    if core.dataset.row_count(stack.model) == 0:
        await stack.send_traffic(50)
    victim = str(core.dataset.load(stack.model).entity_ids[0])
    await stack.producer.publish(
        stack.topics.topic("erased"), EntityErased(entity_id=victim, reason="test")
    )

    async def gone() -> bool:
        if victim in set(core.dataset.load(stack.model).entity_ids.tolist()):
            return False
        files = core.dataset.examples_dir.rglob("*.parquet")
        return all(
            victim not in pq.read_table(p, columns=["entity_id"]).column(0).to_pylist()
            for p in files
        )

    await eventually(gone, timeout=30)
    assert victim in core.dataset.erased()

    from aiokafka import AIOKafkaProducer

    raw = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka.bootstrap_servers)
    await raw.start()
    try:
        await raw.send_and_wait(stack.topics.examples, b"not json", key=b"k")
    finally:
        await raw.stop()
    [(_, value, _)] = await read_topic(
        stack.settings.kafka, f"{stack.topics.examples}.dlq", expect=1
    )
    letter = DeadLetter.model_validate_json(value or b"")
    assert letter.value == b"not json" and letter.consumer_group.endswith("-examples")


def _infer(
    client: grpcclient.InferenceServerClient, model: str, version: int, x: np.ndarray
) -> np.ndarray:
    inp = grpcclient.InferInput(model_repo.INPUT_NAME, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(
        model,
        [inp],
        model_version=str(version),
        outputs=[grpcclient.InferRequestedOutput(model_repo.OUTPUT_NAME)],
        client_timeout=30,
    )
    out = result.as_numpy(model_repo.OUTPUT_NAME)
    assert out is not None
    return np.asarray(out, dtype=np.float64).reshape(-1)


async def _ready(value: bool) -> bool:
    return value


async def test_add_examples_takes_labelled_history_once_and_names_bad_fields(
    stack: Stack,
) -> None:
    """Issue 18: a model's bootstrap history comes in through a public door."""
    core = stack.app.core
    assert core is not None
    prefix = uuid.uuid4().hex[:8]

    def examples(ids: range) -> list[trainer_pb2.Example]:
        return [
            trainer_pb2.Example(
                example_id=f"{prefix}-{i}",
                entity_id=f"hist-{i % 7}",
                features={"price": float(i), "discount": 0.1},
                target=float(i % 2),
            )
            for i in ids
        ]

    def imported() -> list[str]:
        frame = core.dataset.load(core.model_name)
        return [p for p in frame.prediction_ids.tolist() if p.startswith(f"example:{prefix}-")]

    reply = await stack.stub.AddExamples(
        trainer_pb2.AddExamplesRequest(examples=examples(range(30))), timeout=30
    )
    assert reply.accepted == 30
    await eventually(lambda: _ready(len(imported()) == 30), timeout=60)
    # The same ids again, with five new ones: each example is in the training set once.
    again = await stack.stub.AddExamples(
        trainer_pb2.AddExamplesRequest(examples=examples(range(35))), timeout=30
    )
    assert again.accepted == 35
    await eventually(lambda: _ready(len(imported()) == 35), timeout=60)
    assert sorted(imported()) == sorted(f"example:{prefix}-{i}" for i in range(35))

    bad = examples(range(3))
    bad[1].target = 2.0  # not a binary target
    cases: list[tuple[trainer_pb2.AddExamplesRequest, grpc.StatusCode, str]] = [
        (
            trainer_pb2.AddExamplesRequest(examples=bad),
            grpc.StatusCode.INVALID_ARGUMENT,
            "examples[1].target",
        ),
        (trainer_pb2.AddExamplesRequest(), grpc.StatusCode.INVALID_ARGUMENT, "examples"),
        (
            trainer_pb2.AddExamplesRequest(
                examples=[
                    trainer_pb2.Example(example_id="x", entity_id="e", categorical={"c": "v"})
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "examples[0].categorical.c",
        ),
        (
            trainer_pb2.AddExamplesRequest(model_name="other", examples=examples(range(1))),
            grpc.StatusCode.NOT_FOUND,
            "model_name",
        ),
    ]
    for request, code, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.AddExamples(request, timeout=10)
        assert caught.value.code() == code, (field, caught.value.details())
        assert (caught.value.details() or "").startswith(f"{field}: "), caught.value.details()
    assert len(imported()) == 35  # nothing of a refused request was written
