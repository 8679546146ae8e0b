"""The model registry on disk, shared by trainer, rollout and inference (a Triton repository).

Layout::

    <repo>/<model>/config.pbtxt                  INPUT__0 [n] -> OUTPUT__0 [k]; backend "python"
                                                 (default) or "onnxruntime" (NVIDIA container)
    <repo>/<model>/<version>/model.onnx          the graph (trainer/export.py)
    <repo>/<model>/<version>/weights.safetensors the trained state dict, for warm starts
    <repo>/<model>/<version>/metadata.json       metrics, feature_names, created_at, parent_version,
                                                 format "onnx", n_features, n_outputs, sha256 of
                                                 model.onnx, weights_sha256
    <repo>/<model>/<version>/model.py            copy of mesh/triton_python_model.py

Both backends serve the same version directory: the python backend runs ``model.py`` (which
checks the sha256 and runs ``model.onnx`` with onnxruntime), the onnxruntime backend loads
``model.onnx`` directly and ignores the rest (the rollout checks the sha256 before every load).

A version directory appears only complete: it is written under a dot-named temporary directory
in the model directory (Triton ignores non-numeric names) and renamed into place. Versions are
immutable; publishing an existing version is an error. Model names and versions that come from
requests go through ``validate_model_name`` / ``validate_version`` before touching any path.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import os
import re
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "metadata.json"
FORMAT = "onnx"
BACKEND_FILE = "model.py"
CONFIG_FILE = "config.pbtxt"
INPUT_NAME = "INPUT__0"
OUTPUT_NAME = "OUTPUT__0"
BACKENDS = ("python", "onnxruntime")
"""Triton backends a config.pbtxt can name: ``python`` (``model.py`` running onnxruntime; the
only one in the nvidia-pytriton wheel) or ``onnxruntime`` (Triton's own, in the NVIDIA
container: CPU, CUDA or TensorRT)."""

# Letters first, then letters/digits/_/- : no dots, slashes or anything a shell or path treats
# specially. 64 chars keeps names usable as Kafka keys and metric labels too.
MODEL_NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
"""The one rule for a model name: a Triton repository directory, so no dots or slashes."""
_MODEL_NAME_RE = re.compile(MODEL_NAME_PATTERN)
# Triton versions are positive integers; no sign, no leading zeros (so "01" != "1" can't alias).
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: error messages echo what a client sent,
    and a gRPC status over 16 KiB never reaches the client (it gets RESOURCE_EXHAUSTED)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def validate_model_name(name: object) -> str:
    """Return ``name`` if it is a safe model name, else raise ValueError."""
    if not isinstance(name, str) or not _MODEL_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid model name {shown(name)}: expected {_MODEL_NAME_RE.pattern}")
    return name


def validate_version(version: object) -> int:
    """Return ``version`` as a positive int (from an int or a decimal string), else ValueError."""
    # bool is an int subclass; True must not silently mean version 1.
    if isinstance(version, int) and not isinstance(version, bool):
        text = str(version)
    elif isinstance(version, str):
        text = version
    else:
        raise ValueError(f"invalid model version {shown(version)}: expected a positive integer")
    if not _VERSION_RE.fullmatch(text):
        raise ValueError(f"invalid model version {shown(version)}: expected a positive integer")
    return int(text)


def model_dir(repo: Path, model: str) -> Path:
    return Path(repo) / validate_model_name(model)


def version_dir(repo: Path, model: str, version: int | str) -> Path:
    return model_dir(repo, model) / str(validate_version(version))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def backend_model_source() -> bytes:
    """The python-backend model source that every version directory gets as ``model.py``."""
    return (
        importlib.resources.files("loopmesh.mesh").joinpath("triton_python_model.py").read_bytes()
    )


def render_config(
    model: str,
    *,
    n_features: int,
    n_outputs: int = 1,
    max_batch_size: int = 256,
    backend: str = "python",
) -> str:
    """config.pbtxt serving every version present (explicit loads) with ``backend``.

    ``python`` runs one CPU instance of ``model.py`` (it uses CUDA itself when its onnxruntime
    has it); ``onnxruntime`` lets Triton place the instance (a GPU when there is one).
    """
    validate_model_name(model)
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if n_outputs < 1:
        raise ValueError(f"n_outputs must be >= 1, got {n_outputs}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {shown(backend)}")
    if backend == "python":
        placement = """\
instance_group [
  {
    count: 1
    kind: KIND_CPU
  }
]
"""
    else:
        placement = f"""\
default_model_filename: "{MODEL_FILE}"
instance_group [
  {{
    count: 1
  }}
]
"""
    return f"""\
