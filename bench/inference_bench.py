"""Inference gateway vs direct Triton, driven by ghz: requests/s, p50/p99 at 1, 16 and 64
concurrent calls, and CPU per request of every process.

One run starts its own Kafka, tritonserver (a small MLP, one version loaded), the features
service and the gateway (``python -m loopmesh.inference``, own process, as deployed: the Go
data plane on the public port, the Python control plane behind it), then measures with ghz
(third-party, pinned, built with ``go install``), one concurrency after another, its three
paths taking turns in short slices (see ``ROUNDS``):

- direct Triton ModelInfer:  the baseline
- Go pass-through ModelInfer: the floor of any gRPC-go proxy, the same request through
                             ``loopmesh-passthrough`` (dataplane/cmd: raw bytes to Triton over
                             one connection, the data plane's transport options and process
                             tuning, nothing else): what is left to the data plane is the gap
                             between this row and the next
- gateway ModelInfer:        the same request through the data plane (routed, no version)
- gateway Predict:           entity_id + context -> features, Triton, prediction log

The features service is the real one, as users deploy it (``bench/_feature_store.py``, shared
with ``features_bench``): its own process, the Go features data plane on its public port
reading Feast's SQLite online store, in front of the Python FeatureService, over a Feast repo
of the project's definitions applied here with rows for ``ENTITIES`` entities. The model takes
every numeric feature of that repo ("view:feature") plus two context numbers (``CONTEXT``), and
ghz spreads Predict over those entities, so every feature read hits a real row (checked once
before measuring: an answer that is degraded, or that defaulted a store feature, stops the
run). A Python grpc.aio fake with fixed values stood here before: it measured a service nobody
deploys, at its own cost (~170 us of CPU per Predict at 16 calls); the "features" column of
the CPU table is now the deployed service's.

Targets: gateway ModelInfer >= 0.8x direct throughput at 16 and 64 concurrent calls and
<= +0.5 ms p50 at 1; Predict >= 0.5x direct at 16. Everything shares this machine's cores, so
the gateway's CPU is taken from Triton and from ghz: on a small machine the ratio measures
that contention too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table
from tritonclient.grpc import service_pb2

from bench._feature_store import ENTITY_PREFIX, feature_service
from loopmesh.devstack.kafka import KafkaBroker
from loopmesh.devstack.process import free_port
from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import inference_pb2, inference_pb2_grpc
from loopmesh.mesh import model_repo

MODEL = "bench"
ENTITIES = 1000
"""Entities with rows in the online store; Predict's entity_id cycles through them."""
CONTEXT = ["price", "hour"]
"""Plain names: given in every Predict's context, never read from the store."""
DURATION_S = float(os.environ.get("BENCH_DURATION_S", "5"))
"""Measured seconds per cell."""
ROUNDS = max(1, int(os.environ.get("BENCH_ROUNDS", "5")))
"""Each cell is measured in this many slices of DURATION_S / ROUNDS, the paths of one
concurrency taking turns (their order reversed every other round): load from outside the
bench that comes and goes then weighs on direct Triton and on the gateway alike, instead of
on whichever cell it happened to coincide with. 1: one run per cell."""
WARMUP_S = 1.0
CONCURRENCY = (1, 16, 64)
FLOOR = "Go pass-through ModelInfer"
console = Console(width=150)


# -- the peer services ------------------------------------------------------------------------


def _model_bytes(n_features: int) -> bytes:
    import torch  # only the setup needs torch

    from loopmesh.trainer.export import export_module

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(n_features, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 1),
        torch.nn.Sigmoid(),
    ).eval()
    return export_module(mlp, np.random.default_rng(0).normal(size=(64, n_features))).onnx


# -- measurement ------------------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")
GHZ_VERSION = "v0.120.0"
"""The third-party load generator (github.com/bojand/ghz), built with ``go install``."""


