"""Predict by the version's metadata: multiclass and regression models with categorical inputs.

Two models are published as the trainer publishes them (a torch module exported through
``loopmesh.trainer.export``, ``model_repo.write_version`` with ``task``, ``categorical``,
``n_outputs`` and ``classes`` in metadata.json) and loaded into the session's real Triton; a
real gateway on the session's Kafka answers them through ``loopmesh.client``. The answers are
compared with the torch module's outputs on the row the test encodes itself (numeric features,
then one column per categorical input: a blake2b bucket, or a vocabulary's 1..n with 0 for
anything else), and the logged ``PredictionLogged`` records are read back from Kafka.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from loopmesh.client import AsyncClient, ClientConfig, InvalidArgumentError, RetryPolicy
from loopmesh.devstack.triton import TritonServer
from loopmesh.inference.app import InferenceGateway
from loopmesh.mesh import model_repo
from loopmesh.mesh.events import PredictionLogged
from loopmesh.mesh.model_spec import ContextField
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import PREDICTIONS, ROLLOUTS
from loopmesh.trainer.export import export_module
from tests.helpers import eventually, read_topic, unique_topic
from tests.test_inference_support import (
    DEFAULTS,
    FEATURES,
    FixedFeatureService,
    expected_row,
    load,
    publish,
    running,
    settings_for,
)

MULTICLASS = "tasks_mc"
REGRESSION = "tasks_reg"
BINARY = "tasks_bin"  # published as before tasks: no task, categorical or n_outputs
NUMERIC = ["entity_activity:events_24h", "hour"]
BUCKETS = 16
VOCABULARY = ("ios", "android", "web")
CATEGORICAL = [
    ContextField(name="country", kind="categorical", buckets=BUCKETS),
    ContextField(name="device", kind="categorical", vocabulary=VOCABULARY),
]
CLASSES = 3


class Tabular(nn.Module):
    """Numeric columns, then categorical columns holding embedding rows (as floats)."""

    def __init__(self, n_numeric: int, cardinalities: Sequence[int], k: int, task: str) -> None:
        super().__init__()
        self.n_numeric = n_numeric
        self.softmax = task == "multiclass"
        self.embeddings = nn.ModuleList(nn.Embedding(c, 3) for c in cardinalities)
        self.head = nn.Linear(n_numeric + 3 * len(cardinalities), k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, : self.n_numeric]]
        for i, embedding in enumerate(self.embeddings):
            parts.append(embedding(x[:, self.n_numeric + i].long()))
        out: torch.Tensor = self.head(torch.cat(parts, dim=1))
        return torch.softmax(out, dim=1) if self.softmax else out


def bucket_of(value: str) -> int:
    """The hashed encoding, written out here rather than taken from ContextField."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big") % BUCKETS


def vocabulary_row(value: str) -> int:
    return VOCABULARY.index(value) + 1 if value in VOCABULARY else 0


def encoded_row(
    entity_id: str, context: dict[str, float], categorical: dict[str, str]
) -> list[float]:
    return [
        *expected_row(entity_id, context, NUMERIC),
        float(bucket_of(categorical.get("country", ""))),
        float(vocabulary_row(categorical.get("device", ""))),
    ]


def publish_task_model(
    repo: Path, model: str, version: int, task: str, k: int, seed: int
) -> nn.Module:
    """Export and publish one version the way the trainer does; return the torch module."""
    torch.manual_seed(seed)
    module = Tabular(len(NUMERIC), [f.cardinality for f in CATEGORICAL], k, task).eval()
    rng = np.random.default_rng(seed)
    sample = np.column_stack(
        [
            rng.normal(size=(16, len(NUMERIC))),
            rng.integers(0, BUCKETS, size=16),
            rng.integers(0, len(VOCABULARY) + 1, size=16),
        ]
    )
    exported = export_module(module, sample)
    assert exported.n_outputs == k
    metadata: dict[str, Any] = {
        "task": task,
        "feature_names": NUMERIC,
        "categorical": [f.model_dump(exclude_none=True) for f in CATEGORICAL],
        "feature_defaults": DEFAULTS,
    }
    if task == "multiclass":
        metadata["classes"] = k
    model_repo.write_version(
        repo,
        model,
        version,
        exported.onnx,
        metadata,
        n_features=exported.n_features,
        n_outputs=exported.n_outputs,
        weights=exported.weights,
    )
    return module


