"""FeatureService.GetOnlineFeatures over gRPC vs Feast's ``get_online_features`` in-process.

One run prepares and applies its own Feast repo (SQLite online store), writes the rows of
100 entities (folded from events by the service's own ``EntityFold``, pushed through
``FeastGateway``), starts FeatureService in its own process (as deployed, without agents),
and measures sequential calls for 1 and 100 entities, every feature of both views:

- direct: ``FeatureStore.get_online_features`` in this process (the baseline)
- gRPC:   ``GetOnlineFeatures`` through the service (validation, Feast read on its thread,
          per-value status, protobuf both ways, loopback TCP)

Rounds of both paths are interleaved so machine load hits them alike; the table shows p50
and p99 of each and the gRPC/direct ratio.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from loopmesh.devstack.process import free_port
from loopmesh.gen.loopmesh.v1 import features_pb2, features_pb2_grpc
from loopmesh.mesh.feature_repo import apply_repo, prepare_repo

SIZES = (1, 100)
CALLS = {
    1: int(os.environ.get("BENCH_CALLS_1", "600")),
    100: int(os.environ.get("BENCH_CALLS_100", "200")),
}
ROUNDS = 3
console = Console()


def _block_torch() -> bool:
    """Keep feast from importing torch (only for to_tensor), as loopmesh.features.__main__
    does; True when this call put the block in place."""
    if "torch" in sys.modules:
        return False
    sys.modules["torch"] = None  # type: ignore[assignment]
    return True


def _scope(repo: Path, port: int = 0) -> Any:
    from loopmesh.features.settings import FeaturesScope
    from loopmesh.mesh.settings import GrpcServerSettings

    return FeaturesScope(repo_path=repo, server=GrpcServerSettings(port=port))


def _serve(repo: str, port: int) -> None:
    """The server process: FeatureService without agents or Kafka (reads only)."""
    _block_torch()
    from loopmesh.features.server import SERVICE_NAME, FeatureServicer
    from loopmesh.features.store import FeastGateway
    from loopmesh.mesh.events import EntityErased
    from loopmesh.mesh.rpc import GrpcServer

    async def refuse(event: EntityErased) -> None:
        raise RuntimeError("the benchmark does not erase")

    async def run() -> None:
        scope = _scope(Path(repo), port)
        store = FeastGateway.open(scope)
        server = GrpcServer("features-bench", scope.server)
        features_pb2_grpc.add_FeatureServiceServicer_to_server(
            FeatureServicer(store, refuse, max_entities=1000), server.server
        )
        await server.start([SERVICE_NAME])
        await server.wait()

    asyncio.run(run())


async def _serving(address: str, timeout: float = 180.0) -> None:
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


def _seed(gateway: Any, n: int) -> list[str]:
    """Rows for ``n`` entities, folded from events the way the agents fold them."""
    from loopmesh.features.core import EntityFold, event_columns
    from loopmesh.mesh.events import InteractionEvent

    now = datetime.now(UTC)
    views = gateway.definitions.views_of("entity_id")
    ids, rows = [], []
    for i in range(n):
        fold = EntityFold("entity_id", f"bench-{i}", views)
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


async def _time(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        out.append((time.perf_counter() - start) * 1000)
    return out


def _pct(samples: list[float], q: float) -> float:
    return (
        statistics.quantiles(samples, n=100, method="inclusive")[q - 1]
        if len(samples) > 1
        else samples[0]
    )


async def _measure_size(
    stub: Any, store: Any, refs: list[str], entities: list[str], calls: int
) -> dict[str, list[float]]:
    request = features_pb2.GetOnlineFeaturesRequest(entity_ids=entities, feature_refs=refs)
    rows = [{"entity_id": e} for e in entities]

    async def grpc_call() -> None:
        reply = await stub.GetOnlineFeatures(request, timeout=10)
        assert len(reply.entities) == len(entities)

    async def direct_call() -> None:
        store.get_online_features(features=refs, entity_rows=rows)

    for call in (grpc_call, direct_call):  # warm-up: connections, caches
        await _time(call, 20)
    out: dict[str, list[float]] = {"direct": [], "gRPC": []}
    for _ in range(ROUNDS):
        out["direct"].extend(await _time(direct_call, calls // ROUNDS))
        out["gRPC"].extend(await _time(grpc_call, calls // ROUNDS))
    return out


async def _measure(
    store: Any, refs: list[str], ids: list[str], address: str
) -> dict[int, dict[str, list[float]]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = features_pb2_grpc.FeatureServiceStub(channel)
        return {
            size: await _measure_size(stub, store, refs, ids[:size], CALLS[size]) for size in SIZES
        }


def main() -> None:
    blocked = _block_torch()
    try:
        _run()
    finally:
        # `python -m bench` runs every benchmark in this process; the next ones need torch.
        if blocked:
            del sys.modules["torch"]


def _run() -> None:
    from loopmesh.features.store import FeastGateway

    with tempfile.TemporaryDirectory(prefix="features-bench-") as tmp:
        with console.status("preparing and applying the Feast repo"):
            repo = prepare_repo(Path(tmp) / "repo")
            apply_repo(repo)
        gateway = FeastGateway.open(_scope(repo))
        ids = _seed(gateway, max(SIZES))
        refs = [spec.ref for spec in gateway.schema.features]
        port = free_port()
        server = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(str(repo), port), daemon=True
        )
        server.start()
        try:
            address = f"127.0.0.1:{port}"
            asyncio.run(_serving(address))
            results = asyncio.run(_measure(gateway.store, refs, ids, address))
        finally:
            server.terminate()
            server.join(timeout=10)
            gateway.close()

    table = Table(title=f"GetOnlineFeatures, {len(refs)} features, sequential calls (ms)")
    for column in (
        "entities",
        "direct p50",
        "direct p99",
        "gRPC p50",
        "gRPC p99",
        "p50 ratio",
        "p99 ratio",
    ):
        table.add_column(column, justify="right")
    for size in SIZES:
        direct, over_grpc = results[size]["direct"], results[size]["gRPC"]
        d50, d99, g50, g99 = (
            _pct(direct, 50),
            _pct(direct, 99),
            _pct(over_grpc, 50),
            _pct(over_grpc, 99),
        )
        table.add_row(
            str(size),
            f"{d50:.2f}",
            f"{d99:.2f}",
            f"{g50:.2f}",
            f"{g99:.2f}",
            f"{g50 / d50:.2f}x",
            f"{g99 / d99:.2f}x",
        )
    console.print(table)
    load = os.getloadavg()
    counts = ", ".join(f"{len(results[size]['direct'])} at {size}" for size in SIZES)
    console.print(
        f"calls per cell by entities: {counts}; "
        f"load average {load[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
