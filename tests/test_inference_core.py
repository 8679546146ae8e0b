"""Pure logic of the inference gateway: routing, coalescing, tensor checks, log queue, specs."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from loopmesh.gen.loopmesh.v1 import inference_pb2
from loopmesh.inference.batching import Coalescer
from loopmesh.inference.catalog import BadModelSpec, ModelCatalog, is_store_ref
from loopmesh.inference.core import (
    BackendError,
    Counters,
    FeatureReading,
    ModelFailed,
    PredictInput,
    PredictionRecord,
    Predictor,
    PredictOutput,
)
from loopmesh.inference.prediction_log import PredictionLogger
from loopmesh.inference.routing import Route, RouteTable, bucket
from loopmesh.inference.server import InferenceServicer
from loopmesh.mesh import model_repo
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.errors import InvalidArgument, UnknownModel
from loopmesh.mesh.model_spec import ContextField
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import PREDICTIONS


def route(weight: float, canary: int | None = 2, stable: int | None = 1) -> Route:
    return Route("m", stable, canary, weight, "admin")


def test_bucket_is_stable_and_uniform() -> None:
    assert bucket("m", 2, "alice") == bucket("m", 2, "alice")
    assert bucket("m", 2, "alice") != bucket("m", 3, "alice")  # a new canary, a new cohort
    points = [bucket("m", 2, f"user-{i}") for i in range(20_000)]
    assert all(0.0 <= p < 1.0 for p in points)
    for cut in (0.05, 0.1, 0.5):
        share = sum(p < cut for p in points) / len(points)
        assert abs(share - cut) < 4 * math.sqrt(cut * (1 - cut) / len(points))


def test_route_is_sticky_and_the_canary_cohort_only_grows() -> None:
    keys = [f"k{i}" for i in range(2000)]
    small = {k for k in keys if route(0.05).choose(k) == (2, "canary")}
    large = {k for k in keys if route(0.25).choose(k) == (2, "canary")}
    assert small and small < large
    assert all(route(0.25).choose(k) == route(0.25).choose(k) for k in keys[:100])
    assert route(0.0).choose("x") == (1, "stable")
    assert route(1.0).choose("x") == (2, "canary")
    assert route(0.5, stable=None).choose("x") == (2, "canary")
    assert route(0.0, canary=None).choose("x") == (1, "stable")
    assert route(0.0, canary=None, stable=None).choose("x") is None


async def test_lone_calls_go_at_once_and_concurrent_ones_coalesce() -> None:
    sizes: list[int] = []

    async def flush(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        await asyncio.sleep(0.01)
        return [i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(flush, max_size=16, max_delay_s=0.5, max_inflight=1)
    started = time.monotonic()
    assert await coalescer.submit(1) == 10
    assert time.monotonic() - started < 0.3  # not held back for max_delay
    results = await asyncio.gather(*(coalescer.submit(i) for i in range(40)))
    assert results == [i * 10 for i in range(40)]
    assert max(sizes) <= 16 and len(sizes) < 41
    assert coalescer.items == 41 and coalescer.batches == len(sizes)


async def test_queued_items_wait_at_most_max_delay() -> None:
    release = asyncio.Event()

    async def flush(items: Sequence[str]) -> list[str]:
        if "slow" in items:
            await release.wait()
        return list(items)

    coalescer: Coalescer[str, str] = Coalescer(flush, max_size=8, max_delay_s=0.02, max_inflight=1)
    slow = asyncio.create_task(coalescer.submit("slow"))
    await asyncio.sleep(0)
    # The only slot is taken; this item must still leave after ~max_delay, not after "slow".
    assert await asyncio.wait_for(coalescer.submit("quick"), timeout=2) == "quick"
    release.set()
    assert await slow == "slow"


async def test_a_failed_batch_fails_every_caller_in_it() -> None:
    async def flush(items: Sequence[int]) -> list[int]:
        await asyncio.sleep(0.005)
        raise RuntimeError("backend down")

    coalescer: Coalescer[int, int] = Coalescer(flush, max_size=8, max_delay_s=0.01, max_inflight=1)
    results = await asyncio.gather(*(coalescer.submit(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert coalescer.inflight == 0


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"entity_id": ""}, "entity_id"),
        ({"entity_id": "a", "context": {"x": float("nan")}}, "context.x"),
        ({"entity_id": "a", "context": {"": 1.0}}, "context."),
        ({"entity_id": "a" * 300}, "entity_id"),
    ],
)
def test_predict_input_errors_name_the_field(values: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        PredictInput.parse(**values)
    assert caught.value.field.startswith(field)


def test_predict_input_trims_and_keeps_context() -> None:
    parsed = PredictInput.parse(entity_id=" bob ", context={"hour": 3})
    assert parsed.entity_id == "bob" and parsed.context == {"hour": 3.0}


async def test_prediction_log_drops_when_full_and_counts() -> None:
    # Never started: nothing drains, so the bounded queue fills.
    logger = PredictionLogger(
        EventProducer(KafkaSettings(), "test"), PREDICTIONS, queue_size=2, batch_size=10
    )
    record = PredictionRecord("p", "m", 1, "e", {"a": 1.0}, 0.5, 1.0, datetime.now(UTC))
    assert [logger.log(record) for _ in range(5)] == [True, True, False, False, False]
    assert logger.dropped == 3 and logger.pending == 2


def test_catalog_reads_specs_and_names_what_is_unknown(tmp_path: Path) -> None:
    model_repo.write_version(
        tmp_path,
        "m",
        1,
        b"not-loaded-here",
        {"feature_names": ["v:a", "b"], "feature_defaults": {"b": 2.0}},
        n_features=2,
    )
    model_repo.write_version(tmp_path, "bare", 1, b"x", {}, n_features=1)
    catalog = ModelCatalog(tmp_path, defaults={"v:a": 0.5, "b": 9.0}, default_value=-1.0)
    spec = catalog.spec("m", 1)
    assert spec.feature_names == ("v:a", "b") and spec.store_refs == ("v:a",)
    assert catalog.default_for(spec, "b") == 2.0  # the model's declaration wins
    assert catalog.default_for(spec, "v:a") == 0.5
    assert catalog.default_for(spec, "other") == -1.0
    assert catalog.latest("m") == 1
    with pytest.raises(UnknownModel) as no_version:
        catalog.spec("m", 2)
    assert no_version.value.field == "model_version"
    with pytest.raises(UnknownModel) as no_model:
        catalog.spec("nope", 1)
    assert no_model.value.field == "model_name"
    with pytest.raises(BadModelSpec, match="feature_names"):
        catalog.spec("bare", 1)
    assert is_store_ref("view:f") and not is_store_ref("f") and not is_store_ref(":f")


def test_catalog_caches_only_models_the_repository_holds(tmp_path: Path) -> None:
    model_repo.write_version(tmp_path, "m", 1, b"x", {"feature_names": ["a"]}, n_features=1)
    catalog = ModelCatalog(tmp_path)
    for i in range(5000):  # names a client made up
        assert catalog.versions(f"nope{i}") == []
    assert catalog.versions("m") == [1]
    assert catalog.cached_models == 1


class _CountingPredictor:
    """Answers at once and counts: how many requests of a stream the server went on to score."""

    def __init__(self, until: int) -> None:
        self.calls = 0
        self.until = until
        self.all_scored = asyncio.Event()

    async def predict(self, request: PredictInput) -> PredictOutput:
        self.calls += 1
        if self.calls >= self.until:
            self.all_scored.set()
        return PredictOutput(
            prediction_id=f"p{self.calls}",
            score=0.5,
            model_name="m",
            model_version=1,
            arm="stable",
            degraded=False,
            defaulted_features=(),
            request_id=request.request_id,
        )


async def test_a_stream_client_that_never_reads_stops_being_read() -> None:
    # Issue 20: slots were released when a prediction was computed, so answers nobody read
    # piled up in the gateway without limit.
    sent = 2_000
    predictor = _CountingPredictor(until=sent)
    window = 8
    servicer = InferenceServicer(
        predictor,  # type: ignore[arg-type]
        RouteTable(),
        Counters(),
        stream_max_inflight=window,
    )

    async def requests() -> AsyncIterator[inference_pb2.PredictRequest]:
        for i in range(sent):
            yield inference_pb2.PredictRequest(entity_id=f"u{i}", request_id=str(i))

    stream = servicer.PredictStream(requests(), None)  # type: ignore[arg-type]
    first = await anext(stream)
    assert first.request_id == "0"
    # The client reads nothing more. Give the server every chance to go on reading: the old
    # code scored all 2,000 within milliseconds.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(predictor.all_scored.wait(), timeout=2.0)
    assert predictor.calls <= window + 1
    # Reading again resumes the stream, and every request gets its answer.
    rest = [answer.request_id async for answer in stream]
    assert sorted([first.request_id, *rest], key=int) == [str(i) for i in range(sent)]
    assert predictor.calls == sent


def _metadata(repo: Path, model: str, version: int, meta: dict[str, object]) -> None:
    """A version's metadata.json alone (the catalog reads nothing else)."""
    path = model_repo.version_dir(repo, model, version)
    path.mkdir(parents=True)
    (path / model_repo.METADATA_FILE).write_text(json.dumps(meta))


