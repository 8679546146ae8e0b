"""The features data plane (``loopmesh-dataplane`` in features mode) answers exactly what the
Python FeatureService answers.

One stack per online store (SQLite, and the real redis-server): the shop project applied,
rows written by the real ``FeastGateway`` (folded from events by ``EntityFold``, as the agents
do), this process's ``FeatureServicer`` on a loopback port and the data plane in front of it,
exactly as ``FeaturesApp`` wires them. Every request goes to both, as raw bytes with the same
metadata: the data plane's answer (its bytes, or its status code and message) must equal the
Python servicer's, for good requests (PRESENT, STALE, MISSING, duplicates, both join keys) and
bad ones (every INVALID_ARGUMENT, undecodable bytes, missing tokens and roles).
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loopmesh.devstack.process import free_port
from loopmesh.devstack.redis import RedisServer
from loopmesh.features.dataplane import FeaturesDataPlane, features_config
from loopmesh.features.settings import DataPlaneScope, FeaturesScope, FeaturesSettings
from loopmesh.gen.loopmesh.v1 import features_pb2
from loopmesh.mesh.auth import AuthSettings, TokenSpec, bearer
from loopmesh.mesh.events import EntityErased, InteractionEvent
from loopmesh.mesh.feature_repo import apply_repo, prepare_repo
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.mesh.settings import GrpcServerSettings
from tests.support.certs import make_pki

pytestmark = pytest.mark.integration
PROJECT = Path(__file__).parent / "projects" / "shop"
GET = "/loopmesh.v1.FeatureService/GetOnlineFeatures"
APP = "features-app-token-0123"
OPS = "operator-token-0123456"
TOKENS = [
    TokenSpec(name="app", token=APP, roles=["features"]),
    TokenSpec(name="ops", token=OPS, roles=["operator"]),
]
MAX_ENTITIES = 20
Answer = tuple[grpc.StatusCode, str, bytes | None]


@dataclass
class Stack:
    store: str
    settings: FeaturesSettings
    gateway: Any
    python: str  # the Python servicer, on loopback
    plane: FeaturesDataPlane
    erased: list[EntityErased]


def _events(entity: str, item: str, end: datetime, n: int = 4) -> list[InteractionEvent]:
    kinds = ["view", "purchase", "click", "purchase"]
    return [
        InteractionEvent(
            entity_id=entity,
            event_type=kinds[i % len(kinds)],
            event_time=end - timedelta(minutes=9 * i),
            numeric={"price": 3.5 + i, "quantity": float(i + 1)},
            categorical={"channel": ["web", "app"][i % 2]},
            entities={"item_id": item},
        )
        for i in range(n)
    ]


def _rows(gateway: Any, join_key: str, value: str, events: list[InteractionEvent]) -> Any:
    from loopmesh.features.core import EntityFold, event_columns

    fold = EntityFold(join_key, value, gateway.definitions.views_of(join_key))
    for event in events:
        fold.apply(event, event_columns(event))
    return fold.rows()


@pytest.fixture(scope="module", params=["sqlite", "redis"])
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    from loopmesh.features.server import METHOD_ROLES, SERVICE_NAME, FeatureServicer
    from loopmesh.features.store import FeastGateway
    from loopmesh.gen.loopmesh.v1 import features_pb2_grpc

    store = request.param
    redis_url = None
    if store == "redis":
        server: RedisServer = request.getfixturevalue("redis")
        redis_url = server.url
    repo = prepare_repo(
        tmp_path_factory.mktemp(f"dataplane-{store}") / "repo",
        project=PROJECT,
        online_store=store,
        redis_url=redis_url,
    )
    apply_repo(repo)
    settings = FeaturesSettings(
        features=FeaturesScope(
            repo_path=repo,
            online_store=store,
            redis_url=redis_url,
            max_entities=MAX_ENTITIES,
            server=GrpcServerSettings(port=0),
            # Drained by the tests alone (the app's default drains every 0.5 s).
            dataplane=DataPlaneScope(metrics_port=free_port(), stats_interval_s=3600),
        ),
        auth=AuthSettings(tokens=TOKENS),
    )
    gateway = FeastGateway.open(settings.features)
    now = datetime.now(UTC)
    rows = [
        _rows(gateway, "entity_id", "fresh", _events("fresh", "sku-1", now)),
        _rows(gateway, "entity_id", "old", _events("old", "sku-2", now - timedelta(days=40))),
        # One event: no stddev, a purchase-only view without purchases.
        _rows(gateway, "entity_id", "lone", _events("lone", "sku-1", now, n=1)),
        _rows(gateway, "entity_id", "doomed", _events("doomed", "sku-1", now)),
        _rows(gateway, "item_id", "sku-1", _events("fresh", "sku-1", now)),
        _rows(gateway, "item_id", "sku-2", _events("old", "sku-2", now - timedelta(days=40))),
    ]
    assert await gateway.write(rows) > 0
    erased: list[EntityErased] = []

    async def publish(event: EntityErased) -> None:
        erased.append(event)

    # Wired as FeaturesApp._serve wires them (without Kafka: erasures are recorded here).
    backend = GrpcServer(
        "features",
        GrpcServerSettings(host="127.0.0.1", port=0),
        auth=settings.auth,
        method_roles=METHOD_ROLES,
    )
    features_pb2_grpc.add_FeatureServiceServicer_to_server(
        FeatureServicer(gateway, publish, max_entities=MAX_ENTITIES), backend.server
    )
    await backend.start([SERVICE_NAME])
    plane = FeaturesDataPlane(settings, gateway)
    try:
        await plane.start(backend.address)
        yield Stack(store, settings, gateway, backend.address, plane, erased)
    finally:
        await plane.stop()
        await backend.stop()
        gateway.close()


async def _raw(address: str, request: bytes, token: str | None = APP) -> Answer:
    metadata = bearer(token) if token else None
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(GET)  # bytes in, bytes out
        try:
            reply = await call(request, metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or "", None
    return grpc.StatusCode.OK, "", reply


async def _both(stack: Stack, request: bytes, token: str | None = APP) -> Answer:
    python = await _raw(stack.python, request, token)
    plane = await _raw(stack.plane.address, request, token)
    assert plane == python, (
        f"{stack.store}: the data plane answered {_shown(plane)}, Python {_shown(python)}"
    )
    return plane


def _shown(answer: Answer) -> str:
    code, details, raw = answer
    if raw is None:
        return f"{code.name} {details!r}"
    return str(features_pb2.GetOnlineFeaturesResponse.FromString(raw))


def _request(ids: list[str], refs: list[str] | None = None, join_key: str = "") -> bytes:
    return features_pb2.GetOnlineFeaturesRequest(
        entity_ids=ids, feature_refs=refs or [], join_key=join_key
    ).SerializeToString()


def _statuses(answer: Answer) -> dict[str, set[int]]:
    assert answer[2] is not None, answer
    reply = features_pb2.GetOnlineFeaturesResponse.FromString(answer[2])
    return {e.entity_id: {v.status for v in e.values} for e in reply.entities}


async def test_reads_answer_what_python_answers(stack: Stack) -> None:
    present, missing, stale = (
        features_pb2.FEATURE_STATUS_PRESENT,
        features_pb2.FEATURE_STATUS_MISSING,
        features_pb2.FEATURE_STATUS_STALE,
    )
    # Every customer feature: present, partly missing (null values with their row's time),
    # stale (older than the 30-day TTL), an unknown entity, duplicates in order.
    answer = await _both(stack, _request(["fresh", "lone", "old", "nobody", "fresh", "old"]))
    statuses = _statuses(answer)
    assert statuses["fresh"] == {present} or statuses["fresh"] == {present, missing}
    assert missing in statuses["lone"]
    assert stale in statuses["old"]
    assert statuses["nobody"] == {missing}
    refs = [
        "customer_purchases:purchases_1h",
        "customer_spend:channel",
        "customer_spend:spend_2h",
        "customer_purchases:purchases_1h",
    ]
    await _both(stack, _request(["lone", "fresh"], refs))
    # The other join key, all its features and some.
    answer = await _both(stack, _request(["sku-1", "sku-2", "sku-3"], join_key="item_id"))
    assert _statuses(answer)["sku-2"] == {stale}
    await _both(stack, _request(["sku-1"], ["item_stats:min_price"], join_key="item_id"))
    await _both(stack, _request(["fresh"], join_key="entity_id"))
    await _both(stack, _request([f"e{i}" for i in range(MAX_ENTITIES)]))


async def test_bad_requests_are_refused_alike(stack: Stack) -> None:
    cases = [
        _request([]),
        _request([f"e{i}" for i in range(MAX_ENTITIES + 1)]),
        _request(["fresh", ""]),
        _request(["fresh", " x"]),
        _request(["x\u3000"]),
        _request(["\x1c"]),
        _request(["x" * 257]),
        _request(["é" * 257]),
        _request(["fresh"], ["customer_spend:nope"]),
        _request(["fresh"], ["nope"]),
        _request(["fresh"], ["it's:\u2028"]),
        _request(["fresh"], ["item_stats:min_price"]),
        _request(["sku-1"], ["customer_spend:channel"], join_key="item_id"),
        _request(["fresh"], join_key="user_id"),
        _request(["fresh"], join_key="x" * 300),
        b"\x0a\x05ab",  # truncated
        b"\x0a\x02\xc3\x28",  # not UTF-8
        b"\x00",  # field number 0
    ]
    for request in cases:
        code, _, _ = await _both(stack, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, request
    # Unknown fields and other wire types are skipped, as protobuf does.
    await _both(stack, _request(["fresh"]) + b"\x20\x01\x0a\x01y")


async def test_tokens_and_roles_are_checked_alike(stack: Stack) -> None:
    request = _request(["fresh"])
    for token in (None, "not-a-known-token-123", OPS):
        code, _, _ = await _both(stack, request, token)
        assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert (await _both(stack, b"\xff", None))[0] == grpc.StatusCode.UNAUTHENTICATED


async def test_other_calls_reach_python_through_the_data_plane(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.plane.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="loopmesh.v1.FeatureService"), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        schema = channel.unary_unary("/loopmesh.v1.FeatureService/GetFeatureSchema")
        assert await schema(b"", metadata=bearer(APP), timeout=5) == await _python_schema(stack)
        delete = channel.unary_unary(
            "/loopmesh.v1.FeatureService/DeleteEntity",
            request_serializer=features_pb2.DeleteEntityRequest.SerializeToString,
            response_deserializer=features_pb2.DeleteEntityResponse.FromString,
        )
        request = features_pb2.DeleteEntityRequest(entity_id="doomed", reason="test")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await delete(request, metadata=bearer(APP), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        reply = await delete(request, metadata=bearer(OPS), timeout=10)
    assert reply.existed and stack.erased[-1].entity_id == "doomed"
    # The data plane reads the store live: the deleted rows are gone for it too.
    answer = await _both(stack, _request(["doomed"]))
    assert _statuses(answer)["doomed"] == {features_pb2.FEATURE_STATUS_MISSING}


async def _python_schema(stack: Stack) -> bytes:
    async with grpc.aio.insecure_channel(stack.python) as channel:
        schema = channel.unary_unary("/loopmesh.v1.FeatureService/GetFeatureSchema")
        reply: bytes = await schema(b"", metadata=bearer(APP), timeout=5)
        return reply


async def test_a_pushed_schema_is_served_and_metrics_count_the_calls(stack: Stack) -> None:
    full = features_config(stack.settings, stack.gateway)
    narrow = {**full, "features": full["features"][:1], "max_entities": 2}
    await stack.plane.push(narrow)
    try:
        code, _, raw = await _raw(stack.plane.address, _request(["fresh"]))
        assert code == grpc.StatusCode.OK and raw is not None
        reply = features_pb2.GetOnlineFeaturesResponse.FromString(raw)
        first = full["features"][0]
        assert list(reply.feature_refs) == [f"{first['view']}:{first['name']}"]
        code, details, _ = await _raw(stack.plane.address, _request(["a", "b", "c"]))
        assert (code, details) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "entity_ids: 3 ids, at most 2 per request",
        )
    finally:
        await stack.plane.push()
    await _both(stack, _request(["fresh"]))
    async with grpc.aio.insecure_channel(stack.plane.address) as channel:  # one proxied call
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert stack.plane.listening is not None and stack.plane.listening.metrics is not None
    url = f"http://{stack.plane.listening.metrics}/metrics"
    text = await asyncio.to_thread(_get, url)
    assert 'loopmesh_dataplane_feature_requests_total{code="OK",method="GetOnlineFeatures"}' in text
    assert 'loopmesh_dataplane_feature_values_total{status="present"}' in text
    assert 'loopmesh_dataplane_proxied_total{code="OK",service="grpc.health.v1.Health"}' in text
    # Its answered calls reach this process's rpc.server.* instruments.
    await _both(stack, _request(["fresh"]))
    assert await stack.plane.drain_calls() >= 1
    assert await stack.plane.drain_calls() == 0


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


# The port's TLS does not depend on the store: one store is enough.
@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
async def test_tls_on_the_public_port(stack: Stack, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    scope = stack.settings.features.model_copy(
        update={
            "server": GrpcServerSettings(
                port=0,
                tls_certfile=pki.server_cert,
                tls_keyfile=pki.server_key,
                tls_client_cafile=pki.ca,
            ),
            "dataplane": DataPlaneScope(),
        }
    )
    settings = stack.settings.model_copy(update={"features": scope})
    plane = FeaturesDataPlane(settings, stack.gateway)
    await plane.start(stack.python)
    try:
        ca = pki.ca.read_bytes()
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=pki.client_key.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(plane.address, with_cert) as channel:
            reply = await channel.unary_unary(GET)(
                _request(["fresh"]), metadata=bearer(APP), timeout=5
            )
        python = await _raw(stack.python, _request(["fresh"]))
        assert python[2] is not None
        want = features_pb2.GetOnlineFeaturesResponse.FromString(python[2])
        assert features_pb2.GetOnlineFeaturesResponse.FromString(reply) == want
        without = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(plane.address, without) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(GET)(_request(["fresh"]), timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await plane.stop()


def test_the_redis_url_reaches_the_data_plane_as_python_uses_it() -> None:
    from loopmesh.features.dataplane import _redis

    assert _redis("h:6380,db=2,ssl=true,username=u,password=p@ss") == {
        "address": "h:6380",
        "db": 2,
        "username": "u",
        "password": "p@ss",
        "tls": True,
    }
    assert _redis("cache:6379")["tls"] is False
    with pytest.raises(Exception, match="ENABLED=false"):
        _redis("a:1,b:2,skip_full_coverage_check=true")