def _processes() -> list[tuple[str, list[str]]]:
    """(command name, fields after it) of every live process."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # the process ended meanwhile
        # The command name is parenthesised and may contain spaces.
        name = text[text.index("(") + 1 : text.rindex(")")]
        out.append((name, text.rsplit(")", 1)[1].split()))
    return out


def _group_cpu_s(pgid: int, *, name: str | None = None, exclude: str | None = None) -> float:
    """User+system CPU seconds of the live processes of group ``pgid`` (optionally only those
    whose command starts with ``name``, or all but those starting with ``exclude``)."""
    total = 0.0
    for comm, f in _processes():
        if int(f[2]) != pgid:
            continue
        if name is not None and not comm.startswith(name):
            continue
        if exclude is not None and comm.startswith(exclude):
            continue
        total += (int(f[11]) + int(f[12])) / _TICK
    return total


def _children_cpu_s() -> float:
    """CPU seconds of this process' finished children (each ghz run, once it exited)."""
    usage = os.times()
    return usage.children_user + usage.children_system


def ghz_binary() -> Path:
    """``ghz`` at the pinned version, built once into ``.loopmesh/bin``."""
    target = Path(".loopmesh/bin").resolve()
    ghz = target / "ghz"
    if not ghz.exists():
        with console.status(f"building ghz {GHZ_VERSION} (go install)"):
            subprocess.run(
                ["go", "install", f"github.com/bojand/ghz/cmd/ghz@{GHZ_VERSION}"],
                env={**os.environ, "GOBIN": str(target)},
                check=True,
            )
    return ghz


def write_protoset(path: Path) -> None:
    """The descriptors ghz needs (Triton's API and ours), from the generated Python modules."""
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import service_pb2

    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def add(descriptor: object) -> None:
        name = descriptor.name  # type: ignore[attr-defined]
        if name in files:
            return
        for dependency in descriptor.dependencies:  # type: ignore[attr-defined]
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        descriptor.CopyToProto(proto)  # type: ignore[attr-defined]
        files[name] = proto

    add(service_pb2.DESCRIPTOR)
    add(inference_pb2.DESCRIPTOR)
    path.write_bytes(
        descriptor_pb2.FileDescriptorSet(file=list(files.values())).SerializeToString()
    )


@dataclass
class Cell:
    """One (path, concurrency) run of ghz."""

    path: str
    clients: int
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    count: int = 0
    seconds: float = 0.0
    """Measured time, all slices together."""
    latencies_ms: list[float] = field(default_factory=list)
    """Of every answered call, all slices together."""
    errors: int = 0
    cut: int = 0
    """Calls in flight when ghz closed its connections at the end of the run."""
    first_error: str = ""
    cpu_s: dict[str, float] = field(default_factory=dict)

    def cpu_us(self, name: str) -> float:
        return self.cpu_s[name] / max(self.count, 1) * 1e6

    @property
    def server_cpu_us(self) -> float:
        """CPU per request of everything but the load generator."""
        return sum(self.cpu_us(n) for n in self.cpu_s if n != "ghz")


