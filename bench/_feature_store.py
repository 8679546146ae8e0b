"""The features service as deployed, for the benches that read features.

``feature_service`` prepares and applies its own Feast repo (SQLite online store) under a
directory, writes the rows of ``n`` entities (``bench-0`` ...; folded from events by the
service's own ``EntityFold``, pushed through ``FeastGateway``) and starts the features service
in its own process, without agents or Kafka (reads only): the Go data plane on the public port
(``GetOnlineFeatures`` read from the online store by the data plane) in front of the Python
FeatureService on its loopback port.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console

from loopmesh.devstack.process import free_port
from loopmesh.gen.loopmesh.v1 import features_pb2_grpc
from loopmesh.mesh.feature_repo import apply_repo, prepare_repo

ENTITY_PREFIX = "bench-"
"""Entity ``i`` is ``f"{ENTITY_PREFIX}{i}"``."""
NUMERIC_DTYPES = frozenset({"Int32", "Int64", "Float32", "Float64"})


def block_torch() -> bool:
    """Keep feast from importing torch (only for to_tensor), as loopmesh.features.__main__
    does; True when this call put the block in place."""
    if "torch" in sys.modules:
        return False
    sys.modules["torch"] = None  # type: ignore[assignment]
    return True


def scope(repo: Path, port: int = 0) -> Any:
    from loopmesh.features.settings import FeaturesScope
    from loopmesh.mesh.settings import GrpcServerSettings

    return FeaturesScope(repo_path=repo, server=GrpcServerSettings(port=port))


def serve(repo: str, port: int, backend_port: int, own_group: bool = False) -> None:
    """The server process, as deployed without agents or Kafka (reads only): the data plane
    on ``port`` in front of FeatureService on ``backend_port``. ``own_group``: in a session
    and process group of its own (the data plane, its child, joins it), for CPU accounting."""
    if own_group:
        os.setsid()
    block_torch()
    from loopmesh.features.dataplane import FeaturesDataPlane
    from loopmesh.features.server import SERVICE_NAME, FeatureServicer
    from loopmesh.features.settings import DataPlaneScope, FeaturesSettings
    from loopmesh.features.store import FeastGateway
    from loopmesh.mesh.events import EntityErased
    from loopmesh.mesh.rpc import GrpcServer
    from loopmesh.mesh.settings import GrpcServerSettings

    async def refuse(event: EntityErased) -> None:
        raise RuntimeError("the benchmark does not erase")

    async def run() -> None:
        features = scope(Path(repo), port).model_copy(
            update={"dataplane": DataPlaneScope(backend_port=backend_port)}
        )
        settings = FeaturesSettings(features=features)
        store = FeastGateway.open(features)
        server = GrpcServer(
            "features-bench", GrpcServerSettings(host="127.0.0.1", port=backend_port)
        )
        features_pb2_grpc.add_FeatureServiceServicer_to_server(
            FeatureServicer(store, refuse, max_entities=1000), server.server
        )
        await server.start([SERVICE_NAME])
        plane = FeaturesDataPlane(settings, store)
        await plane.start(server.address)
        try:
            await plane.crashed.wait()
        finally:
            await plane.stop()

    asyncio.run(run())


async def serving(address: str, timeout: float = 180.0) -> None:
    """Returns once the FeatureService at ``address`` answers its health check SERVING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="loopmesh.v1.FeatureService"), timeout=2
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError(f"FeatureService at {address} did not come up in {timeout:.0f} s")


def seed(gateway: Any, n: int) -> list[str]:
    """Rows for ``n`` entities, folded from events the way the agents fold them."""
    from loopmesh.features.core import EntityFold, event_columns
    from loopmesh.mesh.events import InteractionEvent

    now = datetime.now(UTC)
    views = gateway.definitions.views_of("entity_id")
    ids, rows = [], []
    for i in range(n):
        fold = EntityFold("entity_id", f"{ENTITY_PREFIX}{i}", views)
        for j in range(5):
            event = InteractionEvent(
                entity_id=fold.value,
                event_type="view",
                event_time=now - timedelta(minutes=j * 7),
                numeric={"value": float(i + j), "amount": 2.0},
                categorical={"category": "c"},
            )
            fold.apply(event, event_columns(event))
        ids.append(fold.value)
        rows.append(fold.rows())
    asyncio.run(gateway.write(rows))
    return ids


@dataclass
class FeatureService:
    """A running features service and what it serves."""

    gateway: Any
    """This process's ``FeastGateway`` on the same repo (its ``store`` is Feast's)."""
    ids: list[str]
    """The entities with rows."""
    refs: list[str]
    """Every servable feature ("view:feature"), in schema order."""
    numeric_refs: list[str]
    """Those of them a model can take (numbers)."""
    address: str
    """The public port: the data plane."""
    backend: str
    """The Python FeatureService behind it."""
    process: BaseProcess

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid


@contextmanager
def feature_service(
    root: Path, entities: int, console: Console, *, own_group: bool = False
) -> Iterator[FeatureService]:
    """The features service over a Feast repo prepared under ``root``, with rows for
    ``entities`` entities, serving until the block ends (see the module's docstring)."""
    from loopmesh.features.store import FeastGateway

    with console.status("preparing and applying the Feast repo"):
        repo = prepare_repo(root / "repo")
        apply_repo(repo)
    gateway = FeastGateway.open(scope(repo))
    ids = seed(gateway, entities)
    specs = list(gateway.schema.features)
    port, backend_port = free_port(), free_port()
    server = multiprocessing.get_context("spawn").Process(
        target=serve, args=(str(repo), port, backend_port, own_group), daemon=True
    )
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        asyncio.run(serving(address))
        yield FeatureService(
            gateway=gateway,
            ids=ids,
            refs=[spec.ref for spec in specs],
            numeric_refs=[spec.ref for spec in specs if spec.dtype in NUMERIC_DTYPES],
            address=address,
            backend=f"127.0.0.1:{backend_port}",
            process=server,
        )
    finally:
        server.terminate()
        server.join(timeout=20)
        gateway.close()
