"""The control plane's side of Predict in the data plane (issue 19), without the child: the
config's ``predict`` (its Kafka log included), the route table's specs and the stats drain.

The child's admin API is replaced by fakes of ``DataPlane._request`` / the process; what the
data plane itself does with these is tested in Go (``dataplane/``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from loopmesh.inference import instruments
from loopmesh.inference.catalog import ModelCatalog
from loopmesh.inference.core import Counters, PredictionRecord, ShadowAnswer
from loopmesh.inference.dataplane import DataPlane, config_of, spec_of
from loopmesh.inference.operational import OperationalWindows
from loopmesh.inference.prediction_log import PredictionLogger
from loopmesh.inference.routing import Route, RouteTable
from loopmesh.inference.settings import InferenceSettings
from loopmesh.mesh import model_repo
from loopmesh.mesh.bus import encode, event_headers
from loopmesh.mesh.events import PredictionLogged, ShadowScore
from loopmesh.mesh.topics import PREDICTIONS

pytestmark = pytest.mark.unit

KEY = "k" * 40
TOKEN = "t" * 24
TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE}-b7ad6b7169203331-01"
COUNTRY = {"name": "country", "kind": "categorical", "buckets": 16}
DEVICE = {"name": "device", "kind": "categorical", "vocabulary": ["ios", "web"]}


class Captured(PredictionLogger):
    """A prediction log never started: what it was handed, and with which context."""

    def __init__(self, queue_size: int = 100) -> None:
        # Never started, so never produces: no Kafka producer needed.
        producer: Any = None
        super().__init__(producer, PREDICTIONS, queue_size=queue_size, batch_size=10)
        self.got: list[tuple[PredictionRecord, otel_context.Context | None]] = []

    def log(self, record: PredictionRecord, context: otel_context.Context | None = None) -> bool:
        self.got.append((record, context))
        return super().log(record, context)


def settings(tmp_path: Path, **inference: Any) -> InferenceSettings:
    return InferenceSettings(model_repository=tmp_path, inference=inference)


def plane(
    tmp_path: Path,
    *,
    routes: RouteTable | None = None,
    counters: Counters | None = None,
    logger: PredictionLogger | None = None,
    **inference: Any,
) -> DataPlane:
    return DataPlane(
        settings(tmp_path, **inference),
        routes=routes or RouteTable(),
        catalog=ModelCatalog(tmp_path, defaults={"v:a": 0.5, "b": 9.0}, default_value=-1.0),
        counters=counters or Counters(),
        logger=logger or Captured(),
        routes_ready=lambda: True,
    )


def answering(answers: dict[str, Any], calls: list[str] | None = None) -> Callable[..., bytes]:
    """A fake ``_request``: the JSON answer by path (without its query)."""

    def request(method: str, path: str, body: bytes) -> bytes:
        if calls is not None:
            calls.append(f"{method} {path}")
        return json.dumps(answers[path.partition("?")[0]]).encode()

    return request


def record(**overrides: Any) -> PredictionRecord:
    fields: dict[str, Any] = {
        "prediction_id": "a" * 32,
        "model_name": "m",
        "model_version": 1,
        "entity_id": "u1",
        "features": {"v:a": 0.5, "b": 3.0},
        "categorical": {"country": "FR"},
        "score": 0.73,
        "latency_ms": 1.9,
        "event_time": datetime(2026, 12, 7, 10, 0, 0, 123456, tzinfo=UTC),
        "shadow": (ShadowAnswer(3, 0.41, ()),),
    }
    fields.update(overrides)
    return PredictionRecord(**fields)


# -- config ------------------------------------------------------------------------------------


def test_predict_config_carries_features_batching_shadows_and_the_log_queue(
    tmp_path: Path,
) -> None:
    config = config_of(
        settings(
            tmp_path,
            default_model="ctr",
            features_url="10.0.0.7:50053",
            features_timeout_s=0.25,
            on_features_unavailable="fail",
            batch_max_size=32,
            batch_max_delay_ms=2.5,
            batch_max_inflight=3,
            shadow_max_inflight=8,
            shadow_timeout_ms=750.0,
            log_queue_size=123,
        ),
        "127.0.0.1:1",
    )
    assert json.loads(json.dumps(config)) == config  # what goes on stdin
    assert config["predict"] == {
        "default_model": "ctr",
        "features": {"address": "10.0.0.7:50053", "timeout_s": 0.25, "tls": None, "token": None},
        "on_features_unavailable": "fail",
        "batch_max_size": 32,
        "batch_max_delay_ms": 2.5,
        "batch_max_inflight": 3,
        "shadow_max_inflight": 8,
        "shadow_timeout_ms": 750.0,
        "log_queue_size": 123,
        "log": {
            "topic": "predictions",
            "brokers": ["127.0.0.1:9092"],
            "client_id": "loopmesh-inference-dataplane",
            "security_protocol": "PLAINTEXT",
            "sasl_mechanism": None,
            "sasl_username": None,
            "sasl_password": None,
            "tls": None,
            "linger_ms": 20.0,
            "request_timeout_ms": 15000,
        },
        "entity_id_key": None,
    }


def test_the_log_config_has_sasl_and_tls_only_when_the_kafka_settings_use_them(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "ca.pem"
    secured = InferenceSettings(
        model_repository=tmp_path,
        kafka={
            "bootstrap_servers": "k1:9093, k2:9093",
            "client_id": "shop",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "mesh",
            "sasl_password": "p" * 20,
            "ssl_cafile": ca,
        },
        inference={"predictions_topic": "shop.predictions", "log_linger_ms": 0.0},
    )
    log = config_of(secured, "127.0.0.1:1")["predict"]["log"]
    assert log["topic"] == "shop.predictions"
    assert log["brokers"] == ["k1:9093", "k2:9093"]
    assert log["client_id"] == "shop-inference-dataplane"
    assert (log["security_protocol"], log["sasl_mechanism"]) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (log["sasl_username"], log["sasl_password"]) == ("mesh", "p" * 20)
    assert log["tls"] == {"ca_file": str(ca), "cert_file": None, "key_file": None}
    assert log["linger_ms"] == 0.0
    # SASL over plaintext: no TLS; SSL alone: no SASL, even with SASL fields set.
    for protocol, sasl, tls in (("SASL_PLAINTEXT", True, False), ("SSL", False, True)):
        kafka = {**secured.kafka.model_dump(), "security_protocol": protocol}
        kafka["sasl_password"] = "p" * 20
        log = config_of(InferenceSettings(model_repository=tmp_path, kafka=kafka), "127.0.0.1:1")[
            "predict"
        ]["log"]
        assert (log["sasl_mechanism"] is not None, log["sasl_password"] is not None) == (sasl, sasl)
        assert (log["tls"] is not None) == tls


def test_predict_config_has_the_token_tls_and_key_only_when_set(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    on = InferenceSettings(
        model_repository=tmp_path,
        auth={"client_token": TOKEN},
        privacy={"pseudonymise_entity_ids": True, "entity_id_key": KEY},
        inference={"features_client": {"tls_cafile": ca, "server_name_override": "features"}},
    )
    predict = config_of(on, "127.0.0.1:1")["predict"]
    assert predict["features"]["token"] == TOKEN
    assert predict["features"]["tls"] == {
        "ca_file": str(ca),
        "cert_file": None,
        "key_file": None,
        "server_name": "features",
    }
    assert predict["entity_id_key"] == KEY
    # A key configured but pseudonymisation off: ids are not mapped, so Go gets no key.
    off = InferenceSettings(
        model_repository=tmp_path,
        privacy={"pseudonymise_entity_ids": False, "entity_id_key": KEY},
        inference={"features_client": {"tls": True}},
    )
    predict = config_of(off, "127.0.0.1:1")["predict"]
    assert predict["entity_id_key"] is None and predict["features"]["token"] is None
    assert predict["features"]["tls"] == {
        "ca_file": None,
        "cert_file": None,
        "key_file": None,
        "server_name": None,
    }


def test_predict_off_leaves_every_predict_to_python(tmp_path: Path) -> None:
    assert InferenceSettings().inference.dataplane.predict is True
    off = settings(tmp_path, dataplane={"predict": False})
    assert config_of(off, "127.0.0.1:1")["predict"] is None


# -- route table -------------------------------------------------------------------------------


def test_table_carries_shadows_and_the_specs_of_every_version_it_may_serve(
    tmp_path: Path,
) -> None:
    model_repo.write_version(
        tmp_path,
        "m",
        1,
        b"x",
        {
            "feature_names": ["v:a", "b", "c"],
            "feature_defaults": {"b": 2.0},
            "categorical": [COUNTRY, DEVICE],
        },
        n_features=5,
    )
    model_repo.write_version(tmp_path, "m", 2, b"x", {}, n_features=5)  # no feature_names
    model_repo.write_version(
        tmp_path,
        "k",
        4,
        b"x",
        {"feature_names": ["p"], "task": "multiclass", "classes": 3},
        n_features=1,
        n_outputs=3,
    )
    routes = RouteTable()
    routes.set(Route("m", 1, 2, 0.1, "admin", shadows=(3,), shadow_share=0.5))
    routes.set(Route("ghost", 1, None, 0.0, "admin"))
    table = plane(tmp_path, routes=routes).table()
    assert json.loads(json.dumps(table)) == table
    m = table["routes"]["m"]
    assert (m["stable"], m["canary"], m["weight"], m["known"]) == (1, 2, 0.1, [1, 2])
    assert (m["shadows"], m["shadow_share"]) == ([3], 0.5)
    assert set(m["specs"]) == {"1", "2", "3"}  # known, plus the shadow not on disk
    assert m["specs"]["1"] == {
        "feature_names": ["v:a", "b", "c"],
        "store_refs": ["v:a"],
        # The model's default, else the gateway's, else default_feature_value.
        "defaults": {"v:a": 0.5, "b": 2.0, "c": -1.0},
        "categorical": [
            {"name": "country", "buckets": 16, "vocabulary": None},
            {"name": "device", "buckets": None, "vocabulary": ["ios", "web"]},
        ],
        "task": "binary",
        "n_outputs": 1,
    }
    assert set(m["specs"]["2"]) == {"error"}
    assert "declares no feature_names" in m["specs"]["2"]["error"]
    assert m["specs"]["3"] == {"error": "model_version: model 'm' has no version 3"}
    k = table["routes"]["k"]  # in the repository, no route
    assert (k["stable"], k["shadows"], k["shadow_share"]) == (None, [], 0.0)
    assert k["specs"]["4"]["task"] == "multiclass" and k["specs"]["4"]["n_outputs"] == 3
    ghost = table["routes"]["ghost"]  # a route to a model the repository lacks
    assert ghost["known"] == [] and ghost["specs"] == {
        "1": {"error": "model_name: unknown model 'ghost'"}
    }


def test_a_version_fixed_on_disk_gets_its_spec_on_the_next_push(tmp_path: Path) -> None:
    catalog = ModelCatalog(tmp_path)
    assert "error" in spec_of(catalog, "m", 1)
    model_repo.write_version(tmp_path, "m", 1, b"x", {"feature_names": ["a"]}, n_features=1)
    assert spec_of(catalog, "m", 1)["feature_names"] == ["a"]  # errors are not cached


# -- stats drain -------------------------------------------------------------------------------


async def test_stats_drain_counts_answers_apart_from_shadow_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for version in (1, 2):
        model_repo.write_version(
            tmp_path, "m", version, b"x", {"feature_names": ["a"]}, n_features=1
        )
    windows = OperationalWindows(60.0)
    counters = Counters(windows=windows)
    recorded: list[tuple[Any, ...]] = []
    monkeypatch.setattr(
        instruments,
        "record_prediction",
        lambda m, v, *, arm, degraded, count: recorded.append(("p", m, v, arm, degraded, count)),
    )
    monkeypatch.setattr(
        instruments,
        "record_shadow",
        lambda m, v, outcome, *, count: recorded.append(("s", m, v, outcome, count)),
    )
    monkeypatch.setattr(
        instruments,
        "record_triton_error",
        lambda m, v, code, *, count: recorded.append(("t", m, v, code, count)),
    )
    target = plane(tmp_path, counters=counters)
    entry = {"model": "m", "latencies_ms": [1.0, 2.0]}
    target._request = answering(  # type: ignore[method-assign]
        {
            "/stats/drain": {
                "versions": [
                    {**entry, "version": 1, "answered": 3, "failed": 1, "shadow": False},
                    {**entry, "version": 2, "answered": 2, "failed": 1, "shadow": True},
                    {**entry, "version": 999, "answered": 5, "failed": 0, "shadow": True},
                ],
                "predictions": [
                    {"model": "m", "version": 1, "arm": "stable", "degraded": True, "count": 4},
                    {"model": "m", "version": 1, "arm": "canary", "degraded": False, "count": 6},
                    {"model": "x", "version": 7, "arm": "pinned", "degraded": True, "count": 1},
                ],
                "shadow_scores": [
                    {"model": "m", "version": 2, "outcome": "scored", "count": 10},
                    {"model": "m", "version": None, "outcome": "shed", "count": 2},
                ],
                "triton_errors": [{"model": "m", "version": 2, "code": "UNAVAILABLE", "count": 1}],
                "log": {"logged": 9, "dropped": 2},
            }
        }
    )
    logger = Captured()
    target._logger = logger
    assert await target.drain_stats() == 7  # 999 is not the repository's: not counted
    # What the data plane produced to Kafka itself, in the log's counts.
    assert (logger.logged, logger.dropped) == (9, 2)
    # The shadow calls are no answers: only the operational window has them.
    assert set(counters.versions) == {("m", 1)}
    assert (counters.versions[("m", 1)].answered, counters.versions[("m", 1)].failures) == (3, 1)
    figures = {(f.model_name, f.model_version): f for f in windows.snapshot()}
    assert set(figures) == {("m", 1), ("m", 2)}
    assert (figures[("m", 2)].count, figures[("m", 2)].error_rate) == (3, pytest.approx(1 / 3))
    assert counters.degraded == 5
    assert recorded == [
        ("p", "m", 1, "stable", True, 4),
        ("p", "m", 1, "canary", False, 6),
        ("p", "x", 7, "pinned", True, 1),  # instrument counts are kept whatever the version
        ("s", "m", 2, "scored", 10),
        ("s", "m", None, "shed", 2),
        ("t", "m", 2, "UNAVAILABLE", 1),
    ]


def test_instruments_add_a_count_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    added: list[tuple[int, dict[str, str]]] = []

    class Counter:
        def add(self, amount: int, attributes: dict[str, str]) -> None:
            added.append((amount, attributes))

    for name in ("_predictions", "_shadow", "_triton_errors"):
        monkeypatch.setattr(instruments, name, Counter())
    instruments.record_prediction("m", 1, arm="stable", degraded=False, count=12)
    instruments.record_shadow("m", None, "shed", count=3)
    instruments.record_triton_error("m", 2, "UNAVAILABLE")
    assert [a for a, _ in added] == [12, 3, 1]
    assert added[1][1] == {"model": "m", "version": "", "outcome": "shed"}


# -- predictions drain -------------------------------------------------------------------------


async def test_the_log_publishes_each_record_under_the_context_it_was_given() -> None:
    published: list[tuple[str, str | None]] = []

    class Producer:
        async def publish_many(self, topic: Any, events: Any, *, contexts: Any) -> None:
            # One publish per batch; each message's headers carry its own record's trace.
            for event, context in zip(events, contexts, strict=True):
                headers = dict(event_headers(event, context))
                trace_id = (
                    headers["traceparent"].decode()[3:35] if "traceparent" in headers else None
                )
                published.append((event.prediction_id, trace_id))

    logger = PredictionLogger(
        Producer(),  # type: ignore[arg-type]
        PREDICTIONS,
        queue_size=10,
        batch_size=10,
        linger_s=0.0,
    )
    logger.start()
    context = TraceContextTextMapPropagator().extract({"traceparent": TRACEPARENT})
    assert logger.log(record(), context)
    assert logger.log(record(prediction_id="d" * 32))  # the current one: none
    await logger.stop()
    assert published == [("a" * 32, TRACE), ("d" * 32, None)]


def test_the_data_planes_event_is_a_prediction_logged() -> None:
    """The data plane writes PredictionLogged itself: its Go test encodes a fixed record into
    this file byte for byte, and here the Pydantic model, the event's one definition, must
    read it as that record and write the same JSON (field for field) back."""
    golden = (
        Path(__file__).parents[1] / "dataplane/internal/predict/testdata/prediction_logged.json"
    ).read_bytes()
    event = PredictionLogged.model_validate_json(golden)
    assert event == PredictionLogged(
        event_id="fedcba9876543210fedcba9876543210",
        event_time=datetime(2026, 12, 7, 13, 15, 23, 123456, tzinfo=UTC),
        prediction_id="0123456789abcdef0123456789abcdef",
        model_name="churn",
        model_version=3,
        entity_id="pseudo-7f",
        features={"hour": 9.0, "price": 12.5, "activity:events_1h": 1e-7},
        categorical={"country": "NL"},
        score=0.8125,
        outputs=[0.1875, 0.8125],
        task="multiclass",
        latency_ms=1.234,
        shadow=[ShadowScore(model_version=4, score=0.75, outputs=[])],
    )
    assert json.loads(encode(event)) == json.loads(golden)
