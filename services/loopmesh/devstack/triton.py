"""The real ``tritonserver`` binary shipped in the nvidia-pytriton wheel, run as a child process.

The wheel bundles Triton (2.51) with only the python backend, plus one backend stub per Python
version. The stub embeds libpython, so it must match the running interpreter and must see the
same ``site-packages`` (numpy, torch) as this process; see ``_environment`` for how.
"""

from __future__ import annotations

import contextlib
import filecmp
import importlib.util
import os
import shutil
import signal
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from loopmesh.devstack.process import ManagedProcess, free_port, group_alive, log_tail
from loopmesh.mesh.errors import SetupError

# Generous: readiness takes ~0.25s here (no models load at start), but cold disks are slow.
DEFAULT_START_TIMEOUT = 120.0
# gRPC probe timeout: a server stuck loading a library must not block the readiness loop.
PROBE_TIMEOUT = 2.0


def pytriton_root() -> Path:
    """The installed ``pytriton`` package directory (found without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SetupError("nvidia-pytriton is not installed; it ships the tritonserver binary")
    return Path(next(iter(spec.submodule_search_locations)))


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


class TritonServer:
    """One ``tritonserver`` in explicit model-control mode, serving ``model_repository``.

    ``work_dir`` holds the backend directory (a copy with the matching stub) and the log.
    Ports default to free ones, chosen once, so ``restart`` comes back on the same URLs.
    """

    def __init__(
        self,
        model_repository: Path,
        work_dir: Path,
        *,
        host: str = "127.0.0.1",
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        extra_args: Sequence[str] = (),
        binary: Path | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.work_dir = Path(work_dir).resolve()
        self.host = host
        self.grpc_port = grpc_port if grpc_port is not None else free_port(host)
        self.http_port = http_port if http_port is not None else free_port(host)
        self.metrics_port = metrics_port if metrics_port is not None else free_port(host)
        self.extra_args = list(extra_args)
        self._root = pytriton_root()
        self.binary = (
            Path(binary) if binary is not None else self._root / "tritonserver/bin/tritonserver"
        )
        # Unique per instance: the python backend names its /dev/shm regions with this prefix,
        # and two servers on one machine must not share regions.
        self._shm_prefix = f"loopmesh_{uuid.uuid4().hex[:12]}_"
        self._proc: ManagedProcess | None = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "tritonserver.log"

    @property
    def backend_directory(self) -> Path:
        return self.work_dir / "backends"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    # -- lifecycle -------------------------------------------------------------------------

    def start(
        self, timeout: float = DEFAULT_START_TIMEOUT, *, abort: threading.Event | None = None
    ) -> None:
        """Launch tritonserver and wait until gRPC ``is_server_ready`` answers True.

        Once ``abort`` is set the readiness wait kills the server and raises ``StartAborted``.
        """
        if self.running:
            raise SetupError(f"tritonserver is already running (pid {self.pid})")
        if not self.binary.is_file() or not os.access(self.binary, os.X_OK):
            raise SetupError(
                f"tritonserver binary not found or not executable at {self.binary}; "
                "is nvidia-pytriton installed for this interpreter?\n"
                f"log {self.log_path}:\n{log_tail(self.log_path)}"
            )
        if not self.model_repository.is_dir():
            raise SetupError(f"model repository {self.model_repository} is not a directory")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_backends()
        self._proc = ManagedProcess(
            "tritonserver", self._argv(), log_path=self.log_path, env=self._environment()
        )
        self._proc.start()
        self._proc.wait_ready(self._probe_ready, timeout=timeout, abort=abort)

    def stop(self, timeout: float = 30.0, *, hurry: threading.Event | None = None) -> None:
        """Graceful stop (SIGTERM: Triton unloads models, stubs exit), SIGKILL after timeout.

        The whole process group is stopped, stubs included, even if the server died first;
        ``hurry`` set (a second Ctrl-C) shortens the wait to ``HURRY_GRACE``.
        """
        if self._proc is not None:
            try:
                self._proc.stop(timeout=timeout, hurry=hurry)
            finally:
                self._reap_group()

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once: a crash, for fault tests."""
        if self._proc is not None:
            self._proc.kill()
            self._reap_group()

    def restart(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Stop (if running) and start again on the same ports; models must be reloaded."""
        self.stop()
        self.start(timeout=timeout)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    # -- internals -------------------------------------------------------------------------

    def _argv(self) -> list[str]:
        return [
            str(self.binary),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={self.backend_directory}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            # No GPU metrics: on a CPU host NVML is absent and it only adds warnings.
            "--allow-gpu-metrics=false",
            # Our config.pbtxt is complete; auto-complete would start an extra stub per load.
            "--disable-auto-complete-config",
            *self.extra_args,
        ]

    def _prepare_backends(self) -> None:
        """A private backend directory: the bundled backends plus this Python's stub."""
        stub = self._root / "tritonserver/python_backend_stubs" / _python_tag()
        stub = stub / "triton_python_backend_stub"
        if not stub.is_file():
            raise SetupError(
                f"no python backend stub for Python {_python_tag()} in the pytriton wheel ({stub})"
            )
        src_root = self._root / "tritonserver/backends"
        for src in src_root.rglob("*"):
            if src.is_file() and "__pycache__" not in src.parts:
                _sync_file(src, self.backend_directory / src.relative_to(src_root))
        _sync_file(stub, self.backend_directory / "python" / "triton_python_backend_stub")

    def _reap_group(self, timeout: float = 5.0) -> None:
        """Wait briefly for the stubs (same process group) to die, SIGKILL any that do not,
        then drop our shm regions.

        SIGKILL leaves the python backend's /dev/shm regions behind; the prefix is unique to
        this instance, so removing them cannot touch another server's.
        """
        pgid = self.pid
        if pgid is not None:
            deadline = time.monotonic() + timeout
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if group_alive(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
        shm = Path("/dev/shm")  # noqa: S108 - where shm_open(3) regions live on Linux
        if shm.is_dir():
            for region in shm.glob(f"{self._shm_prefix}*"):
                with contextlib.suppress(OSError):
                    region.unlink()

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The server's bundled libs, and the libpython of *this* interpreter for the stub
        # (otherwise the stub binds to whatever libpython3.11 the system has).
        libs = [str(self._root.parent / "nvidia_pytriton.libs")]
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            libs.append(str(libdir))
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        # The embedded interpreter locates its prefix via ``python3`` on PATH; without the venv
        # first it imports another numpy and silently returns empty outputs.
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        return env

    def _probe_ready(self) -> bool:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            return bool(client.is_server_ready(client_timeout=PROBE_TIMEOUT))
        finally:
            client.close()


def _sync_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` unless identical; replace by rename, never overwrite in place.

    A running (or just killed, still exiting) server maps these files: writing into them
    would crash it or fail with ETXTBSY, while a rename leaves the old inode intact.
    """
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)