name: "{model}"
backend: "{backend}"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {n_features} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {n_outputs} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 500
}}
{placement}version_policy: {{ all {{ }} }}
"""


def write_version(
    repo: Path,
    model: str,
    version: int,
    model_path_or_bytes: Path | str | bytes,
    metadata: dict[str, Any],
    *,
    n_features: int,
    n_outputs: int = 1,
    weights: bytes | None = None,
    max_batch_size: int = 256,
    backend: str = "python",
) -> Path:
    """Publish ``version`` of ``model`` atomically and refresh config.pbtxt; return its dir.

    ``model_path_or_bytes`` is the ONNX graph (``model.onnx``); ``weights``, when given, the
    trained state dict as safetensors (``weights.safetensors``). ``metadata`` is stored with
    ``format``, ``sha256`` (of model.onnx), ``weights_sha256``, ``n_features``, ``n_outputs``,
    ``model`` and ``version`` set here (and ``created_at`` if absent). Raises FileExistsError if
    the version already exists and ValueError on invalid names, on a feature count that
    contradicts ``feature_names``, or on a feature or output count that differs from versions
    already published (they share one config.pbtxt).
    """
    version = validate_version(version)
    mdir = model_dir(repo, model)
    final = mdir / str(version)
    if final.exists():
        raise FileExistsError(f"{model} version {version} already exists at {final}")
    if isinstance(model_path_or_bytes, bytes):
        payload = model_path_or_bytes
    else:
        payload = Path(model_path_or_bytes).read_bytes()
    if not payload:
        raise ValueError("the model payload is empty")
    if weights is not None and not weights:
        raise ValueError("the weights payload is empty")
    feature_names = metadata.get("feature_names")
    # The input row: the numeric features, then one column per categorical input.
    width = len(feature_names or ()) + len(metadata.get("categorical") or ())
    if feature_names is not None and width != n_features:
        raise ValueError(
            f"{len(feature_names)} feature_names and "
            f"{len(metadata.get('categorical') or ())} categorical inputs given "
            f"but n_features={n_features}"
        )
    for other in list_versions(repo, model):
        other_meta = read_metadata(repo, model, other)
        for key, value in (("n_features", n_features), ("n_outputs", n_outputs)):
            other_value = other_meta.get(key, 1 if key == "n_outputs" else None)
            if other_value is not None and other_value != value:
                raise ValueError(
                    f"{model} version {other} has {key}={other_value}, not {value}; "
                    "versions of one model share config.pbtxt, so publish under a new model name"
                )
    config = render_config(
        model,
        n_features=n_features,
        n_outputs=n_outputs,
        max_batch_size=max_batch_size,
        backend=backend,
    )

    meta = dict(metadata)
    meta.setdefault("created_at", datetime.now(UTC).isoformat())
    meta.setdefault("parent_version", None)
    meta.update(
        model=model,
        version=version,
        format=FORMAT,
        n_features=n_features,
        n_outputs=n_outputs,
        sha256=hashlib.sha256(payload).hexdigest(),
        weights_sha256=hashlib.sha256(weights).hexdigest() if weights is not None else None,
    )

    mdir.mkdir(parents=True, exist_ok=True)
    # Config first: Triton can only load a version whose model dir has a config anyway.
    _atomic_write(mdir / CONFIG_FILE, config.encode())
    # Not mkdtemp: its 0700 mode would survive the rename and hide the version from readers
    # running as another user; mkdir honours the umask like every other file here.
    tmp = mdir / f".tmp-{version}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        _write_synced(tmp / MODEL_FILE, payload)
        if weights is not None:
            _write_synced(tmp / WEIGHTS_FILE, weights)
        _write_synced(tmp / METADATA_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())
        _write_synced(tmp / BACKEND_FILE, backend_model_source())
        fsync_dir(tmp)
        # rename(2) of a directory fails on a non-empty target, so a concurrent publisher of
        # the same version loses cleanly instead of clobbering.
        try:
            os.rename(tmp, final)
        except OSError as exc:
            raise FileExistsError(f"{model} version {version} was published concurrently") from exc
        fsync_dir(mdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_versions(repo: Path, model: str) -> list[int]:
    """Published versions of ``model``, ascending; temp dirs and stray entries are ignored."""
    mdir = model_dir(repo, model)
    if not mdir.is_dir():
        return []
    versions = []
    for entry in mdir.iterdir():
        if entry.is_dir() and _VERSION_RE.fullmatch(entry.name):
            versions.append(int(entry.name))
    return sorted(versions)


def read_metadata(repo: Path, model: str, version: int | str) -> dict[str, Any]:
    """The metadata.json of one version (FileNotFoundError if it is not published)."""
    data = json.loads((version_dir(repo, model, version) / METADATA_FILE).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{model}/{version}/{METADATA_FILE} is not a JSON object")
    return data


def verify_sha256(repo: Path, model: str, version: int | str) -> bool:
    """True if model.onnx matches the sha256 recorded in its metadata.json (and so does
    weights.safetensors, where one is recorded). A missing file is False."""
    meta = read_metadata(repo, model, version)
    vdir = version_dir(repo, model, version)
    expected = meta.get("sha256")
    if not isinstance(expected, str) or not _SHA256_RE.fullmatch(expected):
        return False
    if meta.get("format", FORMAT) != FORMAT:
        return False
    try:
        if sha256_file(vdir / MODEL_FILE) != expected:
            return False
        weights = meta.get("weights_sha256")
        if weights is not None:
            if not isinstance(weights, str) or not _SHA256_RE.fullmatch(weights):
                return False
            return sha256_file(vdir / WEIGHTS_FILE) == weights
    except FileNotFoundError:
        return False
    return True


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; Triton may run as another user
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (a rename, a new file or folder in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