COUNTRY = {"name": "country", "kind": "categorical", "buckets": 8}
DEVICE = {"name": "device", "kind": "categorical", "vocabulary": ["ios", "web"]}


def test_catalog_reads_task_categorical_inputs_and_output_width(tmp_path: Path) -> None:
    _metadata(
        tmp_path,
        "mc",
        1,
        {
            "feature_names": ["v:a", "b"],
            "categorical": [COUNTRY, DEVICE],
            "task": "multiclass",
            "classes": 3,
            "n_features": 4,
            "n_outputs": 3,
        },
    )
    _metadata(tmp_path, "old", 1, {"feature_names": ["a"], "n_features": 1})
    _metadata(
        tmp_path, "cats", 1, {"feature_names": [], "categorical": [DEVICE], "task": "regression"}
    )
    catalog = ModelCatalog(tmp_path)
    spec = catalog.spec("mc", 1)
    assert (spec.task, spec.n_outputs, spec.n_inputs) == ("multiclass", 3, 4)
    assert [f.name for f in spec.categorical] == ["country", "device"]
    assert spec.categorical_field("device") is not None and spec.categorical_field("b") is None
    old = catalog.spec("old", 1)
    assert (old.task, old.n_outputs, old.categorical) == ("binary", 1, ())
    only_categorical = catalog.spec("cats", 1)
    assert (only_categorical.n_inputs, only_categorical.task) == (1, "regression")


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({"task": "ranking"}, "task 'ranking'"),
        ({"task": "regression", "n_outputs": 2}, "answers one number"),
        ({"n_outputs": 3}, "answers one number"),
        ({"task": "multiclass", "n_outputs": 3, "classes": 4}, "n_outputs = classes"),
        ({"task": "multiclass", "n_outputs": 1}, "n_outputs = classes"),
        ({"n_outputs": 0}, "n_outputs 0"),
        ({"categorical": [{"name": "c", "kind": "numeric"}]}, "is not categorical"),
        ({"categorical": [{"name": "c", "kind": "categorical"}]}, "categorical[0]"),
        ({"categorical": [COUNTRY, COUNTRY]}, "repeats the name 'country'"),
        ({"categorical": {"country": 8}}, "must be a list"),
        ({"categorical": [COUNTRY], "n_features": 1}, "1 categorical inputs but n_features=1"),
        ({"feature_names": []}, "declares no inputs"),
    ],
)
def test_catalog_refuses_metadata_that_cannot_drive_predict(
    tmp_path: Path, meta: dict[str, object], reason: str
) -> None:
    _metadata(tmp_path, "m", 1, {"feature_names": ["a"], **meta})
    with pytest.raises(BadModelSpec) as caught:
        ModelCatalog(tmp_path).spec("m", 1)
    assert reason in str(caught.value)


