"""Which artefact Triton's python backend should serve: TorchScript (before issue 18) or ONNX.

One run starts one tritonserver (the nvidia-pytriton wheel's, python backend only) on a model
repository holding the built-in model (``ScoringModule`` around ``MLP``, 8 features, hidden
[32, 16], standardisation fitted on synthetic traffic) twice, as:

- ``torchscript``: ``model.pt`` and the python-backend model LoopMesh shipped until issue 18
  (``import torch``, ``torch.jit.load``, tensors through DLPack): the baseline
- ``onnx``: ``model.onnx`` and ``mesh/triton_python_model.py`` as published today
  (onnxruntime on one thread, numpy through DLPack, no torch in the stub)

and measures, one model loaded at a time:

- load time: ``load_model`` through Triton's model-control API (explicit mode), from the call
  to its return (the version ready), ``BENCH_LOAD_REPS`` times each, alternating, each after an
  unload whose stub process has exited; median, min and max
- inference: ``BENCH_REQUESTS`` ModelInfer calls of one row each from ``BENCH_CONCURRENCY``
  client threads (gRPC, one client each), after a warm-up; Triton's CPU per request (user +
  system time of the server's process group, stubs included, from /proc) and p50/p99 latency;
  ``BENCH_INFER_ROUNDS`` rounds, alternating, medians reported

Ratios are against the TorchScript baseline measured in the same run. Clients run in this
process and share the machine's cores with Triton, equally for both.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from loopmesh.devstack.synthetic import FEATURE_NAMES, SyntheticConfig, SyntheticWorld
from loopmesh.devstack.triton import TritonServer
from loopmesh.mesh import model_repo

LOAD_REPS = int(os.environ.get("BENCH_LOAD_REPS", "5"))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "2000"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "8"))
INFER_ROUNDS = int(os.environ.get("BENCH_INFER_ROUNDS", "3"))
WARMUP = 200
LOAD_TIMEOUT = 300.0
INFER_TIMEOUT = 30.0
HIDDEN = [32, 16]
LOAD_RATIO_TO_SWITCH = 0.5
"""A version's load paces the loop (every rollout step waits for one): ONNX must halve it."""
CPU_RATIO_ALLOWED = 2.0
"""...without doubling the python backend's CPU per request (the NVIDIA container runs
model.onnx in Triton's native onnxruntime backend, with no python stub at all)."""
STUB = "triton_python_b"  # the kernel keeps 15 characters of the stub's command name
_TICK = os.sysconf("SC_CLK_TCK")
console = Console(width=150)

TORCHSCRIPT_MODEL_PY = r'''
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils

INPUT_NAME = "INPUT__0"
OUTPUT_NAME = "OUTPUT__0"
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class TritonPythonModel:
    """One instance per Triton model instance; ``execute`` gets a dynamic batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        # args["model_repository"] is the model's directory, not the repository root.
        version_dir = Path(args["model_repository"]) / args["model_version"]
        metadata = json.loads((version_dir / "metadata.json").read_text())
        expected = metadata.get("sha256")
        if not isinstance(expected, str) or len(expected) != 64:
            raise pb_utils.TritonModelException(
                f"{version_dir}/metadata.json has no valid sha256; refusing to load"
            )
        actual = _sha256(version_dir / "model.pt")
        if actual != expected:
            raise pb_utils.TritonModelException(
                f"sha256 mismatch for {version_dir}/model.pt: metadata says {expected}, "
                f"file is {actual}; refusing to load"
            )
        self.n_features = int(metadata["n_features"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module = torch.jit.load(str(version_dir / "model.pt"), map_location=self.device)
        self.module.eval()
        self.name = f"{args['model_name']}/{args['model_version']}"
        pb_utils.Logger.log_info(f"{self.name}: loaded sha256={actual[:12]} on {self.device}")

    def execute(self, requests: list[Any]) -> list[Any]:
        # Validate every request first so one bad request fails alone, not the whole batch.
        inputs: list[torch.Tensor | None] = []
        errors: list[str | None] = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
            if tensor is None:
                inputs.append(None)
                errors.append(f"{self.name}: request has no {INPUT_NAME}")
                continue
            x = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
            if x.dim() != 2 or x.shape[1] != self.n_features or x.shape[0] == 0:
                inputs.append(None)
                errors.append(
                    f"{self.name}: {INPUT_NAME} has shape {list(x.shape)}, "
                    f"expected [batch>0, {self.n_features}]"
                )
                continue
            inputs.append(x)
            errors.append(None)

        good = [x for x in inputs if x is not None]
        outputs: torch.Tensor | None = None
        batch_error: str | None = None
        if good:
            try:
                outputs = self._forward(torch.cat(good, dim=0))
            except Exception as exc:
                batch_error = f"{self.name}: inference failed: {type(exc).__name__}: {exc}"
                pb_utils.Logger.log_error(batch_error)

        responses = []
        offset = 0
        for batch_part, error in zip(inputs, errors, strict=True):
            if batch_part is None or outputs is None:
                message = error or batch_error or f"{self.name}: no output"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
                continue
            rows = outputs[offset : offset + batch_part.shape[0]].contiguous()
            offset += batch_part.shape[0]
            out = pb_utils.Tensor.from_dlpack(OUTPUT_NAME, torch.utils.dlpack.to_dlpack(rows))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            result = self.module(batch.to(self.device, torch.float32))
        if not isinstance(result, torch.Tensor):
            raise TypeError(f"model returned {type(result).__name__}, expected a Tensor")
        out = result.detach().to("cpu", torch.float32)
        if out.dim() == 1:
            out = out.reshape(-1, 1)
        if tuple(out.shape) != (batch.shape[0], 1):
            raise ValueError(
                f"model output shape {list(out.shape)}, expected [{batch.shape[0]}, 1]"
            )
        if not bool(torch.isfinite(out).all()):
            raise ValueError("model output contains NaN or Inf")
        return out

    def finalize(self) -> None:
        pb_utils.Logger.log_info(f"{self.name}: unloaded")
'''
"""The python-backend model LoopMesh shipped before issue 18, verbatim but for its docstring."""