@contextmanager
def passthrough(upstream: str) -> Iterator[tuple[str, int]]:
    """``loopmesh-passthrough`` (built here with ``go build``) in front of ``upstream``, in its
    own process group, with the data plane's GOMAXPROCS and GOGC: (its address, its pid)."""
    binary = Path(".loopmesh/bin/loopmesh-passthrough").resolve()
    with console.status("building loopmesh-passthrough (go build)"):
        subprocess.run(
            ["go", "build", "-trimpath", "-o", str(binary), "./cmd/loopmesh-passthrough"],
            cwd=Path(__file__).resolve().parent.parent / "dataplane",
            check=True,
        )
    procs = max(1, (os.cpu_count() or 2) // 2)  # the data plane's own tuneProcs and tuneGC
    proc = subprocess.Popen(
        [str(binary), "-listen", "127.0.0.1:0", "-upstream", upstream],
        env={**os.environ, "GOMAXPROCS": str(procs), "GOGC": "400", "GOMEMLIMIT": "1GiB"},
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().decode().strip()  # its first line, once it listens
        if not address:
            raise RuntimeError(f"loopmesh-passthrough exited with {proc.wait()}")
        yield address, proc.pid
    finally:
        proc.kill()
        proc.wait()


def _ghz(
    ghz: Path,
    protoset: Path,
    target: str,
    call: str,
    data: list[str],
    clients: int,
    *,
    seconds: float = 0.0,
    skip_first: int = 0,
) -> Any:
    seconds = seconds or DURATION_S
    connections = min(clients, 4)
    command = [
        str(ghz),
        "--insecure",
        "--skipFirst",
        str(skip_first),
        "--protoset",
        str(protoset),
        "--call",
        call,
        *data,
        "--concurrency",
        str(clients),
        "--connections",
        str(connections),
        "--duration",
        f"{seconds}s",
        "--timeout",
        "10s",
        "--format",
        "json",
        target,
    ]
    done = subprocess.run(command, capture_output=True, check=False, timeout=seconds + 120)
    if not done.stdout:
        raise RuntimeError(f"ghz failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return json.loads(done.stdout)


def _predict_request(entity_id: str) -> dict[str, Any]:
    return {"model_name": MODEL, "entity_id": entity_id, "context": {"price": 9.5, "hour": 13.0}}


def _check_features(gateway_url: str, store_refs: list[str]) -> None:
    """One Predict through the gateway must have read every store feature: not degraded (the
    features service answered), none of ``store_refs`` defaulted (the entity's row was there);
    else the measurement would not be of what users deploy, and the run stops."""
    from google.protobuf import json_format

    request = json_format.ParseDict(
        _predict_request(f"{ENTITY_PREFIX}{ENTITIES // 2}"), inference_pb2.PredictRequest()
    )
    with grpc.insecure_channel(gateway_url) as channel:
        reply = inference_pb2_grpc.InferenceServiceStub(channel).Predict(request, timeout=10)
    defaulted = sorted(set(reply.defaulted_features) & set(store_refs))
    if reply.degraded or defaulted:
        raise RuntimeError(
            f"Predict did not read its features from the features service (degraded="
            f"{reply.degraded}, defaulted {defaulted or 'none'} of {store_refs}): not measuring"
        )
    console.print(
        f"features check: Predict for {request.entity_id} read all {len(store_refs)} store "
        f"features (not degraded, none defaulted), score {reply.score:.4f}"
    )


def _measure(
    triton_url: str,
    passthrough_url: str,
    gateway_url: str,
    cpu: dict[str, Callable[[], float]],
    root: Path,
    store_refs: list[str],
) -> list[Cell]:
    ghz = ghz_binary()
    protoset = root / "apis.protoset"
    write_protoset(protoset)
    n_features = len(store_refs) + len(CONTEXT)
    x = np.random.default_rng(0).normal(size=(1, n_features)).astype(np.float32)
    infer = service_pb2.ModelInferRequest(model_name=MODEL, id="bench")
    infer.inputs.add(name=model_repo.INPUT_NAME, datatype="FP32", shape=list(x.shape))
    infer.raw_input_contents.append(x.tobytes())
    infer_file = root / "infer.bin"
    infer_file.write_bytes(infer.SerializeToString())
    # Entity ids cycle through those with rows: ghz takes an array's messages in turn, parsed
    # once and cached like the baseline's fixed message (a template is rendered and parsed per
    # call, on the cores the servers share).
    predict_file = root / "predict.json"
    predict_file.write_text(
        json.dumps([_predict_request(f"{ENTITY_PREFIX}{i}") for i in range(ENTITIES)])
    )
    with grpc.insecure_channel(gateway_url) as channel:
        inference_pb2_grpc.InferenceServiceStub(channel).SetRoute(
            inference_pb2.SetRouteRequest(model_name=MODEL, stable_version=1), timeout=10
        )
    _check_features(gateway_url, store_refs)
    infer_call = "inference.GRPCInferenceService.ModelInfer"
    paths = {
        "direct Triton ModelInfer": (triton_url, infer_call, ["--binary-file", str(infer_file)]),
        FLOOR: (passthrough_url, infer_call, ["--binary-file", str(infer_file)]),
        "gateway ModelInfer": (gateway_url, infer_call, ["--binary-file", str(infer_file)]),
        "gateway Predict": (
            gateway_url,
            "loopmesh.v1.InferenceService.Predict",
            ["--data-file", str(predict_file)],
        ),
    }
    cells = []
    for clients in CONCURRENCY:
        row = {path: Cell(path, clients) for path in paths}
        for path, (target, call, data) in paths.items():
            # A short unmeasured run first: connections, JIT paths and caches warm up.
            _ghz(ghz, protoset, target, call, data, clients, seconds=WARMUP_S)
            row[path].cpu_s = dict.fromkeys(cpu, 0.0)
        for round_ in range(ROUNDS):
            order = list(paths) if round_ % 2 == 0 else list(paths)[::-1]
            for path in order:
                target, call, data = paths[path]
                cell = row[path]
                before = {name: read() for name, read in cpu.items()}
                # Each slice opens new connections: its first call per client is left out.
                report = _ghz(
                    ghz,
                    protoset,
                    target,
                    call,
                    data,
                    clients,
                    seconds=DURATION_S / ROUNDS,
                    skip_first=clients if ROUNDS > 1 else 0,
                )
                for name, read in cpu.items():
                    cell.cpu_s[name] += read() - before[name]
                _add_slice(cell, report)
        for cell in row.values():
            cell.rps = cell.count / cell.seconds if cell.seconds else 0.0
            if cell.latencies_ms:
                q50, q99 = np.percentile(cell.latencies_ms, [50, 99])
                cell.p50_ms, cell.p99_ms = float(q50), float(q99)
            else:
                cell.p50_ms = cell.p99_ms = math.nan
            cells.append(cell)
    return cells


def _add_slice(cell: Cell, report: Any) -> None:
    """Adds one ghz run to its cell: calls, time, the latencies of answered calls, errors."""
    cell.count += int(report["count"])
    cell.seconds += report["total"] / 1e9
    cell.latencies_ms.extend(
        d["latency"] / 1e6 for d in report.get("details") or [] if d.get("status") == "OK"
    )
    errors: dict[str, int] = report.get("errorDistribution") or {}
    # ghz ends a timed run by closing its connections: the calls still in flight then fail
    # on the client side (gRPC's words depend on the moment). Those are counted apart, not
    # as errors.
    cut = {
        m: n
        for m, n in errors.items()
        if "use of closed network connection" in m or "the client connection is closing" in m
    }
    cell.cut += sum(cut.values())
    real = {m: n for m, n in errors.items() if m not in cut}
    cell.errors += sum(real.values())
    cell.first_error = cell.first_error or next(iter(real), "")


def _report(cells: list[Cell]) -> None:
    cores = os.cpu_count()
    table = Table(title=f"inference gateway vs direct Triton, ghz {GHZ_VERSION} ({cores} cores)")
    for column in (
        "path",
        "conc.",
        "req/s",
        "p50 ms",
        "p99 ms",
        "x direct",
        "+p50 ms",
        "+p99 ms",
        "err",
        "cut",
    ):
        table.add_column(column, justify="left" if column == "path" else "right")
    base = {c.clients: c for c in cells if c.path.startswith("direct")}
    for c in cells:
        b = base[c.clients]
        table.add_row(
            c.path,
            str(c.clients),
            f"{c.rps:,.0f}",
            f"{c.p50_ms:.2f}",
            f"{c.p99_ms:.2f}",
            f"{c.rps / b.rps:.2f}",
            f"{c.p50_ms - b.p50_ms:+.2f}",
            f"{c.p99_ms - b.p99_ms:+.2f}",
            str(c.errors),
            str(c.cut),
        )
    console.print(table)
    console.print("cut: calls in flight when ghz closed its connections at the end of a run")
    cpu_table = Table(title="CPU per request (us), every process on this machine")
    names = list(cells[0].cpu_s)
    for column in ("path", "conc.", *names, "servers total"):
        cpu_table.add_column(column, justify="left" if column == "path" else "right")
    for c in cells:
        cpu_table.add_row(
            c.path,
            str(c.clients),
            *(f"{c.cpu_us(n):,.0f}" for n in names),
            f"{c.server_cpu_us:,.0f}",
        )
    console.print(cpu_table)
    for c in cells:
        if c.errors:
            console.print(f"[red]{c.path} x{c.clients}: {c.errors} errors, first: {c.first_error}")

    def cell(path: str, clients: int) -> Cell:
        return next(c for c in cells if c.path == path and c.clients == clients)

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for clients in CONCURRENCY:
        b, g, f = base[clients], cell("gateway ModelInfer", clients), cell(FLOOR, clients)
        ratio, added = g.rps / b.rps, g.p50_ms - b.p50_ms
        floor = (
            f"; a bare Go pass-through: {f.rps / b.rps:.2f}x, p50 {f.p50_ms - b.p50_ms:+.2f} ms, "
            f"{f.cpu_us('pass-through'):,.0f} us of CPU a call vs the data plane's "
            f"{g.cpu_us('data plane'):,.0f}"
        )
        if clients == 1:
            console.print(
                f" 1 call at a time: gateway ModelInfer p50 {added:+.2f} ms -> target "
                f"(<= +0.5 ms) {verdict(added <= 0.5)} ({ratio:.2f}x throughput{floor})"
            )
        else:
            console.print(
                f"{clients:>2} concurrent: gateway ModelInfer {ratio:.2f}x direct throughput -> "
                f"target (>= 0.8x) {verdict(ratio >= 0.8)} (p50 {added:+.2f} ms{floor})"
            )
    if 16 in CONCURRENCY:
        p = cell("gateway Predict", 16)
        ratio = p.rps / base[16].rps
        console.print(
            f"16 concurrent: gateway Predict (features + Triton + log) {ratio:.2f}x direct "
            f"Triton throughput -> target (>= 0.5x) {verdict(ratio >= 0.5)}"
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
    with tempfile.TemporaryDirectory(prefix="loopmesh-bench-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        # The real features service first: the model's features are its repo's.
        features = stack.enter_context(
            feature_service(root / "features", ENTITIES, console, own_group=True)
        )
        # Not the event timestamps (unix seconds): no model takes them as they are. (The
        # untrained MLP still answers about 0 on these unscaled counts; Triton's work is the
        # same whatever the values.)
        store_refs = [r for r in features.numeric_refs if not r.endswith("_ts")]
        feature_names = store_refs + CONTEXT
        repo = root / "models"
        repo.mkdir()
        model_repo.write_version(
            repo,
            MODEL,
            1,
            _model_bytes(len(feature_names)),
            {"feature_names": feature_names},
            n_features=len(feature_names),
        )
        kafka = KafkaBroker(root / "kafka")
        triton = TritonServer(repo, root / "triton")
        gateway_port = free_port()
        gateway: subprocess.Popen[bytes] | None = None
        with console.status("starting Kafka and tritonserver"):
            kafka.start()
            triton.start()
        try:
            import tritonclient.grpc as grpcclient

            loader = grpcclient.InferenceServerClient(triton.grpc_url)
            loader.load_model(MODEL, client_timeout=120)
            loader.close()
            env = {
                **os.environ,
                "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                "LOOPMESH_TRITON_URL": triton.grpc_url,
                "LOOPMESH_MODEL_REPOSITORY": str(repo),
                "LOOPMESH_INFERENCE__SERVER__PORT": str(gateway_port),
                "LOOPMESH_INFERENCE__FEATURES_URL": features.address,
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
                f"measuring {DURATION_S:.0f}s per cell after {WARMUP_S:.0f}s of warm-up, in "
                f"{ROUNDS} interleaved slice(s); model: MLP {len(feature_names)}-32-1 "
                f"(python backend, CPU) on {len(store_refs)} store features of {ENTITIES} "
                f"entities ({', '.join(store_refs)}) and {len(CONTEXT)} context numbers"
            )
            floor_url, floor_pid = stack.enter_context(passthrough(triton.grpc_url))
            gateway_pid, triton_pid, features_pid = gateway.pid, triton.pid, features.pid
            assert triton_pid is not None
            plane = "loopmesh-datapl"  # the kernel keeps 15 characters of a command name
            cpu = {
                "ghz": lambda: _children_cpu_s(),
                "data plane": lambda: _group_cpu_s(gateway_pid, name=plane),
                "control plane": lambda: _group_cpu_s(gateway_pid, exclude=plane),
                "triton": lambda: _group_cpu_s(triton_pid),
                # Its own process group: the Python FeatureService and its Go data plane.
                "features": lambda: _group_cpu_s(features_pid),
                "pass-through": lambda: _group_cpu_s(floor_pid),
            }
            _report(_measure(triton.grpc_url, floor_url, gateway_url, cpu, root, store_refs))
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(timeout=30)
                for line in (root / "gateway.log").read_text(errors="replace").splitlines():
                    if "stopped:" in line:
                        console.print(f"gateway {line.split('stopped:', 1)[1].strip()}")
                    elif '"predictions produced"' in line:  # the data plane's own producer
                        produced = json.loads(line)
                        console.print(
                            f"data plane: {produced['logged']} predictions produced to Kafka, "
                            f"{produced['dropped']} dropped; {produced['rows']} rows in "
                            f"{produced['triton_requests']} Triton requests, features of "
                            f"{produced['feature_fetches']} entities in "
                            f"{produced['feature_calls']} GetOnlineFeatures calls"
                        )
            triton.stop()
            kafka.stop()


if __name__ == "__main__":
    main()
