"""Export (issue 18): the trainer publishes ONNX that reproduces the torch module, or fails the
run; what it publishes loads in the real tritonserver and answers what torch answers."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from torch import nn

from loopmesh.devstack.synthetic import FEATURE_NAMES, SyntheticConfig, SyntheticWorld, examples
from loopmesh.devstack.triton import TritonServer
from loopmesh.mesh import model_repo
from loopmesh.trainer.core import TrainerCore
from loopmesh.trainer.dataset import Dataset
from loopmesh.trainer.export import ExportError, export_module, run_onnx
from loopmesh.trainer.pipeline import publish_files, run_pipeline
from loopmesh.trainer.prepare import Standardisation
from loopmesh.trainer.scoring import MLP, ScoringModule
from loopmesh.trainer.settings import DatasetSettings, TrainerScope, TrainingSettings
from loopmesh.trainer.train import FitResult, fit, warm_start_from

T0 = datetime(2025, 6, 1, tzinfo=UTC)
FAST = TrainingSettings(max_epochs=10, patience=3)
LOAD_TIMEOUT = 120.0


def _rows(n: int = 300, seed: int = 0) -> np.ndarray:
    x = SyntheticWorld(SyntheticConfig(seed=seed)).sample(n).features
    x[::7, 2] = np.nan  # missing inputs: the module imputes them
    return x


def _scoring(x: np.ndarray, n_outputs: int = 1) -> ScoringModule:
    st = Standardisation.fit(x, FEATURE_NAMES, clip_quantile=0.005)
    torch.manual_seed(1)
    return ScoringModule(MLP(len(FEATURE_NAMES), [16, 8], n_outputs), st).eval()


def _torch(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out: torch.Tensor = module(torch.as_tensor(x, dtype=torch.float32))
    return out.reshape(len(x), -1).numpy()


# -- export itself (unit) ------------------------------------------------------------------------


def test_the_built_in_model_exports_and_reproduces_torch_nans_included() -> None:
    x = _rows()
    module = _scoring(x)
    exported = export_module(module, x)
    assert (exported.n_features, exported.n_outputs) == (len(FEATURE_NAMES), 1)
    assert exported.max_abs_diff <= 1e-4
    # Other rows than the sample, other batch sizes: the batch dimension is dynamic.
    for n in (1, 3, 257):
        other = _rows(n, seed=n)
        np.testing.assert_allclose(run_onnx(exported.onnx, other), _torch(module, other), atol=1e-5)


def test_k_outputs_export_as_k_columns() -> None:
    class Softmax(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.inner.mlp(x.nan_to_num()), dim=1)

    x = _rows()
    module = Softmax(_scoring(x, n_outputs=3))
    exported = export_module(module, x)
    assert exported.n_outputs == 3
    got = run_onnx(exported.onnx, x)
    assert got.shape == (len(x), 3)
    np.testing.assert_allclose(got, _torch(module, x), atol=1e-5)


def test_a_one_dimensional_output_is_one_column() -> None:
    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(x.sum(dim=1))

    x = np.random.default_rng(0).normal(size=(20, 4))
    exported = export_module(Flat(), x)
    assert exported.n_outputs == 1 and run_onnx(exported.onnx, x).shape == (20, 1)


class DataDependent(nn.Module):
    """Python control flow on a tensor's values: torch.export cannot capture it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.isnan(x).any():
            return self.inner(x)  # type: ignore[no-any-return]
        return self.inner(x)  # type: ignore[no-any-return]


class NoOnnxOp(nn.Module):
    """An op the ONNX converter has no function for (Riemann zeta)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.zeta(x[:, :1].abs() + 2.0, torch.tensor(2.0))


class Stateful(nn.Module):
    """Python state read at trace time: the graph bakes in a value eager mode no longer has."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.sigmoid(x[:, :1]) * self.calls


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (DataDependent(nn.Linear(4, 1)), "torch.export cannot capture the module"),
        (NoOnnxOp(), "cannot be converted to ONNX.*zeta"),
        (Stateful(), "does not reproduce the module: max abs diff"),
    ],
    ids=["data-dependent-control-flow", "unsupported-op", "output-mismatch"],
)
def test_what_cannot_be_exported_faithfully_is_an_export_error(
    module: nn.Module, reason: str
) -> None:
    x = np.random.default_rng(0).normal(size=(32, 4))
    with pytest.raises(ExportError, match=reason):
        export_module(module, x)