def torch_outputs(module: nn.Module, row: list[float]) -> list[float]:
    with torch.no_grad():
        out = module(torch.tensor([row], dtype=torch.float32))
    values: list[float] = out.reshape(-1).tolist()
    return values


@pytest.fixture(scope="module")
async def modules(triton: TritonServer, model_repository: Path) -> dict[str, nn.Module]:
    published = {
        MULTICLASS: publish_task_model(model_repository, MULTICLASS, 1, "multiclass", CLASSES, 7),
        REGRESSION: publish_task_model(model_repository, REGRESSION, 1, "regression", 1, 8),
    }
    publish(model_repository, BINARY, [1], FEATURES)
    for name in (MULTICLASS, REGRESSION, BINARY):
        await load(triton.grpc_url, name)
    return published


@pytest.fixture(scope="module")
async def gateway(
    kafka_settings: KafkaSettings,
    triton: TritonServer,
    model_repository: Path,
    fixed_features: tuple[FixedFeatureService, str],
    modules: dict[str, nn.Module],
) -> AsyncIterator[InferenceGateway]:
    settings = settings_for(
        kafka_settings,
        triton.grpc_url,
        model_repository,
        fixed_features[1],
        predictions_topic=unique_topic(PREDICTIONS).name,
        rollouts_topic=unique_topic(ROLLOUTS).name,
    )
    async with running(settings) as gw:
        yield gw


@pytest.fixture
async def client(gateway: InferenceGateway) -> AsyncIterator[AsyncClient]:
    config = ClientConfig(
        inference_url=gateway.address,
        retry=RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5, max_attempts=3),
        deadline_s=30.0,
        tracing=False,
    )
    async with AsyncClient(config) as connected:
        yield connected


async def logged(
    gateway: InferenceGateway, kafka: KafkaSettings, ids: Sequence[str]
) -> dict[str, PredictionLogged]:
    """Every prediction this module's gateway logged so far, by id, once ``ids`` are among
    them (the data plane's records reach the log off the answer's path, drained in batches)."""

    async def with_ids() -> dict[str, PredictionLogged] | None:
        if gateway.logger.pending:
            return None
        records = await read_topic(
            kafka, gateway.predictions_topic.name, expect=gateway.logger.logged
        )
        events = [PredictionLogged.model_validate_json(value or b"") for _, value, _ in records]
        by_id = {event.prediction_id: event for event in events}
        return by_id if set(ids) <= by_id.keys() else None

    by_id = await eventually(with_ids, timeout=30)
    assert gateway.logger.dropped == 0 and gateway.logger.invalid == 0
    return by_id


CASES: list[tuple[str, dict[str, float], dict[str, str]]] = [
    ("alice", {"hour": 7.0}, {"country": "FR", "device": "android"}),
    ("bob", {"hour": 22.0}, {"country": "JP", "device": "smart-fridge"}),  # not in vocabulary
    ("new-carol", {}, {"device": "web"}),  # no country sent: index(""); store has nothing
    ("dave", {"hour": 1.0}, {}),  # no categorical at all
]