# -- the two artefacts -------------------------------------------------------------------------


def _module() -> tuple[object, np.ndarray]:
    """The built-in model with a fitted standardisation, and sample rows (raw features)."""
    import torch

    from loopmesh.trainer.prepare import Standardisation
    from loopmesh.trainer.scoring import MLP, ScoringModule

    world = SyntheticWorld(SyntheticConfig(seed=3))
    x = world.sample(2000).features
    st = Standardisation.fit(x, FEATURE_NAMES, clip_quantile=0.005)
    torch.manual_seed(0)
    return ScoringModule(MLP(len(FEATURE_NAMES), HIDDEN), st).eval(), x


def _publish(repo: Path) -> np.ndarray:
    """Models ``torchscript`` and ``onnx``, version 1 each; returns rows to send."""
    import io

    import torch

    from loopmesh.trainer.export import export_module

    module, x = _module()
    exported = export_module(module, x)  # type: ignore[arg-type]
    model_repo.write_version(
        repo, "onnx", 1, exported.onnx, {}, n_features=len(FEATURE_NAMES), weights=exported.weights
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation, the reason for issue 18
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(module), buffer)
    payload = buffer.getvalue()
    mdir = repo / "torchscript"
    vdir = mdir / "1"
    vdir.mkdir(parents=True)
    (mdir / "config.pbtxt").write_text(
        model_repo.render_config("torchscript", n_features=len(FEATURE_NAMES))
    )
    (vdir / "model.pt").write_bytes(payload)
    (vdir / "model.py").write_text(TORCHSCRIPT_MODEL_PY)
    meta = {"sha256": hashlib.sha256(payload).hexdigest(), "n_features": len(FEATURE_NAMES)}
    (vdir / "metadata.json").write_text(json.dumps(meta))
    return np.asarray(x, dtype=np.float32)


# -- measurement -------------------------------------------------------------------------------


