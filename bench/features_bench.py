"""FeatureService.GetOnlineFeatures over gRPC vs Feast's ``get_online_features`` in-process.

One run prepares and applies its own Feast repo (SQLite online store), writes the rows of
100 entities (folded from events by the service's own ``EntityFold``, pushed through
``FeastGateway``), starts the features service in its own process as deployed, without agents:
the Go data plane on the public port (``GetOnlineFeatures`` read from the online store by the
data plane) in front of the Python FeatureService on its loopback port (that setup lives in
``bench/_feature_store.py``, shared with ``inference_bench``). It measures sequential calls for
1 and 100 entities, every feature of both views:

- direct:  ``FeatureStore.get_online_features`` in this process (the baseline)
- gRPC:    ``GetOnlineFeatures`` on the public port, from ``loopmesh-callbench`` (a lean Go
           client in its own process, raw bytes, one call at a time): the service's own
           latency, loopback TCP included, without a Python client's (the targets are
           checked on this one)
- py-aio:  the same port from this process's grpc.aio client (what a Python caller such as
           the inference gateway sees: its client costs a few hundred microseconds a call)
- python:  the Python FeatureService on its loopback port (the path before the data plane),
           from the same grpc.aio client, for comparison with py-aio

Rounds of every path are interleaved so machine load hits them alike; the table shows p50
and p99 of each and the ratios to direct. Targets (issue 17): gRPC p99 at most 2x direct at
1 entity and 1.3x at 100 entities.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from bench._feature_store import block_torch, feature_service
from loopmesh.gen.loopmesh.v1 import features_pb2, features_pb2_grpc

SIZES = (1, 100)
CALLS = {
    1: int(os.environ.get("BENCH_CALLS_1", "600")),
    100: int(os.environ.get("BENCH_CALLS_100", "200")),
}
ROUNDS = 3
TARGET_P99 = {1: 2.0, 100: 1.3}
"""Most gRPC p99 / direct p99 (issue 17)."""
console = Console()


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


class CallBench:
    """Sequential calls from ``loopmesh-callbench`` (dataplane/cmd/loopmesh-callbench, built
    here with ``go build``): a Go client that sends and receives raw bytes, so its own cost is
    tens of microseconds. ghz was tried first: it decodes every answer into a dynamic message,
    which took milliseconds at 100 entities, more than the server."""

    def __init__(self, root: Path, address: str) -> None:
        self.binary = Path(".loopmesh/bin/loopmesh-callbench").resolve()
        with console.status("building loopmesh-callbench (go build)"):
            subprocess.run(
                ["go", "build", "-o", str(self.binary), "./cmd/loopmesh-callbench"],
                cwd=Path(__file__).resolve().parent.parent / "dataplane",
                check=True,
            )
        self.address = address
        self.root = root

    def run(self, request: bytes, calls: int, warmup: int = 10) -> list[float]:
        body = self.root / f"request-{len(request)}.bin"
        body.write_bytes(request)
        command = [
            str(self.binary),
            "-target",
            self.address,
            "-method",
            "/loopmesh.v1.FeatureService/GetOnlineFeatures",
            "-request",
            str(body),
            "-calls",
            str(calls),
            "-warmup",
            str(warmup),
        ]
        done = subprocess.run(command, capture_output=True, check=False, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"loopmesh-callbench failed: {done.stderr.decode()[-2000:]}")
        report = json.loads(done.stdout)
        if report["errors"]:
            raise RuntimeError(f"{report['errors']} calls failed: {report['first_error']}")
        return [float(x) for x in report["latencies_ms"]]


PATHS = ("direct", "gRPC", "py-aio", "python")


async def _measure_size(
    stubs: dict[str, Any],
    client: CallBench,
    store: Any,
    refs: list[str],
    entities: list[str],
    calls: int,
) -> dict[str, list[float]]:
    request = features_pb2.GetOnlineFeaturesRequest(entity_ids=entities, feature_refs=refs)
    rows = [{"entity_id": e} for e in entities]

    def over(stub: Any) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            reply = await stub.GetOnlineFeatures(request, timeout=10)
            assert len(reply.entities) == len(entities)

        return call

    async def direct_call() -> None:
        store.get_online_features(features=refs, entity_rows=rows)

    timed = {
        "direct": direct_call,
        "py-aio": over(stubs["py-aio"]),
        "python": over(stubs["python"]),
    }
    for call in timed.values():  # warm-up: connections, caches
        await _time(call, 20)
    out: dict[str, list[float]] = {path: [] for path in PATHS}
    per_round = calls // ROUNDS
    for _ in range(ROUNDS):
        for path in PATHS:
            if path == "gRPC":
                out[path].extend(client.run(request.SerializeToString(), per_round))
            else:
                out[path].extend(await _time(timed[path], per_round))
    return out


async def _measure(
    store: Any, refs: list[str], ids: list[str], public: str, backend: str, client: CallBench
) -> dict[int, dict[str, list[float]]]:
    async with (
        grpc.aio.insecure_channel(public) as channel,
        grpc.aio.insecure_channel(backend) as python,
    ):
        stubs = {
            "py-aio": features_pb2_grpc.FeatureServiceStub(channel),
            "python": features_pb2_grpc.FeatureServiceStub(python),
        }
        return {
            size: await _measure_size(stubs, client, store, refs, ids[:size], CALLS[size])
            for size in SIZES
        }


def main() -> None:
    blocked = block_torch()
    try:
        _run()
    finally:
        # `python -m bench` runs every benchmark in this process; the next ones need torch.
        if blocked:
            del sys.modules["torch"]


def _run() -> None:
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="features-bench-") as tmp,
        feature_service(Path(tmp), max(SIZES), console) as service,
    ):
        client = CallBench(Path(tmp), service.address)
        refs = service.refs
        results = asyncio.run(
            _measure(
                service.gateway.store, refs, service.ids, service.address, service.backend, client
            )
        )
    load_after = os.getloadavg()

    table = Table(title=f"GetOnlineFeatures, {len(refs)} features, sequential calls (ms)")
    for column in ("entities", "path", "p50", "p99", "p50 / direct", "p99 / direct"):
        table.add_column(column, justify="right")
    verdicts = []
    for size in SIZES:
        pct = {p: (_pct(results[size][p], 50), _pct(results[size][p], 99)) for p in PATHS}
        d50, d99 = pct["direct"]
        for path in PATHS:
            p50, p99 = pct[path]
            table.add_row(
                str(size),
                path,
                f"{p50:.3f}",
                f"{p99:.3f}",
                "" if path == "direct" else f"{p50 / d50:.2f}x",
                "" if path == "direct" else f"{p99 / d99:.2f}x",
                end_section=path == PATHS[-1],
            )
        ratio, target = pct["gRPC"][1] / d99, TARGET_P99[size]
        verdicts.append(
            f"{size} entit{'y' if size == 1 else 'ies'}: gRPC p99 {ratio:.2f}x direct "
            f"(p50 {pct['gRPC'][0] / d50:.2f}x), target p99 <= {target}x: "
            f"{'met' if ratio <= target else 'NOT met'}"
        )
    console.print(table)
    for verdict in verdicts:
        console.print(verdict)
    counts = ", ".join(f"{len(results[size]['direct'])} at {size}" for size in SIZES)
    console.print(
        f"calls per cell by entities: {counts}; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after, on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
