"""Predict served by the Go data plane answers exactly what the Python Predictor answers.

One gateway on the session's Kafka and Triton, with entity ids pseudonymised, serves a model
of two versions and one that declares categorical inputs (one hashed, one a vocabulary). The
same requests go to its public port (the data plane, which serves Predict itself) and to the
control plane's own loopback port (the Python Predictor, which also answers what the data
plane forwards: requests it would refuse, unknown models and versions). Answers must agree
field by field (not the prediction id), errors by code and message; the arms too, since both
planes hash the same sticky key. The data plane's predictions reach the `predictions` topic as
the Python Predictor's do.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from aiokafka.partitioner import DefaultPartitioner
from pydantic import SecretStr

from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import inference_pb2, inference_pb2_grpc
from loopmesh.inference.app import InferenceGateway
from loopmesh.mesh import model_repo
from loopmesh.mesh.events import PredictionLogged
from loopmesh.mesh.model_spec import ContextField
from loopmesh.mesh.privacy import PrivacySettings, pseudonymise
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import PREDICTIONS, ROLLOUTS
from tests.helpers import eventually, from_the_beginning, unique_topic
from tests.test_inference_support import (
    CALL_TIMEOUT,
    DEFAULTS,
    FEATURES,
    FixedFeatureService,
    load,
    onnx_model,
    publish,
    running,
    settings_for,
)

MODEL = "pdplane"
CAT = "pdplane_cat"
KEY = SecretStr("k" * 40)
CATEGORICAL = [
    ContextField(name="country", kind="categorical", buckets=16),
    ContextField(name="device", kind="categorical", vocabulary=("ios", "android", "web")),
]


@pytest.fixture(scope="module")
async def model(triton: TritonServer, model_repository: Path) -> str:
    publish(model_repository, MODEL, [1, 2], FEATURES)
    n = len(FEATURES) + len(CATEGORICAL)
    model_repo.write_version(
        model_repository,
        CAT,
        1,
        onnx_model(3, n_features=n),
        {
            "feature_names": FEATURES,
            "feature_defaults": DEFAULTS,
            "categorical": [f.model_dump() for f in CATEGORICAL],
        },
        n_features=n,
    )
    await load(triton.grpc_url, MODEL)
    await load(triton.grpc_url, CAT)
    return MODEL


@pytest.fixture(scope="module")
async def gateway(
    kafka_settings: KafkaSettings,
    triton: TritonServer,
    model_repository: Path,
    fixed_features: tuple[FixedFeatureService, str],
    model: str,
) -> AsyncIterator[InferenceGateway]:
    settings = settings_for(
        kafka_settings,
        triton.grpc_url,
        model_repository,
        fixed_features[1],
        predictions_topic=unique_topic(PREDICTIONS).name,
        rollouts_topic=unique_topic(ROLLOUTS).name,
        default_model=model,
    )
    settings = settings.model_copy(
        update={"privacy": PrivacySettings(pseudonymise_entity_ids=True, entity_id_key=KEY)}
    )
    async with running(settings) as gw:
        yield gw


@pytest.fixture(scope="module")
async def planes(
    gateway: InferenceGateway,
) -> AsyncIterator[tuple[inference_pb2_grpc.InferenceServiceStub, ...]]:
    """(the data plane's public port, the Python control plane's loopback port)."""
    async with (
        grpc.aio.insecure_channel(gateway.address) as public,
        grpc.aio.insecure_channel(gateway.grpc.address) as python,
    ):
        yield (
            inference_pb2_grpc.InferenceServiceStub(public),
            inference_pb2_grpc.InferenceServiceStub(python),
        )


def _nan() -> float:
    return math.nan


REQUESTS = [
    inference_pb2.PredictRequest(entity_id="u1", request_id="r1"),
    inference_pb2.PredictRequest(entity_id="new-1"),  # nothing stored: every default
    inference_pb2.PredictRequest(
        entity_id="u2", context={"hour": 3.0, "entity_activity:events_24h": 9.0}
    ),
    inference_pb2.PredictRequest(entity_id="u3", model_version="1"),
    inference_pb2.PredictRequest(
        entity_id="u4", model_name=CAT, categorical={"country": "FR", "device": "web"}
    ),
    inference_pb2.PredictRequest(entity_id="u5", model_name=CAT, categorical={"device": "tv"}),
    inference_pb2.PredictRequest(entity_id="u6", model_name=CAT, model_version="1"),
    inference_pb2.PredictRequest(entity_id="  u7 "),  # trimmed there: forwarded, same answer
    inference_pb2.PredictRequest(entity_id="u8", model_name=MODEL),
    # refused, each naming its field
    inference_pb2.PredictRequest(entity_id=""),
    inference_pb2.PredictRequest(entity_id="u", context={"hour": _nan()}),
    inference_pb2.PredictRequest(entity_id="u", model_name=CAT, categorical={"os": "x"}),
    inference_pb2.PredictRequest(entity_id="u", categorical={"country": "FR"}),  # v2 has none
    inference_pb2.PredictRequest(entity_id="u", model_version="0"),
    inference_pb2.PredictRequest(entity_id="u", model_version="99"),
    inference_pb2.PredictRequest(entity_id="u", model_name="nope"),
    inference_pb2.PredictRequest(entity_id="u", model_name="bad name!"),
    inference_pb2.PredictRequest(entity_id="u", request_id="x" * 257),
    inference_pb2.PredictRequest(entity_id="x" * 257),
]


async def _answer(
    stub: inference_pb2_grpc.InferenceServiceStub, request: inference_pb2.PredictRequest
) -> tuple[object, ...]:
    """What must agree: every field but the prediction id, or the error's code and text."""
    try:
        answer = await stub.Predict(request, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as err:
        return ("error", err.code(), err.details())
    assert len(answer.prediction_id) == 32
    answer.prediction_id = ""
    return ("answer", answer.SerializeToString(deterministic=True))


async def _compare(planes: tuple[inference_pb2_grpc.InferenceServiceStub, ...]) -> set[str]:
    public, python = planes
    arms = set()
    for request in REQUESTS:
        go, py = await _answer(public, request), await _answer(python, request)
        assert go == py, f"{request}: data plane {go} vs Python {py}"
        if go[0] == "answer":
            decoded = inference_pb2.PredictResponse.FromString(go[1])  # type: ignore[arg-type]
            arms.add(decoded.arm)
    return arms


async def test_the_data_plane_answers_what_python_answers(
    gateway: InferenceGateway,
    planes: tuple[inference_pb2_grpc.InferenceServiceStub, ...],
) -> None:
    public, _ = planes
    # No rollout known: the newest version Triton has ready.
    assert await _compare(planes) == {"latest", "pinned"}
    # A canary on half the traffic: the same entity lands on the same arm on either plane.
    await public.SetRoute(
        inference_pb2.SetRouteRequest(
            model_name=MODEL, stable_version=2, canary_version=1, canary_weight=0.5
        ),
        timeout=CALL_TIMEOUT,
    )
    assert await _compare(planes) == {"stable", "canary", "pinned", "latest"}


async def test_the_data_plane_serves_and_logs_predict_itself(
    kafka_settings: KafkaSettings,
    gateway: InferenceGateway,
    planes: tuple[inference_pb2_grpc.InferenceServiceStub, ...],
) -> None:
    public, _ = planes
    await public.SetRoute(
        inference_pb2.SetRouteRequest(model_name=CAT, stable_version=1), timeout=CALL_TIMEOUT
    )
    python_before = gateway.predictor.batch_stats()[1]
    plane_before = (await gateway.dataplane.predict_totals())["rows"]
    n = 40
    answers = await asyncio.gather(
        *(
            public.Predict(
                inference_pb2.PredictRequest(
                    entity_id=f"log-{i}",
                    model_name=CAT,
                    categorical={"device": "ios"},
                    context={"hour": i},
                ),
                timeout=CALL_TIMEOUT,
            )
            for i in range(n)
        )
    )
    assert gateway.predictor.batch_stats()[1] == python_before, "Python scored these rows"
    assert (await gateway.dataplane.predict_totals())["rows"] - plane_before == n
    by_id = {a.prediction_id: (i, a) for i, a in enumerate(answers)}
    topic = gateway.predictions_topic.name

    partitions: list[int] = []

    async def logged() -> list[tuple[PredictionLogged, Message]]:
        messages, partitions[:] = await _read_with_partitions(kafka_settings, topic)
        events = [(PredictionLogged.model_validate_json(m.value), m) for m in messages if m.value]
        return [(e, m) for e, m in events if e.prediction_id in by_id]

    logged_events = await eventually(lambda: _all_logged(logged, n), timeout=60)
    assert logged_events is not None
    # The data plane produced these itself: as EventProducer would, keyed by prediction id on
    # the partition aiokafka's murmur2 picks (the joiner meets its feedback there), with the
    # event's id, schema and the Predict's trace in the headers.
    assert len(partitions) > 1  # else any partitioner would do
    for event, message in logged_events:
        assert message.key == event.prediction_id.encode()
        assert message.partition == DefaultPartitioner()(message.key, partitions, partitions)
        headers = dict(message.headers)
        assert headers["event_id"] == event.event_id.encode()
        assert headers["schema"] == b"prediction.v1"
        assert headers["content-type"] == b"application/json"
    assert len({e.event_id for e, _ in logged_events}) == n
    for event, _ in logged_events:
        i, answer = by_id[event.prediction_id]
        assert event.entity_id == pseudonymise(f"log-{i}", KEY)
        assert event.model_name == CAT
        assert event.model_version == answer.model_version == 1
        assert event.score == pytest.approx(answer.score)
        assert event.features["hour"] == float(i)
        assert set(event.features) == set(FEATURES)
        assert event.categorical == {"device": "ios"}
        assert event.task == "binary"
        assert event.latency_ms > 0


async def _all_logged(
    read: Callable[[], Awaitable[list[tuple[PredictionLogged, Message]]]], n: int
) -> list[tuple[PredictionLogged, Message]] | None:
    events = await read()
    return events if len(events) >= n else None


async def _read_with_partitions(
    settings: KafkaSettings, topic: str
) -> tuple[list[Message], list[int]]:
    """Every message of ``topic`` so far, with its partition, and the topic's partitions."""
    consumer = await from_the_beginning(settings, topic)
    try:
        out: list[Message] = []
        while batch := await consumer.getmany(timeout_ms=1000):
            for records in batch.values():
                out.extend(Message(r.partition, r.key, r.value, list(r.headers)) for r in records)
        return out, sorted(consumer.partitions_for_topic(topic) or ())
    finally:
        await consumer.stop()


@dataclass(frozen=True)
class Message:
    partition: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