async def test_multiclass_answers_every_class_probability_and_the_top_class(
    client: AsyncClient,
    gateway: InferenceGateway,
    modules: dict[str, nn.Module],
    kafka_settings: KafkaSettings,
) -> None:
    answers = []
    for entity_id, context, categorical in CASES:
        answer = await client.predict(
            entity_id, context=context, categorical=categorical, model_name=MULTICLASS
        )
        want = torch_outputs(modules[MULTICLASS], encoded_row(entity_id, context, categorical))
        assert answer.task == "multiclass" and answer.model_version == 1
        assert len(answer.probabilities) == CLASSES
        assert answer.probabilities == pytest.approx(want, abs=1e-5)
        assert sum(answer.probabilities) == pytest.approx(1.0, abs=1e-5)
        assert answer.predicted_class == int(np.argmax(want))
        assert answer.score == pytest.approx(max(want), abs=1e-5)
        assert answer.score == answer.probabilities[answer.predicted_class]
        answers.append(answer)
    # The encodings differ across the cases, and so do the answers.
    assert len({a.probabilities for a in answers}) == len(CASES)

    by_id = await logged(gateway, kafka_settings, [a.prediction_id for a in answers])
    for answer, (entity_id, _, categorical) in zip(answers, CASES, strict=True):
        event = by_id[answer.prediction_id]
        assert (event.model_name, event.model_version, event.task) == (MULTICLASS, 1, "multiclass")
        assert event.entity_id == entity_id
        assert event.categorical == categorical
        assert event.outputs == pytest.approx(list(answer.probabilities))
        assert event.score == pytest.approx(answer.score)
        assert list(event.features) == NUMERIC


async def test_regression_answers_the_value(
    client: AsyncClient,
    gateway: InferenceGateway,
    modules: dict[str, nn.Module],
    kafka_settings: KafkaSettings,
) -> None:
    answers = []
    for entity_id, context, categorical in CASES:
        answer = await client.predict(
            entity_id, context=context, categorical=categorical, model_name=REGRESSION
        )
        [want] = torch_outputs(modules[REGRESSION], encoded_row(entity_id, context, categorical))
        assert answer.task == "regression"
        assert answer.score == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert answer.probabilities == () and answer.predicted_class is None
        answers.append(answer)
    assert len({round(a.score, 6) for a in answers}) == len(CASES)

    # The same categorical value always lands on the same row: a repeat answers the same.
    again = await client.predict(
        "alice", context={"hour": 7.0}, categorical=CASES[0][2], model_name=REGRESSION
    )
    assert again.score == pytest.approx(answers[0].score, rel=1e-6, abs=1e-6)

    by_id = await logged(gateway, kafka_settings, [a.prediction_id for a in answers])
    for answer, (_, _, categorical) in zip(answers, CASES, strict=True):
        event = by_id[answer.prediction_id]
        assert (event.task, event.outputs, event.categorical) == ("regression", [], categorical)
        assert event.score == pytest.approx(answer.score)


async def test_a_version_from_before_tasks_answers_as_before(
    client: AsyncClient, gateway: InferenceGateway, kafka_settings: KafkaSettings
) -> None:
    answer = await client.predict("alice", context={"hour": 7.0}, model_name=BINARY)
    assert answer.task == "binary" and 0.0 < answer.score < 1.0
    assert answer.probabilities == () and answer.predicted_class is None
    event = (await logged(gateway, kafka_settings, [answer.prediction_id]))[answer.prediction_id]
    assert (event.task, event.outputs, event.categorical) == ("binary", [], {})


@pytest.mark.parametrize(
    ("model", "categorical", "field", "reason"),
    [
        (MULTICLASS, {"colour": "red"}, "categorical.colour", "no categorical input 'colour'"),
        (REGRESSION, {"country": "x" * 257}, "categorical.country", "at most 256"),
        (REGRESSION, {"device": "ios", "Country": "FR"}, "categorical.Country", "'Country'"),
        (BINARY, {"country": "FR"}, "categorical.country", "declares none"),
    ],
)
async def test_bad_categorical_inputs_are_refused_naming_the_field(
    client: AsyncClient, model: str, categorical: dict[str, str], field: str, reason: str
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await client.predict("alice", categorical=categorical, model_name=model)
    assert caught.value.field == field, caught.value
    assert reason in str(caught.value), caught.value
    assert caught.value.attempts == 1


async def test_a_value_of_256_characters_is_taken(
    client: AsyncClient, modules: dict[str, nn.Module]
) -> None:
    categorical = {"country": "y" * 256, "device": "ios"}
    answer = await client.predict(
        "alice", context={"hour": 3.0}, categorical=categorical, model_name=REGRESSION
    )
    [want] = torch_outputs(modules[REGRESSION], encoded_row("alice", {"hour": 3.0}, categorical))
    assert answer.score == pytest.approx(want, rel=1e-5, abs=1e-5)
