"""The whole local stack: Kafka, tritonserver and the Feast repo, with a state file.

``loopmesh infra up`` starts the components as detached processes and records their pids and
addresses in ``<state_dir>/infra.json``; ``down`` and ``status`` read that file. ``loopmesh
run`` uses the same class in the foreground (``up`` in a worker thread it can abort) and stops
everything on exit.

With ``LOOPMESH_KAFKA__SECURITY_PROTOCOL=SSL`` the broker's only client listener is SSL, and
with ``LOOPMESH_INFRA__TLS_CERTFILE``/``…_KEYFILE`` tritonserver serves gRPC over TLS (HTTP
off): both present that certificate, and with ``LOOPMESH_INFRA__TLS_CLIENT_CAFILE`` both
require client certificates (``InfraTlsSettings``). The stack's own clients (topic
declaration, the readiness probes) use the settings the services use:
``LOOPMESH_KAFKA__SSL_*`` and ``LOOPMESH_TRITON_CLIENT__*``.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, SettingsConfigDict

from loopmesh.devstack.kafka import BrokerTls, KafkaBroker
from loopmesh.devstack.process import check_abort, stop_pid
from loopmesh.devstack.triton import PROBE_TIMEOUT, TritonServer
from loopmesh.mesh.bus import declare_topics
from loopmesh.mesh.channels import channel_credentials, channel_options
from loopmesh.mesh.errors import SetupError
from loopmesh.mesh.feature_repo import apply_repo, prepare_repo
from loopmesh.mesh.settings import KafkaSettings, MeshSettings, TritonClientSettings
from loopmesh.mesh.topics import ALL_TOPICS


class InfraTlsSettings(BaseSettings):
    """TLS of the local stack's servers (``LOOPMESH_INFRA__TLS_*``): the Kafka broker's SSL
    listener and tritonserver's gRPC. PEM files; the key unencrypted PKCS#8."""

    model_config = SettingsConfigDict(env_prefix="LOOPMESH_INFRA__", extra="ignore")

    tls_certfile: Path | None = None
    """Certificate of the local broker and tritonserver, for the address they listen on
    (``127.0.0.1`` by default). Needed when ``LOOPMESH_KAFKA__SECURITY_PROTOCOL=SSL``; when
    set, tritonserver serves gRPC over TLS only and its HTTP endpoint is off."""
    tls_keyfile: Path | None = None
    """Its private key."""
    tls_client_cafile: Path | None = None
    """CA of client certificates: when set, Kafka and tritonserver require one (mutual TLS)."""

    @property
    def enabled(self) -> bool:
        return self.tls_certfile is not None and self.tls_keyfile is not None


def _broker_tls(kafka: KafkaSettings, tls: InfraTlsSettings) -> BrokerTls | None:
    """The local broker's TLS from the clients' protocol and the stack's certificate."""
    if kafka.security_protocol == "PLAINTEXT":
        return None
    if kafka.security_protocol != "SSL":
        raise SetupError(
            "kafka.security_protocol",
            f"the local broker serves PLAINTEXT or SSL, not {kafka.security_protocol} "
            "(SASL needs a broker you run yourself)",
        )
    if not tls.enabled or tls.tls_certfile is None or tls.tls_keyfile is None:
        raise SetupError(
            "infra.tls_certfile",
            "LOOPMESH_KAFKA__SECURITY_PROTOCOL=SSL: the local broker needs its certificate "
            "(LOOPMESH_INFRA__TLS_CERTFILE and LOOPMESH_INFRA__TLS_KEYFILE)",
        )
    if kafka.ssl_cafile is None:
        raise SetupError(
            "kafka.ssl_cafile", "the CA that signed LOOPMESH_INFRA__TLS_CERTFILE, for clients"
        )
    return BrokerTls(
        certfile=tls.tls_certfile,
        keyfile=tls.tls_keyfile,
        cafile=kafka.ssl_cafile,
        client_cafile=tls.tls_client_cafile,
    )


def _triton_tls_args(tls: InfraTlsSettings) -> list[str]:
    """tritonserver's TLS flags: gRPC over TLS (mutual with a client CA), HTTP off."""
    if not tls.enabled:
        return []
    args = [
        "--grpc-use-ssl=true",
        f"--grpc-server-cert={tls.tls_certfile}",
        f"--grpc-server-key={tls.tls_keyfile}",
        # LoopMesh speaks gRPC only; a plaintext HTTP API could load and unload models.
        "--allow-http=false",
    ]
    if tls.tls_client_cafile is not None:
        args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={tls.tls_client_cafile}"]
    return args