class _Backend:
    """Answers ``outputs`` for every row of every version but ``broken``; records the rows."""

    def __init__(self, outputs: list[float], broken: int | None = None) -> None:
        self.outputs = outputs
        self.broken = broken
        self.rows: list[tuple[int, list[float]]] = []

    async def score_rows(
        self, model_name: str, version: int, rows: Sequence[Sequence[float]]
    ) -> list[list[float]]:
        if version == self.broken:
            raise BackendError("canary down", unavailable=True)
        self.rows.extend((version, list(row)) for row in rows)
        return [list(self.outputs) for _ in rows]

    async def ready_versions(self, model_name: str) -> list[int]:
        return []


class _NoFeatures:
    async def fetch(self, entity_id: str, refs: tuple[str, ...]) -> dict[str, FeatureReading]:
        return {}


class _Sink:
    def __init__(self) -> None:
        self.records: list[PredictionRecord] = []

    def log(self, record: PredictionRecord) -> bool:
        self.records.append(record)
        return True


def _predictor(repo: Path, backend: _Backend, sink: _Sink, routes: RouteTable) -> Predictor:
    return Predictor(
        catalog=ModelCatalog(repo),
        routes=routes,
        features=_NoFeatures(),
        backend=backend,
        sink=sink,
        default_model="m",
        batch_max_delay_s=0.0,
    )


