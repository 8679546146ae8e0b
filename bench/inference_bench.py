"""Inference gateway vs direct Triton: requests/s and p50/p99 latency at 1 and 32 clients.

One run starts its own Kafka, tritonserver (a small MLP, one version loaded), a fixed-value
FeatureService (own process) and the gateway (``python -m loopmesh.inference``, own process,
as deployed), then measures with the stock ``tritonclient.grpc.aio`` client:

- direct:            ModelInfer on Triton (the baseline)
- gateway ModelInfer: the same request through the gateway (routed by weights, no version)
- gateway Predict:    entity_id + context -> features from the feature service, Triton, log

Targets (issue 5): gateway ModelInfer throughput >= 0.8x direct and added p50 <= 1 ms.
Everything shares this machine's cores, so the gateway's CPU is taken from Triton and from
the load generator: on a small machine the ratio measures that contention too.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc.aio as aioclient
from rich.console import Console
from rich.table import Table

from loopmesh.devstack.kafka import KafkaBroker
from loopmesh.devstack.process import free_port
from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import (
    common_pb2,
    features_pb2,
    features_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)
from loopmesh.mesh import model_repo

MODEL = "bench"
STORE = [f"entity_activity:f{i}" for i in range(8)]
CONTEXT = ["price", "hour"]
FEATURES = STORE + CONTEXT
DURATION_S = float(os.environ.get("BENCH_DURATION_S", "6"))
"""Measured seconds per cell, split over ROUNDS interleaved rounds."""
ROUNDS = 3
WARMUP_S = 0.3
CONCURRENCY = (1, 32)
console = Console()


# -- the peer services ------------------------------------------------------------------------


class _FixedFeatures(features_pb2_grpc.FeatureServiceServicer):
    async def GetOnlineFeatures(
        self, request: features_pb2.GetOnlineFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.GetOnlineFeaturesResponse:
        response = features_pb2.GetOnlineFeaturesResponse(feature_refs=request.feature_refs)
        for entity_id in request.entity_ids:
            entity = response.entities.add(entity_id=entity_id)
            for i, _ in enumerate(request.feature_refs):
                entity.values.add(
                    value=common_pb2.Value(number=(len(entity_id) + i) / 10.0),
                    status=features_pb2.FEATURE_STATUS_PRESENT,
                )
        return response


def _serve_features(port: int) -> None:
    os.setsid()  # own process group, for the CPU accounting

    async def serve() -> None:
        server = grpc.aio.server()
        features_pb2_grpc.add_FeatureServiceServicer_to_server(_FixedFeatures(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def _model_bytes() -> bytes:
    import torch  # only the setup needs torch

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(len(FEATURES), 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 1),
        torch.nn.Sigmoid(),
    ).eval()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(mlp), buf)
    return buf.getvalue()


# -- measurement ------------------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields() -> list[list[str]]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the parenthesised command name (which may contain spaces).
            out.append(stat.read_text().rsplit(")", 1)[1].split())
        except (OSError, IndexError):
            continue  # the process ended meanwhile
    return out


def _group_cpu_s(pgid: int) -> float:
    """User+system CPU seconds of every live process in process group ``pgid``."""
    return sum((int(f[11]) + int(f[12])) / _TICK for f in _stat_fields() if int(f[2]) == pgid)


@dataclass
class Cell:
    """One (path, clients) cell, accumulated over interleaved rounds."""

    path: str
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    calls: int = 0
    """Completed calls including warm-up (the CPU counters cover those too)."""
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def server_cpu_per_call(self) -> float:
        """CPU seconds per call of everything but the load generator."""
        return sum(v for k, v in self.cpu_s.items() if k != "client") / self.calls

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    def quantile_ms(self, q: int) -> float:
        return statistics.quantiles(self.latencies, n=100)[q - 1] * 1000


async def _load(
    cell: Cell,
    call: Callable[[int], Awaitable[object]],
    seconds: float,
    cpu: dict[str, Callable[[], float]],
) -> None:
    """``cell.clients`` closed-loop callers for a short warm-up, then ``seconds`` measured."""
    before = {name: read() for name, read in cpu.items()}
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + WARMUP_S
    stop_at = measure_from + seconds

    async def client(cid: int) -> None:
        i = cid
        while (now := loop.time()) < stop_at:
            t0 = time.perf_counter()
            try:
                await call(i)
            except Exception as exc:
                cell.errors += 1
                cell.first_error = cell.first_error or f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.01)
                continue
            cell.calls += 1
            if now >= measure_from:
                cell.latencies.append(time.perf_counter() - t0)
            i += cell.clients

    await asyncio.gather(*(client(c) for c in range(cell.clients)))
    cell.seconds += seconds
    for name, read in cpu.items():
        cell.cpu_s[name] = cell.cpu_s.get(name, 0.0) + read() - before[name]
    if len(cell.latencies) < 2:
        raise RuntimeError(f"{cell.path}: {cell.errors} errors, first: {cell.first_error}")


async def _measure(
    triton_url: str, gateway_url: str, cpu: dict[str, Callable[[], float]]
) -> list[Cell]:
    x = np.random.default_rng(0).normal(size=(1, len(FEATURES))).astype(np.float32)
    inp = aioclient.InferInput(model_repo.INPUT_NAME, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    async with (
        aioclient.InferenceServerClient(triton_url) as direct,
        aioclient.InferenceServerClient(gateway_url) as gateway,
        grpc.aio.insecure_channel(gateway_url) as channel,
    ):
        predict = inference_pb2_grpc.InferenceServiceStub(channel)
        await predict.SetRoute(
            inference_pb2.SetRouteRequest(model_name=MODEL, stable_version=1), timeout=10
        )

        async def via_direct(i: int) -> object:
            return await direct.infer(MODEL, [inp], request_id=str(i), client_timeout=10)

        async def via_gateway(i: int) -> object:
            return await gateway.infer(MODEL, [inp], request_id=str(i), client_timeout=10)

        async def via_predict(i: int) -> object:
            request = inference_pb2.PredictRequest(
                model_name=MODEL,
                entity_id=f"user-{i % 5000}",
                context={"price": 9.5, "hour": 13.0},
            )
            return await predict.Predict(request, timeout=10)

        calls = {
            "direct Triton ModelInfer": via_direct,
            "gateway ModelInfer": via_gateway,
            "gateway Predict": via_predict,
        }
        cells = [Cell(path, clients) for clients in CONCURRENCY for path in calls]
        # Interleaved short rounds: drift in machine load hits every path alike.
        for _ in range(ROUNDS):
            for cell in cells:
                await _load(cell, calls[cell.path], DURATION_S / ROUNDS, cpu)
    return cells


def _report(cells: list[Cell]) -> None:
    table = Table(title=f"inference gateway vs direct Triton ({os.cpu_count()} cores)")
    for column in ("path", "clients", "req/s", "p50 ms", "p99 ms", "x direct", "+p50 ms", "err"):
        table.add_column(column, justify="left" if column == "path" else "right")
    base = {c.clients: c for c in cells if c.path.startswith("direct")}
    for c in cells:
        b = base[c.clients]
        table.add_row(
            c.path,
            str(c.clients),
            f"{c.rps:,.0f}",
            f"{c.quantile_ms(50):.2f}",
            f"{c.quantile_ms(99):.2f}",
            f"{c.rps / b.rps:.2f}",
            f"{c.quantile_ms(50) - b.quantile_ms(50):+.2f}",
            str(c.errors),
        )
    console.print(table)
    cpu_table = Table(title="CPU per request (us), all processes on this machine")
    names = list(cells[0].cpu_s)
    for column in ("path", "clients", *names, "servers total", "x direct"):
        cpu_table.add_column(column, justify="left" if column == "path" else "right")
    for c in cells:
        b = base[c.clients]
        cpu_table.add_row(
            c.path,
            str(c.clients),
            *(f"{c.cpu_s[n] / c.calls * 1e6:,.0f}" for n in names),
            f"{c.server_cpu_per_call * 1e6:,.0f}",
            f"{c.server_cpu_per_call / b.server_cpu_per_call:.2f}",
        )
    console.print(cpu_table)
    for c in cells:
        if c.errors:
            console.print(f"[red]{c.path} x{c.clients}: {c.errors} errors, first: {c.first_error}")
    for clients in CONCURRENCY:
        b = base[clients]
        g = next(c for c in cells if c.path == "gateway ModelInfer" and c.clients == clients)
        ratio, added = g.rps / b.rps, g.quantile_ms(50) - b.quantile_ms(50)
        verdict = "met" if ratio >= 0.8 and added <= 1.0 else "NOT met"
        console.print(
            f"{clients:>2} clients: gateway ModelInfer {ratio:.2f}x direct throughput, "
            f"p50 {added:+.2f} ms -> target (>= 0.8x, <= +1 ms) {verdict}"
        )


# -- orchestration ----------------------------------------------------------------------------


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient(url)
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}")
            try:
                if client.is_server_ready(client_timeout=1):
                    return
            except Exception:  # not up yet
                pass
            time.sleep(0.2)
    finally:
        client.close()
    raise RuntimeError(f"gateway at {url} not ready within {timeout:.0f}s")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="loopmesh-bench-") as tmp:
        root = Path(tmp)
        repo = root / "models"
        repo.mkdir()
        model_repo.write_version(
            repo, MODEL, 1, _model_bytes(), {"feature_names": FEATURES}, n_features=len(FEATURES)
        )
        kafka = KafkaBroker(root / "kafka")
        triton = TritonServer(repo, root / "triton")
        features_port, gateway_port = free_port(), free_port()
        features = multiprocessing.get_context("spawn").Process(
            target=_serve_features, args=(features_port,), daemon=True
        )
        gateway: subprocess.Popen[bytes] | None = None
        with console.status("starting Kafka, tritonserver, features and the gateway"):
            kafka.start()
            triton.start()
        try:
            import tritonclient.grpc as grpcclient

            loader = grpcclient.InferenceServerClient(triton.grpc_url)
            loader.load_model(MODEL, client_timeout=120)
            loader.close()
            features.start()
            env = {
                **os.environ,
                "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                "LOOPMESH_TRITON_URL": triton.grpc_url,
                "LOOPMESH_MODEL_REPOSITORY": str(repo),
                "LOOPMESH_INFERENCE__SERVER__PORT": str(gateway_port),
                "LOOPMESH_INFERENCE__FEATURES_URL": f"127.0.0.1:{features_port}",
            }
            log = (root / "gateway.log").open("wb")
            # Own session: its process group is what the CPU accounting reads.
            gateway = subprocess.Popen(
                [sys.executable, "-m", "loopmesh.inference"],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
            gateway_url = f"127.0.0.1:{gateway_port}"
            _wait_ready(gateway_url, gateway)
            console.print(
                f"measuring {DURATION_S:.0f}s per cell in {ROUNDS} interleaved rounds; "
                f"model: MLP {len(FEATURES)}-32-1 (python backend, CPU)"
            )
            gateway_pid, triton_pid, features_pid = gateway.pid, triton.pid, features.pid
            assert triton_pid is not None and features_pid is not None
            cpu = {
                "client": time.process_time,
                "gateway": lambda: _group_cpu_s(gateway_pid),
                "triton": lambda: _group_cpu_s(triton_pid),
                "features": lambda: _group_cpu_s(features_pid),
            }
            _report(asyncio.run(_measure(triton.grpc_url, gateway_url, cpu)))
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(timeout=30)
                for line in (root / "gateway.log").read_text(errors="replace").splitlines():
                    if "stopped:" in line:
                        console.print(f"gateway {line.split('stopped:', 1)[1].strip()}")
            if features.is_alive():
                features.terminate()
            triton.stop()
            kafka.stop()


if __name__ == "__main__":
    main()
