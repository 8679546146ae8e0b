"""Session fixtures: one real Kafka broker, one real tritonserver, one real Feast repo and
one real redis-server.

Each starts once per test run on free loopback ports. Logs go under the session's temporary
directory; on a failed run the path is printed so they can be read.

Tiers (pytest markers): ``e2e`` is declared by the modules that assemble the mesh; every
other test is ``integration`` when it needs a real component (one of ``INFRA_FIXTURES``,
directly or through another fixture) and ``unit`` otherwise. ``make unit`` runs ``-m unit``:
no Kafka, Triton or Feast is started, and a unit test that asked for one would fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loopmesh.devstack.kafka import KafkaBroker
from loopmesh.devstack.redis import RedisServer
from loopmesh.devstack.triton import TritonServer
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.feature_repo import apply_repo, prepare_repo
from loopmesh.mesh.settings import KafkaSettings

if TYPE_CHECKING:
    from tests.test_inference_support import FixedFeatureService

os.environ.setdefault("LOOPMESH_TELEMETRY__SERVICE_NAMESPACE", "loopmesh-tests")

INFRA_FIXTURES = frozenset({"kafka", "triton", "feast_repo", "redis"})
"""Fixtures that start a real component: a test needing any of them is not a unit test."""
TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        needs = INFRA_FIXTURES & set(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.integration if needs else pytest.mark.unit)


def _not_in_unit_tier(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("unit") is not None:
        raise pytest.UsageError(f"{request.node.nodeid} is marked unit but needs infrastructure")


@pytest.fixture(scope="session")
def infra_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("infra")


def _keep_logs_on_failure(request: pytest.FixtureRequest, name: str, log: Path) -> None:
    if request.session.testsfailed and log.exists():
        keep = Path(os.environ.get("LOOPMESH_TEST_LOGS", ".loopmesh/test-logs"))
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, keep / f"{name}.log")
        print(f"\n{name} log kept at {keep / f'{name}.log'}")


@pytest.fixture(scope="session")
def kafka(infra_dir: Path, request: pytest.FixtureRequest) -> Iterator[KafkaBroker]:
    _not_in_unit_tier(request)
    broker = KafkaBroker(infra_dir / "kafka")
    broker.start()
    yield broker
    broker.stop()
    _keep_logs_on_failure(request, "kafka", broker.log_path)


@pytest.fixture(scope="session")
def redis(infra_dir: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A real redis-server (Debian's package): the Redis online store."""
    _not_in_unit_tier(request)
    server = RedisServer(infra_dir / "redis")
    server.start()
    yield server
    server.stop()
    _keep_logs_on_failure(request, "redis", server.log_path)


@pytest.fixture(scope="session")
def kafka_settings(kafka: KafkaBroker) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=kafka.bootstrap_servers, default_partitions=2)


@pytest.fixture(scope="session")
def model_repository(infra_dir: Path) -> Path:
    path = infra_dir / "models"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def triton(
    infra_dir: Path, model_repository: Path, request: pytest.FixtureRequest
) -> Iterator[TritonServer]:
    _not_in_unit_tier(request)
    server = TritonServer(model_repository, infra_dir / "triton")
    server.start()
    yield server
    server.stop()
    _keep_logs_on_failure(request, "triton", server.log_path)


@pytest.fixture(scope="session")
def feast_repo(infra_dir: Path, request: pytest.FixtureRequest) -> Path:
    _not_in_unit_tier(request)
    repo = prepare_repo(infra_dir / "feature_store")
    apply_repo(repo)
    return repo


@pytest.fixture
async def producer(kafka_settings: KafkaSettings) -> AsyncIterator[EventProducer]:
    """An acks=all producer of mesh events on the session's broker."""
    p = EventProducer(kafka_settings, "test")
    await p.start()
    yield p
    await p.stop()


@pytest.fixture(scope="session")
def spans() -> InMemorySpanExporter:
    """Every span this process finishes from first use on (one global provider per process)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture(scope="module")
async def fixed_features() -> AsyncIterator[tuple[FixedFeatureService, str]]:
    """A FeatureService with fixed values per entity (tests.test_inference_support), one per
    module: (the servicer, its address)."""
    from tests.test_inference_support import feature_server  # torch: only where it is used

    async with feature_server() as served:
        yield served
