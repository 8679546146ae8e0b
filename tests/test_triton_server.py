"""The real tritonserver (from the nvidia-pytriton wheel) serving ONNX via model_repo.

Slow-ish: one server start (a few seconds) and one python-backend stub per loaded version
(each imports onnxruntime). Every client call carries a timeout: a broken stub can hang a load.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from loopmesh.devstack.triton import TritonServer
from loopmesh.mesh import model_repo
from loopmesh.mesh.errors import SetupError
from loopmesh.mesh.events import ModelPublished
from loopmesh.trainer.export import ExportedModel, export_module

N_FEATURES = 4
LOAD_TIMEOUT = 120.0
INFER_TIMEOUT = 30.0


def _module(weight: list[float], bias: float) -> torch.nn.Module:
    linear = torch.nn.Linear(N_FEATURES, 1)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([weight]))
        linear.bias.fill_(bias)
    return torch.nn.Sequential(linear, torch.nn.Sigmoid()).eval()


SAMPLE = np.random.default_rng(42).normal(size=(64, N_FEATURES)).astype(np.float32)


def _exported(module: torch.nn.Module) -> ExportedModel:
    return export_module(module, SAMPLE)


def _expected(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _infer(client: grpcclient.InferenceServerClient, model: str, version: str, x: np.ndarray):
    inp = grpcclient.InferInput(model_repo.INPUT_NAME, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(
        model,
        [inp],
        model_version=version,
        outputs=[grpcclient.InferRequestedOutput(model_repo.OUTPUT_NAME)],
        client_timeout=INFER_TIMEOUT,
    )
    out = result.as_numpy(model_repo.OUTPUT_NAME)
    assert out is not None, "server answered without OUTPUT__0"
    return out


MODULES = {
    1: _module([0.5, -1.0, 0.25, 2.0], 0.1),
    2: _module([-0.75, 0.5, 1.5, -0.2], -0.3),
}
EXPORTED = {version: _exported(module) for version, module in MODULES.items()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model_repo")


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    srv = TritonServer(repo, tmp_path_factory.mktemp("triton_work"))
    t0 = time.monotonic()
    srv.start(timeout=120)
    print(f"\ntritonserver ready in {time.monotonic() - t0:.2f}s")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def ctr(repo: Path) -> str:
    """Model "ctr" with versions 1 and 2 published (different weights)."""
    for version, exported in EXPORTED.items():
        model_repo.write_version(
            repo,
            "ctr",
            version,
            exported.onnx,
            {"metrics": {"auc": 0.5 + version / 10}, "parent_version": version - 1 or None},
            n_features=N_FEATURES,
            weights=exported.weights,
        )
    return "ctr"


@pytest.fixture()
def client(server: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        yield c
    finally:
        c.close()


# -- registry validation (no server) ---------------------------------------------------------


@pytest.mark.parametrize("name", ["m", "ctr_model", "Model-2", "a" * 64])
def test_valid_model_names(name: str) -> None:
    assert model_repo.validate_model_name(name) == name
    assert _published(name).model_name == name  # events follow the same rule


@pytest.mark.parametrize(
    "name",
    ["", "../x", "a/b", "..", ".", ".hidden", "a\\b", "a b", "1abc", "a\x00b", "a" * 65, "a.b"],
)
def test_invalid_model_names(name: str) -> None:
    with pytest.raises(ValueError):
        model_repo.validate_model_name(name)
    with pytest.raises(ValidationError):
        _published(name)


def _published(name: str) -> ModelPublished:
    return ModelPublished(model_name=name, model_version=1, sha256="0" * 64, feature_names=["x"])


@pytest.mark.parametrize("name", [None, 3])
def test_a_model_name_must_be_a_string(name: object) -> None:
    with pytest.raises(ValueError):
        model_repo.validate_model_name(name)


@pytest.mark.parametrize(("version", "expected"), [(1, 1), ("7", 7), ("123", 123)])
def test_valid_versions(version: object, expected: int) -> None:
    assert model_repo.validate_version(version) == expected


@pytest.mark.parametrize(
    "version", ["", "0", 0, -1, "-1", "01", "1.0", "../1", "1/2", " 1", "1\n", True, 1.0, None]
)
def test_invalid_versions(version: object) -> None:
    with pytest.raises(ValueError):
        model_repo.validate_version(version)


def test_write_version_layout_and_metadata(tmp_path: Path) -> None:
    data, weights = EXPORTED[1].onnx, EXPORTED[1].weights
    vdir = model_repo.write_version(
        tmp_path,
        "m",
        1,
        data,
        {"metrics": {"auc": 0.7}, "feature_names": list("abcd")},
        n_features=N_FEATURES,
        weights=weights,
    )
    assert vdir == tmp_path / "m" / "1"
    assert sorted(p.name for p in vdir.iterdir()) == [
        "metadata.json",
        "model.onnx",
        "model.py",
        "weights.safetensors",
    ]
    assert (tmp_path / "m" / "config.pbtxt").is_file()
    # Nothing but the version and the config is left in the model dir (no temp leftovers).
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "config.pbtxt"]
    meta = model_repo.read_metadata(tmp_path, "m", 1)
    assert meta["metrics"] == {"auc": 0.7}
    assert meta["parent_version"] is None and meta["created_at"]
    assert meta["n_features"] == N_FEATURES and meta["n_outputs"] == 1
    assert meta["format"] == "onnx" and len(meta["weights_sha256"]) == 64
    assert model_repo.verify_sha256(tmp_path, "m", 1)
    assert model_repo.list_versions(tmp_path, "m") == [1]
    with pytest.raises(FileExistsError):
        model_repo.write_version(tmp_path, "m", 1, data, {}, n_features=N_FEATURES)
    with pytest.raises(ValueError):
        model_repo.write_version(tmp_path, "m", 2, data, {}, n_features=N_FEATURES + 1)
    with pytest.raises(ValueError, match="n_outputs"):
        model_repo.write_version(tmp_path, "m", 2, data, {}, n_features=N_FEATURES, n_outputs=3)
    with pytest.raises(ValueError):
        model_repo.write_version(tmp_path, "../evil", 1, data, {}, n_features=N_FEATURES)
    assert model_repo.list_versions(tmp_path, "m") == [1]
    (vdir / "weights.safetensors").write_bytes(weights + b"x")
    assert not model_repo.verify_sha256(tmp_path, "m", 1)
    (vdir / "weights.safetensors").write_bytes(weights)
    assert model_repo.verify_sha256(tmp_path, "m", 1)
    (vdir / "model.onnx").write_bytes(data + b"x")
    assert not model_repo.verify_sha256(tmp_path, "m", 1)
    (vdir / "model.onnx").unlink()
    assert not model_repo.verify_sha256(tmp_path, "m", 1)


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_render_config_for_either_backend(backend: str) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = model_repo.render_config(
        "m", n_features=7, n_outputs=3, max_batch_size=64, backend=backend
    )
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.backend == backend and config.max_batch_size == 64
    assert [(i.name, list(i.dims)) for i in config.input] == [("INPUT__0", [7])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("OUTPUT__0", [3])]
    [group] = config.instance_group
    if backend == "python":
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    else:  # Triton places it: a GPU when there is one
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
        assert config.default_model_filename == "model.onnx"
    with pytest.raises(ValueError, match="backend"):
        model_repo.render_config("m", n_features=7, backend="pytorch")
    with pytest.raises(ValueError, match="n_outputs"):
        model_repo.render_config("m", n_features=7, n_outputs=0)


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    srv = TritonServer(tmp_path, tmp_path / "work", binary=tmp_path / "no-such-tritonserver")
    with pytest.raises(SetupError, match="not found"):
        srv.start(timeout=5)


# -- the real server -------------------------------------------------------------------------


def test_two_versions_serve_their_own_weights(
    ctr: str, server: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    assert model_repo.list_versions(server.model_repository, ctr) == [1, 2]
    t0 = time.monotonic()
    client.load_model("ctr", client_timeout=LOAD_TIMEOUT)
    print(f"\nload_model(ctr, 2 versions) took {time.monotonic() - t0:.2f}s")
    assert client.is_model_ready("ctr", "1", client_timeout=INFER_TIMEOUT)
    assert client.is_model_ready("ctr", "2", client_timeout=INFER_TIMEOUT)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, N_FEATURES)).astype(np.float32)
    answers = {}
    for version, module in MODULES.items():
        out = _infer(client, "ctr", str(version), x)
        assert out.shape == (5, 1)
        np.testing.assert_allclose(out, _expected(module, x), rtol=1e-5, atol=1e-6)
        answers[version] = out
    assert not np.allclose(answers[1], answers[2])

    # A wrongly shaped request is an error, never an empty answer.
    bad = np.zeros((2, N_FEATURES + 1), dtype=np.float32)
    with pytest.raises(InferenceServerException):
        _infer(client, "ctr", "1", bad)


def test_dynamic_batches_split_back_per_request(
    ctr: str, server: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    """Concurrent requests get merged into one execute(); each must get its own rows back."""
    client.load_model(ctr, client_timeout=LOAD_TIMEOUT)
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(int(n), N_FEATURES)).astype(np.float32) for n in rng.integers(1, 6, 64)]

    def call(x: np.ndarray) -> np.ndarray:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            return _infer(c, ctr, "2", x)
        finally:
            c.close()

    with ThreadPoolExecutor(max_workers=16) as pool:
        outs = list(pool.map(call, xs))
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out, _expected(MODULES[2], x), rtol=1e-5, atol=1e-6)
    stats = client.get_inference_statistics(ctr, "2", as_json=True, client_timeout=INFER_TIMEOUT)
    [model_stats] = stats["model_stats"]
    print(f"\n{model_stats['inference_count']} rows in {model_stats['execution_count']} executions")
    # Without batching there would be at least one execution per request.
    assert int(model_stats["execution_count"]) < len(xs), "no requests were batched together"
    # Answers leave through DLPack without a traceback each (numpy's capsule destructor
    # failed on the stub's non-standard "used" name: one per response, in Triton's log).
    assert "PyCapsule_GetPointer" not in server.log_path.read_text(errors="replace")


def test_tampered_model_refuses_to_load(
    repo: Path, server: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    vdir = model_repo.write_version(
        repo, "tampered", 1, EXPORTED[1].onnx, {}, n_features=N_FEATURES
    )
    # Swap in another valid graph: loadable, but not what metadata.json vouches for.
    (vdir / "model.onnx").write_bytes(EXPORTED[2].onnx)
    with pytest.raises(InferenceServerException, match="sha256 mismatch"):
        client.load_model("tampered", client_timeout=LOAD_TIMEOUT)
    assert not client.is_model_ready("tampered", "1", client_timeout=INFER_TIMEOUT)
    assert server.running


def test_a_multiclass_model_answers_k_probabilities_per_row(
    repo: Path, server: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    torch.manual_seed(3)
    module = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 3), torch.nn.Softmax(dim=1)).eval()
    exported = _exported(module)
    assert exported.n_outputs == 3
    model_repo.write_version(
        repo, "multi", 1, exported.onnx, {}, n_features=N_FEATURES, n_outputs=3
    )
    client.load_model("multi", client_timeout=LOAD_TIMEOUT)
    x = np.random.default_rng(5).normal(size=(6, N_FEATURES)).astype(np.float32)
    out = _infer(client, "multi", "1", x)
    assert out.shape == (6, 3)
    np.testing.assert_allclose(out, _expected(module, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    client.unload_model("multi", client_timeout=LOAD_TIMEOUT)


def test_restart_on_same_ports(ctr: str, server: TritonServer) -> None:
    url = server.grpc_url
    t0 = time.monotonic()
    server.restart(timeout=120)
    print(f"\ntritonserver restart took {time.monotonic() - t0:.2f}s")
    assert server.grpc_url == url
    c = grpcclient.InferenceServerClient(url)
    try:
        assert c.is_server_ready(client_timeout=INFER_TIMEOUT)
        # Explicit mode: nothing is loaded after a restart until someone asks.
        assert not c.is_model_ready("ctr", "1", client_timeout=INFER_TIMEOUT)
    finally:
        c.close()


def test_kill_then_start_recovers(
    ctr: str, server: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    client.load_model(ctr, client_timeout=LOAD_TIMEOUT)
    shm = Path("/dev/shm")
    assert list(shm.glob(f"{server._shm_prefix}*")), "expected live python-backend regions"
    server.kill()
    assert not server.running
    # SIGKILL skips the python backend's cleanup; kill() removes this server's shm regions.
    assert not list(shm.glob(f"{server._shm_prefix}*"))
    server.start(timeout=120)
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert c.is_server_ready(client_timeout=INFER_TIMEOUT)
        c.load_model(ctr, client_timeout=LOAD_TIMEOUT)
        x = np.ones((3, N_FEATURES), dtype=np.float32)
        np.testing.assert_allclose(
            _infer(c, "ctr", "2", x), _expected(MODULES[2], x), rtol=1e-5, atol=1e-6
        )
    finally:
        c.close()
