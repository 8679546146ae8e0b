"""Every service, run as its own process, serves Prometheus metrics with non-zero values after
traffic, and the Grafana dashboard queries only metrics that something really exports.

The doors (ingestion, feedback) get one call each. features, inference, joiner, trainer and
rollout start together once per module (``python -m loopmesh.<name>`` on the session's Kafka,
Triton and Feast repo) and each gets real traffic through its own inputs: events on its
topics, gRPC calls, a model in Triton. Metrics appear after asynchronous work, so every check
polls the endpoint with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loopmesh.devstack.process import free_port, log_tail
from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import (
    features_pb2,
    features_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from loopmesh.joiner.settings import JoinerTopics
from loopmesh.mesh.bus import EventProducer, declare_topics
from loopmesh.mesh.events import FeedbackEvent, InteractionEvent, PredictionLogged
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import ENTITIES_ERASED, EVENTS_RAW, PREDICTIONS, Topic
from loopmesh.rollout.settings import RolloutTopics
from loopmesh.trainer.settings import TopicNames
from tests.test_inference_support import FEATURES, load
from tests.test_inference_support import publish as publish_inference_model
from tests.test_rollout_support import publish_version, unload_models

pytestmark = pytest.mark.e2e  # assembles the mesh: several services on real parts

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "infra/grafana/dashboards/loopmesh.json"
DEADLINE = 90.0
Sample = tuple[str, dict[str, str], float]


# ------------------------------------------------------------------------------ scraping


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _scrape_url(url: str) -> list[Sample]:
    """The samples of a text exposition, named as Prometheus stores them (a client parser
    would rename Triton's counters to ``*_total``)."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    samples: list[Sample] = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is not None:
            labels = dict(_LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def _scrape(port: int) -> dict[str, float]:
    """Totals per sample name (all label sets summed)."""
    totals: dict[str, float] = {}
    for name, _, value in _scrape_url(f"http://127.0.0.1:{port}/metrics"):
        totals[name] = totals.get(name, 0.0) + value
    return totals


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of ``name`` over the samples whose labels include ``labels``."""
    return sum(
        v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items())
    )


async def _poll(port: int, missing: Callable[[list[Sample]], list[str]]) -> list[Sample]:
    """Scrape until ``missing`` finds nothing missing; return that scrape."""
    deadline = time.monotonic() + DEADLINE
    samples: list[Sample] = []
    while time.monotonic() < deadline:
        samples = await asyncio.to_thread(_scrape_url, f"http://127.0.0.1:{port}/metrics")
        if not missing(samples):
            return samples
        await asyncio.sleep(0.5)
    raise AssertionError(f"never: {missing(samples)}; got {sorted({s[0] for s in samples})}")


async def _until(port: int, wanted: dict[str, dict[str, str]], *, minimum: float = 0.0) -> None:
    """Poll until every ``name`` (restricted to its labels) sums to more than ``minimum``."""

    def below(samples: list[Sample]) -> list[str]:
        return [
            f"{n} > {minimum}" for n, ls in wanted.items() if not _value(samples, n, **ls) > minimum
        ]

    await _poll(port, below)


# ----------------------------------------------------------------- the doors (per test)


def _wait_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, "service exited"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise AssertionError("service did not become SERVING")


@pytest.fixture
def door(
    request: pytest.FixtureRequest, kafka_settings: KafkaSettings, tmp_path: Path
) -> Iterator[tuple[int, int]]:
    name = request.param
    grpc_port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        f"LOOPMESH_{name.upper()}__SERVER__PORT": str(grpc_port),
        f"LOOPMESH_{name.upper()}__TOPIC": f"{name}.metrics.{uuid.uuid4().hex[:6]}",
        "LOOPMESH_TELEMETRY__METRICS_PORT": str(metrics_port),
    }
    with (tmp_path / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"loopmesh.{name}"], env=env, stdout=log, stderr=log
        )
    try:
        _wait_serving(grpc_port, proc)
        yield grpc_port, metrics_port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("door", ["ingestion"], indirect=True)
def test_ingestion_exports_metrics(door: tuple[int, int]) -> None:
    grpc_port, metrics_port = door
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        events = [
            ingestion_pb2.InteractionEvent(event_id=uuid.uuid4().hex, entity_id="u", event_type="x")
            for _ in range(5)
        ]
        reply = stub.Ingest(ingestion_pb2.IngestRequest(events=events), timeout=30)
        assert reply.accepted == 5
    metrics = _scrape(metrics_port)
    assert metrics.get("rpc_server_calls_total", 0) >= 1, sorted(metrics)
    assert metrics.get("loopmesh_kafka_produced_total", 0) >= 5, sorted(metrics)


@pytest.mark.parametrize("door", ["feedback"], indirect=True)
def test_feedback_exports_metrics(door: tuple[int, int]) -> None:
    grpc_port, metrics_port = door
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        item = feedback_pb2.Feedback(event_id=uuid.uuid4().hex, prediction_id="p1", label=1)
        stub.Submit(feedback_pb2.SubmitRequest(feedback=item), timeout=30)
    metrics = _scrape(metrics_port)
    assert metrics.get("rpc_server_calls_total", 0) >= 1, sorted(metrics)
    assert metrics.get("loopmesh_kafka_produced_total", 0) >= 1, sorted(metrics)


# ------------------------------------------------- features, inference, trainer, rollout


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    grpc_port: int
    metrics_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    async def wait_serving(self) -> None:
        deadline = time.monotonic() + 150
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited:\n{log_tail(self.log)}")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.3)
        raise AssertionError(f"{self.name} did not become SERVING:\n{log_tail(self.log)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def _launch(name: str, kafka: KafkaSettings, workdir: Path, env: dict[str, str]) -> Proc:
    grpc_port, metrics_port = free_port(), free_port()
    full = {
        **os.environ,
        "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "LOOPMESH_KAFKA__DEFAULT_PARTITIONS": str(kafka.default_partitions),
        "LOOPMESH_TELEMETRY__METRICS_PORT": str(metrics_port),
        f"LOOPMESH_{name.upper()}__SERVER__PORT": str(grpc_port),
        **env,
    }
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"loopmesh.{name}"],
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Proc(name, proc, log, grpc_port, metrics_port)


@dataclass
class Mesh:
    features: Proc
    inference: Proc
    joiner: Proc
    trainer: Proc
    rollout: Proc
    producer: EventProducer
    events: Topic
    trainer_topics: TopicNames
    joiner_topics: JoinerTopics
    rollout_topics: RolloutTopics
    inference_model: str
    trainer_model: str
    rollout_model: str
    repository: Path
    triton: TritonServer


@pytest.fixture(scope="module")
async def mesh(
    kafka_settings: KafkaSettings,
    triton: TritonServer,
    model_repository: Path,
    feast_repo: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Mesh]:
    tag = uuid.uuid4().hex[:8]
    workdir = tmp_path_factory.mktemp("metrics")
    events = Topic(f"{EVENTS_RAW.name}.{tag}", EVENTS_RAW.value_type, EVENTS_RAW.key_field)
    erasures = f"{ENTITIES_ERASED.name}.{tag}"
    # Apart from each other: the trainer's versions must not reach this rollout controller
    # (loading them would cost Triton seconds of CPU for nothing this file checks).
    trainer_topics = TopicNames(**{k: f"{v}.{tag}.t" for k, v in TopicNames().model_dump().items()})
    joiner_topics = JoinerTopics(
        **{k: f"{v}.{tag}.t" for k, v in JoinerTopics().model_dump().items()}
    )
    rollout_topics = RolloutTopics(
        **{k: f"{v}.{tag}.r" for k, v in RolloutTopics().model_dump().items()}
    )
    inference_model, trainer_model, rollout_model = f"mi{tag}", f"mt{tag}", f"mr{tag}"
    # Declared first: a topic auto-created by a producer would have one partition only.
    await declare_topics(
        kafka_settings, [events, Topic(erasures, ENTITIES_ERASED.value_type, "entity_id")]
    )
    await declare_topics(kafka_settings, [*trainer_topics.all(), *joiner_topics.all()])
    infra = {
        "LOOPMESH_TRITON_URL": triton.grpc_url,
        "LOOPMESH_MODEL_REPOSITORY": str(model_repository),
    }
    features = _launch(
        "features",
        kafka_settings,
        workdir,
        {
            "LOOPMESH_FEATURES__REPO_PATH": str(feast_repo),
            "LOOPMESH_FEATURES__APP_ID": f"features-metrics-{tag}",
            "LOOPMESH_FEATURES__EVENTS_TOPIC": events.name,
            "LOOPMESH_FEATURES__ERASURES_TOPIC": erasures,
            "LOOPMESH_FEATURES__LAG_INTERVAL_S": "0.5",
            "LOOPMESH_FEATURES__STREAM__SESSION_TIMEOUT_S": "6",
            "LOOPMESH_FEATURES__STREAM__HEARTBEAT_INTERVAL_S": "1",
            "LOOPMESH_FEATURES__STREAM__REBALANCE_TIMEOUT_S": "10",
        },
    )
    inference = _launch(
        "inference",
        kafka_settings,
        workdir,
        {
            **infra,
            "LOOPMESH_INFERENCE__FEATURES_URL": features.address,
            "LOOPMESH_INFERENCE__FEATURES_TIMEOUT_S": "5",
            "LOOPMESH_INFERENCE__PREDICTIONS_TOPIC": f"{PREDICTIONS.name}.{tag}.gw",
            "LOOPMESH_INFERENCE__ROLLOUTS_TOPIC": f"rollouts.{tag}.gw",
            "LOOPMESH_INFERENCE__DEFAULT_MODEL": inference_model,
            "LOOPMESH_INFERENCE__TRITON_TIMEOUT_S": "10",
        },
    )
    trainer_env = {f"LOOPMESH_TRAINER__TOPICS__{k.upper()}": v for k, v in trainer_topics}
    trainer = _launch(
        "trainer",
        kafka_settings,
        workdir,
        {
            **infra,
            **trainer_env,
            "LOOPMESH_TRAINER__MODEL_NAME": trainer_model,
            "LOOPMESH_TRAINER__DATA_DIR": str(workdir / "trainer"),
            "LOOPMESH_TRAINER__DATASET__FLUSH_ROWS": "20",
            "LOOPMESH_TRAINER__DATASET__FLUSH_SECONDS": "0.2",
            "LOOPMESH_TRAINER__DATASET__MIN_ROWS": "10",
            "LOOPMESH_TRAINER__TRAINING__MAX_EPOCHS": "3",
            # Only the manual run of the test: no automatic trigger can fire.
            "LOOPMESH_TRAINER__TRIGGERS__MIN_NEW_EXAMPLES": "1000000",
            "LOOPMESH_TRAINER__TRIGGERS__DRIFT_MIN_EXAMPLES": "1000000",
        },
    )
    joiner = _launch(
        "joiner",
        kafka_settings,
        workdir,
        {
            **{f"LOOPMESH_JOINER__TOPICS__{k.upper()}": v for k, v in joiner_topics},
            "LOOPMESH_JOINER__APP_ID": f"joiner-metrics-{tag}",
            "LOOPMESH_JOINER__DATA_DIR": str(workdir / "joiner"),
            "LOOPMESH_JOINER__SESSION_TIMEOUT_SECONDS": "6",
            "LOOPMESH_JOINER__HEARTBEAT_INTERVAL_SECONDS": "1",
            "LOOPMESH_JOINER__METRICS_PUBLISH_INTERVAL_SECONDS": "0.3",
        },
    )
    rollout_env = {f"LOOPMESH_ROLLOUT__TOPICS__{k.upper()}": v for k, v in rollout_topics}
    rollout = _launch(
        "rollout",
        kafka_settings,
        workdir,
        {
            **infra,
            **rollout_env,
            "LOOPMESH_ROLLOUT__CONSUMER_GROUP": f"rollout-metrics-{tag}",
            "LOOPMESH_ROLLOUT__TICK_SECONDS": "0.2",
            "LOOPMESH_ROLLOUT__RECONCILE_SECONDS": "1",
        },
    )
    procs = [features, inference, joiner, trainer, rollout]
    producer = EventProducer(kafka_settings, "metrics-test")
    try:
        await producer.start()
        # While the services start: version 1 in Triton, version 2 only on disk (so a
        # pinned request for it fails in Triton, not in the gateway's validation).
        publish_inference_model(model_repository, inference_model, [1], FEATURES)
        await load(triton.grpc_url, inference_model)
        publish_inference_model(model_repository, inference_model, [2], FEATURES)
        await asyncio.gather(*(p.wait_serving() for p in procs))
        yield Mesh(
            features,
            inference,
            joiner,
            trainer,
            rollout,
            producer,
            events,
            trainer_topics,
            joiner_topics,
            rollout_topics,
            inference_model,
            trainer_model,
            rollout_model,
            model_repository,
            triton,
        )
    finally:
        for p in procs:  # all at once: each takes seconds to leave its consumer groups
            if p.proc.poll() is None:
                p.proc.terminate()
        for p in procs:
            p.stop()
        await producer.stop()
        await unload_models(triton.grpc_url, [inference_model, rollout_model])


# -- traffic: once per module, so each test (and the dashboard check) can run alone -------


@pytest.fixture(scope="module")
async def features_traffic(mesh: Mesh) -> list[str]:
    entities = [f"m-{i}" for i in range(3)]
    now = datetime.now(UTC)
    events = [
        InteractionEvent(
            entity_id=entity,
            event_type="view",
            event_time=now - timedelta(minutes=i),
            numeric={"value": float(i)},
        )
        for entity in entities
        for i in range(4)
    ]
    await mesh.producer.publish_many(mesh.events, events)
    await mesh.producer.publish_raw(mesh.events.name, b"not an event", b"m-0", [])
    async with grpc.aio.insecure_channel(mesh.features.address) as channel:
        stub = features_pb2_grpc.FeatureServiceStub(channel)
        request = features_pb2.GetOnlineFeaturesRequest(entity_ids=entities)
        await stub.GetOnlineFeatures(request, timeout=30)
    return entities


@pytest.fixture(scope="module")
async def inference_traffic(mesh: Mesh, features_traffic: list[str]) -> None:
    async with grpc.aio.insecure_channel(mesh.inference.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for entity in features_traffic:
            for version in ("", "1"):
                request = inference_pb2.PredictRequest(entity_id=entity, model_version=version)
                await stub.Predict(request, timeout=60)
        # Version 2 is published but not loaded: Triton refuses it.
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Predict(inference_pb2.PredictRequest(entity_id="m-0", model_version="2"))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
async def trainer_traffic(mesh: Mesh) -> trainer_pb2.TriggerTrainingResponse:
    topics = mesh.joiner_topics
    predictions = [
        PredictionLogged(
            prediction_id=f"mp{i}-{uuid.uuid4().hex[:6]}",
            model_name=mesh.trainer_model,
            model_version=1,
            entity_id=f"e{i}",
            features={"x": float(i % 2), "y": float(i % 5)},
            score=0.8 if i % 2 else 0.2,
        )
        for i in range(40)
    ]
    feedback = [
        FeedbackEvent(prediction_id=p.prediction_id, label=int(p.features["x"]))  # type: ignore[arg-type]
        for p in predictions
    ]
    await mesh.producer.publish_many(topics.topic("predictions"), predictions)
    await mesh.producer.publish_many(topics.topic("feedback"), feedback)
    await mesh.producer.publish_raw(topics.predictions, b"{}", b"broken", [])
    # A run needs the rows on disk: wait for the dataset to hold them all.
    await _until(
        mesh.trainer.metrics_port,
        {"loopmesh_trainer_examples_stored_total": {"model": mesh.trainer_model}},
        minimum=len(predictions) - 1,
    )
    async with grpc.aio.insecure_channel(mesh.trainer.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        request = trainer_pb2.TriggerTrainingRequest(reason="metrics", wait=True)
        reply: trainer_pb2.TriggerTrainingResponse = await stub.TriggerTraining(
            request, timeout=120
        )
    return reply


@pytest.fixture(scope="module")
async def rollout_traffic(mesh: Mesh) -> None:
    published = mesh.rollout_topics.table()[0]
    for version in (1, 2):
        event = publish_version(mesh.repository, mesh.rollout_model, version)
        await mesh.producer.publish(published, event)
    async with grpc.aio.insecure_channel(mesh.rollout.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        request = rollout_pb2.GetRolloutRequest(model_name=mesh.rollout_model)
        deadline = time.monotonic() + DEADLINE
        while True:  # until v1 is stable (NOT_FOUND before that: answered, and counted)
            try:
                await stub.GetRollout(request, timeout=10)
                return
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND, err
                assert time.monotonic() < deadline, "no rollout of v1"
                await asyncio.sleep(0.3)


# ----------------------------------------------------------------------------- the tests


async def test_features_exports_events_writes_dead_letters_and_lag(
    mesh: Mesh, features_traffic: list[str]
) -> None:
    await _until(
        mesh.features.metrics_port,
        {
            "loopmesh_features_events_total": {"outcome": "accepted"},
            "loopmesh_features_online_writes_total": {},
            "loopmesh_kafka_dead_lettered_total": {"topic": mesh.events.name},
            "rpc_server_calls_total": {
                "rpc_method": "/loopmesh.v1.FeatureService/GetOnlineFeatures"
            },
        },
    )
    await _until(
        mesh.features.metrics_port,
        {"loopmesh_features_events_total": {"outcome": "accepted"}},
        minimum=len(features_traffic) * 4 - 1,
    )

    # Lag is measured after each poll once the partitions are assigned and fetched (the
    # high watermark comes with a fetch), so its series appears a moment later: poll.
    def no_lag(samples: list[Sample]) -> list[str]:
        lag = [ls for n, ls, _ in samples if n == "loopmesh_kafka_consumer_lag"]
        seen = any(ls.get("topic") == mesh.events.name for ls in lag)
        return [] if seen else [f"loopmesh_kafka_consumer_lag for {mesh.events.name}"]

    await _poll(mesh.features.metrics_port, no_lag)


async def test_inference_exports_predictions_per_version_and_triton_errors(
    mesh: Mesh, inference_traffic: None
) -> None:
    model = mesh.inference_model
    await _until(
        mesh.inference.metrics_port,
        {
            "loopmesh_inference_predictions_total": {
                "model": model,
                "version": "1",
                "arm": "pinned",
                "degraded": "false",
            },
            "loopmesh_inference_triton_errors_total": {"model": model, "version": "2"},
            "rpc_server_calls_total": {"rpc_grpc_status_code": "UNAVAILABLE"},
            "rpc_server_duration_milliseconds_bucket": {},
            "loopmesh_kafka_produced_total": {},
        },
    )
    samples = _scrape_url(f"http://127.0.0.1:{mesh.inference.metrics_port}/metrics")
    name = "loopmesh_inference_predictions_total"
    # Unpinned requests go to the newest version Triton serves (2 is on disk only).
    assert _value(samples, name, model=model, version="1", arm="latest") == 3
    assert _value(samples, name, model=model, version="1", arm="pinned") == 3
    assert _value(samples, name, model=model, version="2") == 0
    assert _value(samples, name, degraded="true") == 0


async def test_joiner_and_trainer_export_joins_live_metrics_runs_and_examples(
    mesh: Mesh, trainer_traffic: trainer_pb2.TriggerTrainingResponse
) -> None:
    assert trainer_traffic.started
    model = mesh.trainer_model
    per_version = {"model": model, "version": "1"}
    await _until(
        mesh.trainer.metrics_port,
        {
            "loopmesh_trainer_runs_total": {"model": model},
            "loopmesh_trainer_run_duration_seconds_count": {"model": model},
            "loopmesh_trainer_run_duration_seconds_sum": {"model": model},
            "rpc_server_calls_total": {"rpc_method": "/loopmesh.v1.TrainerService/TriggerTraining"},
        },
    )
    samples = _scrape_url(f"http://127.0.0.1:{mesh.trainer.metrics_port}/metrics")
    status = trainer_pb2.RunStatus.Name(trainer_traffic.run.status).removeprefix("RUN_STATUS_")
    assert _value(samples, "loopmesh_trainer_runs_total", status=status.lower()) == 1
    await _until(
        mesh.joiner.metrics_port,
        {
            "loopmesh_joiner_joined_feedback_total": per_version,
            "loopmesh_model_live_log_loss": per_version,
            "loopmesh_model_live_auc": per_version,
            "loopmesh_model_live_accuracy": per_version,
            "loopmesh_model_live_count": per_version,
            "loopmesh_kafka_dead_lettered_total": {"topic": mesh.joiner_topics.predictions},
        },
    )
    # Every pair joins; the live window catches up with the last of them.
    await _until(
        mesh.joiner.metrics_port,
        {
            "loopmesh_joiner_joined_feedback_total": per_version,
            "loopmesh_model_live_count": per_version,
        },
        minimum=39,
    )
    samples = _scrape_url(f"http://127.0.0.1:{mesh.joiner.metrics_port}/metrics")
    assert _value(samples, "loopmesh_model_live_count", **per_version) == 40
    # Scores 0.8 for label 1 and 0.2 for label 0: a perfect ranking.
    assert _value(samples, "loopmesh_model_live_auc", **per_version) == 1.0


async def test_rollout_exports_weights_states_and_changes(
    mesh: Mesh, rollout_traffic: None
) -> None:
    model = mesh.rollout_model
    # v2 goes candidate -> canary at the default policy's first weight, where it waits for
    # joined feedback that never comes.
    await _until(
        mesh.rollout.metrics_port,
        {
            "loopmesh_rollout_weight": {"model": model, "version": "2"},
            "loopmesh_rollout_state": {"model": model, "state": "canary"},
            "loopmesh_rollout_changes_total": {"model": model, "state": "canary"},
        },
    )
    samples = _scrape_url(f"http://127.0.0.1:{mesh.rollout.metrics_port}/metrics")
    assert _value(samples, "loopmesh_rollout_weight", model=model, version="2") == 0.05
    assert _value(samples, "loopmesh_rollout_weight", model=model, version="1") == 0.95
    assert _value(samples, "loopmesh_rollout_state", model=model) == 1
    assert _value(samples, "loopmesh_rollout_step", model=model) == 1
    for state in ("stable", "candidate", "canary"):
        assert _value(samples, "loopmesh_rollout_changes_total", model=model, state=state) == 1
    assert _value(samples, "loopmesh_kafka_consumed_total") >= 2
    assert _value(samples, "rpc_server_calls_total") >= 1


def dashboard_metrics() -> set[str]:
    """Metric names the dashboard's queries read (label matchers and ranges stripped)."""
    dash = json.loads(DASHBOARD.read_text())
    names: set[str] = set()
    words = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    for panel in dash["panels"]:
        for target in panel.get("targets", ()):
            expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", target["expr"])
            expr = re.sub(
                r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr
            )
            for match in re.finditer(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?", expr):
                if match.group(2) is None and match.group(1) not in words:
                    names.add(match.group(1))
    return names


async def test_dashboard_queries_only_exported_metrics(
    mesh: Mesh,
    features_traffic: list[str],
    inference_traffic: None,
    trainer_traffic: trainer_pb2.TriggerTrainingResponse,
    rollout_traffic: None,
) -> None:
    wanted = dashboard_metrics()
    assert {"loopmesh_model_live_log_loss", "loopmesh_rollout_weight"} <= wanted, wanted
    # The broker-side lag (kafka_consumer_group_lag_sum, selected by a __name__ regex) comes
    # from the collector's kafkametrics receiver, which has no stand-in here.
    sources = [
        f"http://127.0.0.1:{p.metrics_port}/metrics"
        for p in (mesh.features, mesh.inference, mesh.joiner, mesh.trainer, mesh.rollout)
    ] + [mesh.triton.metrics_url]
    deadline = time.monotonic() + DEADLINE
    while True:
        found: set[str] = set()
        for url in sources:
            found |= {name for name, _, _ in await asyncio.to_thread(_scrape_url, url)}
        missing = wanted - found
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert not missing, f"the dashboard queries metrics nothing exports: {sorted(missing)}"