class _TlsTritonServer(TritonServer):
    """A ``TritonServer`` whose readiness probe dials its TLS gRPC port as inference and
    rollout do (``LOOPMESH_TRITON_CLIENT__*``)."""

    def __init__(self, *args: Any, client: TritonClientSettings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client_settings = client

    def _probe_ready(self) -> bool:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(
            self.grpc_url,
            creds=channel_credentials(self._client_settings),
            channel_args=channel_options(self._client_settings),
        )
        try:
            return bool(client.is_server_ready(client_timeout=PROBE_TIMEOUT))
        finally:
            client.close()


@dataclass
class StackState:
    """What a running local stack looks like from outside."""

    kafka_bootstrap: str
    kafka_pid: int
    triton_grpc: str
    triton_http: str
    triton_metrics: str
    triton_pid: int
    model_repository: str
    feast_repo: str

    def env(self) -> dict[str, str]:
        """Environment that points a service at this stack."""
        return {
            "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": self.kafka_bootstrap,
            "LOOPMESH_TRITON_URL": self.triton_grpc,
            "LOOPMESH_MODEL_REPOSITORY": self.model_repository,
            "LOOPMESH_FEATURES__REPO_PATH": self.feast_repo,
        }


class LocalStack:
    """Starts and stops the local infrastructure described by ``MeshSettings.infra``."""

    def __init__(self, settings: MeshSettings, tls: InfraTlsSettings | None = None) -> None:
        infra = settings.infra
        tls = tls if tls is not None else InfraTlsSettings()
        self.state_dir = infra.state_dir.resolve()
        self.state_file = self.state_dir / "infra.json"
        self.model_repository = settings.model_repository.resolve()
        self.kafka = KafkaBroker(
            self.state_dir / "kafka",
            host=infra.host,
            port=infra.kafka_port,
            tls=_broker_tls(settings.kafka, tls),
        )
        triton_args: dict[str, Any] = dict(
            host=infra.host,
            grpc_port=infra.triton_grpc_port,
            http_port=infra.triton_http_port,
            metrics_port=infra.triton_metrics_port,
        )
        if tls.enabled:
            if not settings.triton_client.tls_enabled:
                raise SetupError(
                    "triton_client.tls_cafile",
                    "tritonserver serves TLS (LOOPMESH_INFRA__TLS_CERTFILE): inference and "
                    "rollout need LOOPMESH_TRITON_CLIENT__TLS_CAFILE (or __TLS=true)",
                )
            self.triton: TritonServer = _TlsTritonServer(
                self.model_repository,
                self.state_dir / "triton",
                extra_args=_triton_tls_args(tls),
                client=settings.triton_client,
                **triton_args,
            )
        else:
            self.triton = TritonServer(
                self.model_repository, self.state_dir / "triton", **triton_args
            )
        self.feast_dir = self.state_dir / "feature_store"
        self.project = settings.project
        self.kafka_settings = settings.kafka.model_copy(
            update={"bootstrap_servers": self.kafka.bootstrap_servers}
        )

    def up(self, abort: threading.Event | None = None) -> StackState:
        """Start every component, declare the topics, apply Feast; idempotent per state dir.

        ``abort``, set from another thread, stops the start-up between steps and inside the
        readiness waits: what was started is stopped and ``StartAborted`` raised, so nothing
        starts any more once a caller has begun to clean up.
        """
        if (existing := self.read_state()) is not None and _alive(existing):
            raise RuntimeError(
                f"a local stack is already running (state {self.state_file}); "
                "run `loopmesh infra down` first"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.model_repository.mkdir(parents=True, exist_ok=True)
        try:
            check_abort(abort, "local stack")
            self.kafka.start(abort=abort)
            check_abort(abort, "local stack")
            asyncio.run(declare_topics(self.kafka_settings, ALL_TOPICS))
            check_abort(abort, "local stack")
            self.triton.start(abort=abort)
            check_abort(abort, "local stack")
            repo = prepare_repo(self.feast_dir, project=self.project)
            apply_repo(repo)
            check_abort(abort, "local stack")
        except BaseException as exc:
            try:
                self.stop()
            except Exception as cleanup:  # keep the start-up error; say what cleanup hit
                exc.add_note(f"stopping the stack after this failed too: {cleanup!r}")
            raise
        state = StackState(
            kafka_bootstrap=self.kafka.bootstrap_servers,
            kafka_pid=_pid(self.kafka.pid),
            triton_grpc=self.triton.grpc_url,
            triton_http=self.triton.http_url,
            triton_metrics=self.triton.metrics_url,
            triton_pid=_pid(self.triton.pid),
            model_repository=str(self.model_repository),
            feast_repo=str(repo),
        )
        self.state_file.write_text(json.dumps(asdict(state), indent=2))
        return state

    def stop(self, hurry: threading.Event | None = None) -> None:
        """Stop the components this object started (foreground use); Kafka stops even if
        stopping tritonserver fails. ``hurry`` set (a second Ctrl-C) shortens every wait."""
        try:
            self.triton.stop(hurry=hurry)
        finally:
            try:
                self.kafka.stop(hurry=hurry)
            finally:
                self.state_file.unlink(missing_ok=True)

    def read_state(self) -> StackState | None:
        try:
            return StackState(**json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None

    def down(self) -> bool:
        """Stop a stack started by an earlier ``up``; False when none was recorded."""
        state = self.read_state()
        if state is None:
            return False
        stop_pid(state.triton_pid)
        stop_pid(state.kafka_pid)
        self.state_file.unlink(missing_ok=True)
        return True


def kafka_settings_for(state: StackState, base: KafkaSettings) -> KafkaSettings:
    return base.model_copy(update={"bootstrap_servers": state.kafka_bootstrap})


def _pid(pid: int | None) -> int:
    if pid is None:
        raise RuntimeError("component has no pid after start")
    return pid


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _alive(state: StackState) -> bool:
    return process_alive(state.kafka_pid) or process_alive(state.triton_pid)