async def test_predict_encodes_categorical_inputs_and_answers_by_task(tmp_path: Path) -> None:
    _metadata(
        tmp_path,
        "m",
        1,
        {
            "feature_names": ["a"],
            "categorical": [COUNTRY, DEVICE],
            "task": "multiclass",
            "classes": 3,
            "n_outputs": 3,
        },
    )
    backend, sink = _Backend([0.2, 0.5, 0.3]), _Sink()
    predictor = _predictor(tmp_path, backend, sink, RouteTable())
    request = PredictInput.parse(
        entity_id="e", context={"a": 2.0}, categorical={"device": "web"}, model_version="1"
    )
    out = await predictor.predict(request)
    assert (out.task, out.probabilities, out.predicted_class, out.score) == (
        "multiclass",
        (0.2, 0.5, 0.3),
        1,
        0.5,
    )
    country = ContextField.model_validate(COUNTRY)
    # Numeric, then country (not sent: the empty value's bucket), then device (web: row 2).
    assert backend.rows == [(1, [2.0, float(country.index("")), 2.0])]
    [record] = sink.records
    assert (record.task, record.outputs, record.categorical) == (
        "multiclass",
        (0.2, 0.5, 0.3),
        {"device": "web"},
    )
    with pytest.raises(InvalidArgument) as unknown:
        await predictor.predict(request.model_copy(update={"categorical": {"os": "ios"}}))
    assert unknown.value.field == "categorical.os"
    assert len(backend.rows) == 1  # refused before anything was scored


async def test_an_output_width_other_than_the_metadatas_is_a_model_failure(
    tmp_path: Path,
) -> None:
    _metadata(tmp_path, "m", 1, {"feature_names": ["a"], "task": "multiclass", "n_outputs": 3})
    _metadata(tmp_path, "m", 2, {"feature_names": ["a"], "task": "regression"})
    sink = _Sink()
    request = PredictInput.parse(entity_id="e", model_version="1")
    for version, outputs in ((1, [0.5, 0.5]), (2, [1.0, 2.0]), (2, [math.nan])):
        predictor = _predictor(tmp_path, _Backend(outputs), sink, RouteTable())
        pinned = request.model_copy(update={"model_version": str(version)})
        with pytest.raises(ModelFailed) as caught:
            await predictor.predict(pinned)
        assert caught.value.status == grpc.StatusCode.INTERNAL
        if outputs[0] == outputs[0]:  # not NaN
            assert f"{len(outputs)} outputs per row" in str(caught.value)
            assert "n_outputs=" in str(caught.value)
        else:
            assert "non-finite" in str(caught.value)
        await predictor.close()
    assert sink.records == []


async def test_a_fallback_to_stable_leaves_out_the_canarys_own_categorical_inputs(
    tmp_path: Path,
) -> None:
    _metadata(tmp_path, "m", 1, {"feature_names": ["a"]})
    _metadata(tmp_path, "m", 2, {"feature_names": ["a"], "categorical": [DEVICE]})
    routes = RouteTable()
    routes.set(route(1.0))
    backend, sink = _Backend([0.25], broken=2), _Sink()
    predictor = _predictor(tmp_path, backend, sink, routes)
    out = await predictor.predict(
        PredictInput.parse(entity_id="e", context={"a": 1.0}, categorical={"device": "ios"})
    )
    assert (out.model_version, out.arm, out.score, out.task) == (1, "fallback", 0.25, "binary")
    assert backend.rows == [(1, [1.0])]
    assert sink.records[0].categorical == {}
    # Asked of stable directly, the same input is refused: stable declares no "device".
    routes.set(route(0.0))
    with pytest.raises(InvalidArgument) as caught:
        await predictor.predict(PredictInput.parse(entity_id="e", categorical={"device": "ios"}))
    assert caught.value.field == "categorical.device"