def test_weights_are_safetensors_checked_before_a_warm_start(tmp_path: Path) -> None:
    x = _rows()
    module = _scoring(x)
    exported = export_module(module, x)
    # Not a pickle but safetensors: an 8-byte header length, then a JSON header. (A first byte
    # of 0x80 proves nothing: a 896-byte header's length starts like a pickle's opcode.)
    size = int.from_bytes(exported.weights[:8], "little")
    assert "mlp.net.0.weight" in json.loads(exported.weights[8 : 8 + size])
    vdir = model_repo.write_version(
        tmp_path,
        "w",
        1,
        exported.onnx,
        {"feature_names": list(FEATURE_NAMES)},
        n_features=len(FEATURE_NAMES),
        weights=exported.weights,
    )
    st = Standardisation.fit(x, FEATURE_NAMES, clip_quantile=0.005)
    warm = warm_start_from(vdir / model_repo.MODEL_FILE, st)
    assert warm is not None
    own = module.mlp.state_dict()
    assert set(warm.state) == set(own)
    assert all(torch.equal(warm.state[k], own[k]) for k in own)
    (vdir / model_repo.WEIGHTS_FILE).write_bytes(exported.weights[:-1] + b" ")
    with pytest.raises(ValueError, match="refusing to load"):
        warm_start_from(vdir / model_repo.MODEL_FILE, st)
    # A version published without weights gives nothing to start from, not an error.
    bare = model_repo.write_version(tmp_path, "w", 2, exported.onnx, {}, n_features=8)
    assert warm_start_from(bare / model_repo.MODEL_FILE, st) is None


# -- the trainer fails a run whose module does not export ------------------------------------


async def test_a_module_that_cannot_be_exported_fails_the_run_and_publishes_nothing(
    tmp_path: Path,
) -> None:
    def unexportable_fit(*args: Any, **kwargs: Any) -> FitResult:
        result = fit(*args, **kwargs)  # a real, good model, wrapped in data-dependent control flow
        return dataclasses.replace(result, module=DataDependent(result.module))

    scope = TrainerScope(
        model_name="noexport",
        data_dir=tmp_path / "data",
        dataset=DatasetSettings(min_rows=100),
        training=FAST,
    )
    core = TrainerCore(scope, tmp_path / "repo", fit=unexportable_fit)
    world = SyntheticWorld(SyntheticConfig(seed=4))
    batch = world.sample(600)
    core.dataset.append(examples(batch, world.draw_labels(batch), model_name="noexport", start=T0))
    started, _ = core.trigger(["manual: export test"])
    assert started
    record = await core.wait_idle()
    assert record is not None
    assert record.status == "failed", record
    assert "ExportError" in record.error and "torch.export cannot capture" in record.error
    assert len(record.error) < 1000  # the reason, not the exporter's pages of graph dumps
    assert record.version is None
    assert model_repo.list_versions(tmp_path / "repo", "noexport") == []
    assert core.history.all()[-1].status == "failed"


# -- the happy path through the real tritonserver ---------------------------------------------


def test_a_trained_version_is_served_by_triton_as_torch_computes_it(
    tmp_path: Path, triton: TritonServer
) -> None:
    """Train, export, publish into the served repository, load, infer, compare with torch."""
    model = "exported"
    scope = TrainerScope(model_name=model, data_dir=tmp_path / "data", training=FAST)
    ds = Dataset(scope.data_dir)
    world = SyntheticWorld(SyntheticConfig(seed=6))
    batch = world.sample(800)
    ds.append(examples(batch, world.draw_labels(batch), model_name=model, start=T0))
    trained: list[ScoringModule] = []

    def keep(*args: Any, **kwargs: Any) -> FitResult:
        result = fit(*args, **kwargs)
        trained.append(result.module)
        return result

    outcome = run_pipeline(scope, ds, None, keep, run_id="export-e2e")
    assert outcome.decision.accepted and outcome.payload is not None
    version, meta = publish_files(triton.model_repository, model, outcome.payload, outcome.metadata)
    assert meta["format"] == "onnx" and meta["export"]["max_abs_diff"] <= 1e-4
    names = meta["feature_names"]

    rows = world.sample(64)
    columns = [list(FEATURE_NAMES).index(n) for n in names]
    x = rows.features[:, columns].astype(np.float32)
    x[::5, 0] = np.nan  # Triton gets NaN for missing features too
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        t0 = time.monotonic()
        client.load_model(model, client_timeout=LOAD_TIMEOUT)
        print(f"\nload_model({model}) took {time.monotonic() - t0:.2f}s")
        inp = grpcclient.InferInput(model_repo.INPUT_NAME, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(
            model,
            [inp],
            model_version=str(version),
            outputs=[grpcclient.InferRequestedOutput(model_repo.OUTPUT_NAME)],
            client_timeout=30,
        )
        served = result.as_numpy(model_repo.OUTPUT_NAME)
        client.unload_model(model, client_timeout=LOAD_TIMEOUT)
    finally:
        client.close()
    assert served is not None and served.shape == (64, 1)
    np.testing.assert_allclose(served, _torch(trained[0], x), atol=1e-5)
    assert np.isfinite(served).all()