def _group(pgid: int) -> list[tuple[str, float]]:
    """(command name, CPU seconds) of the live processes of group ``pgid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # the process ended meanwhile
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            out.append((name, (int(fields[11]) + int(fields[12])) / _TICK))
    return out


def _cpu_s(pgid: int) -> float:
    return sum(cpu for _, cpu in _group(pgid))


def _stubs(pgid: int) -> int:
    return sum(1 for name, _ in _group(pgid) if name.startswith(STUB))


@dataclass
class Figures:
    name: str
    loads_s: list[float] = field(default_factory=list)
    cpu_us: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rps: float = 0.0

    @property
    def load_s(self) -> float:
        return statistics.median(self.loads_s)


def _load_once(client: object, name: str, pgid: int) -> float:
    base = _stubs(pgid)
    t0 = time.perf_counter()
    client.load_model(name, client_timeout=LOAD_TIMEOUT)  # type: ignore[attr-defined]
    seconds = time.perf_counter() - t0
    client.unload_model(name, client_timeout=LOAD_TIMEOUT)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while _stubs(pgid) > base and time.monotonic() < deadline:
        time.sleep(0.05)  # the unload ends when the stub has exited
    return seconds


def _infer_all(url: str, name: str, rows: np.ndarray, n: int, concurrency: int) -> list[float]:
    """Latencies (s) of ``n`` one-row calls from ``concurrency`` threads."""
    import tritonclient.grpc as grpcclient

    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(n))
    errors: list[BaseException] = []

    def worker() -> None:
        client = grpcclient.InferenceServerClient(url)
        out = [grpcclient.InferRequestedOutput(model_repo.OUTPUT_NAME)]
        mine = []
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    break
                inp = grpcclient.InferInput(model_repo.INPUT_NAME, [1, rows.shape[1]], "FP32")
                inp.set_data_from_numpy(rows[i % len(rows)][None, :])
                t0 = time.perf_counter()
                result = client.infer(name, [inp], outputs=out, client_timeout=INFER_TIMEOUT)
                mine.append(time.perf_counter() - t0)
                if result.as_numpy(model_repo.OUTPUT_NAME) is None:
                    raise RuntimeError(f"{name}: an answer without {model_repo.OUTPUT_NAME}")
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return latencies


def _measure(triton: TritonServer, rows: np.ndarray) -> list[Figures]:
    import tritonclient.grpc as grpcclient

    pgid = triton.pid
    assert pgid is not None
    figures = {name: Figures(name) for name in ("torchscript", "onnx")}
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        for rep in range(LOAD_REPS):
            for name, fig in figures.items():
                fig.loads_s.append(_load_once(client, name, pgid))
                console.print(f"  load {rep + 1}/{LOAD_REPS} {name}: {fig.loads_s[-1]:.2f} s")
        cpu: dict[str, list[float]] = {name: [] for name in figures}
        p50: dict[str, list[float]] = {name: [] for name in figures}
        p99: dict[str, list[float]] = {name: [] for name in figures}
        rps: dict[str, list[float]] = {name: [] for name in figures}
        for rep in range(INFER_ROUNDS):  # alternating, so a busy moment hits both alike
            for name in figures:
                client.load_model(name, client_timeout=LOAD_TIMEOUT)
                _infer_all(triton.grpc_url, name, rows, WARMUP, CONCURRENCY)
                cpu0, t0 = _cpu_s(pgid), time.perf_counter()
                latencies = _infer_all(triton.grpc_url, name, rows, REQUESTS, CONCURRENCY)
                wall, used = time.perf_counter() - t0, _cpu_s(pgid) - cpu0
                client.unload_model(name, client_timeout=LOAD_TIMEOUT)
                ms = np.asarray(latencies) * 1e3
                cpu[name].append(used / len(latencies) * 1e6)
                p50[name].append(float(np.percentile(ms, 50)))
                p99[name].append(float(np.percentile(ms, 99)))
                rps[name].append(len(latencies) / wall)
                console.print(
                    f"  inference {rep + 1}/{INFER_ROUNDS} {name}: {cpu[name][-1]:,.0f} us CPU "
                    f"per request, p50 {p50[name][-1]:.2f} ms"
                )
        for name, fig in figures.items():
            fig.cpu_us = statistics.median(cpu[name])
            fig.p50_ms = statistics.median(p50[name])
            fig.p99_ms = statistics.median(p99[name])
            fig.rps = statistics.median(rps[name])
    finally:
        client.close()
    return list(figures.values())


def _report(figures: list[Figures]) -> None:
    base = figures[0]
    table = Table(
        title=f"python backend: TorchScript vs ONNX ({os.cpu_count()} cores; "
        f"{LOAD_REPS} loads each, {INFER_ROUNDS}x{REQUESTS} one-row requests at concurrency "
        f"{CONCURRENCY}; medians)"
    )
    for column in (
        "artefact",
        "load median s",
        "load min-max s",
        "x baseline",
        "Triton CPU us/req",
        "x baseline",
        "p50 ms",
        "x baseline",
        "p99 ms",
        "req/s",
    ):
        table.add_column(column, justify="left" if column == "artefact" else "right")
    for f in figures:
        table.add_row(
            f.name + (" (baseline)" if f is base else ""),
            f"{f.load_s:.2f}",
            f"{min(f.loads_s):.2f}-{max(f.loads_s):.2f}",
            f"{f.load_s / base.load_s:.3f}",
            f"{f.cpu_us:,.0f}",
            f"{f.cpu_us / base.cpu_us:.2f}",
            f"{f.p50_ms:.2f}",
            f"{f.p50_ms / base.p50_ms:.2f}",
            f"{f.p99_ms:.2f}",
            f"{f.rps:,.0f}",
        )
    console.print(table)
    onnx = figures[1]
    load, cpu = onnx.load_s / base.load_s, onnx.cpu_us / base.cpu_us
    chosen = "ONNX" if load <= LOAD_RATIO_TO_SWITCH and cpu <= CPU_RATIO_ALLOWED else "TorchScript"
    console.print(
        f"ONNX loads in {load:.3f}x the time of TorchScript (switch at <= "
        f"{LOAD_RATIO_TO_SWITCH}x) and costs {cpu:.2f}x its Triton CPU per request (allowed "
        f"<= {CPU_RATIO_ALLOWED}x) -> {chosen} is the artefact to publish"
    )


def main(measure: Callable[[TritonServer, np.ndarray], list[Figures]] = _measure) -> None:
    with tempfile.TemporaryDirectory(prefix="loopmesh-export-bench-") as tmp:
        root = Path(tmp)
        repo = root / "models"
        repo.mkdir()
        with console.status("exporting the built-in model both ways"):
            rows = _publish(repo)
        triton = TritonServer(repo, root / "triton")
        with console.status("starting tritonserver"):
            triton.start()
        try:
            _report(measure(triton, rows))
        finally:
            triton.stop()


if __name__ == "__main__":
    main()
