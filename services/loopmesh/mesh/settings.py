"""Settings shared by every service: one ``LOOPMESH_`` prefix, nested per scope.

Each service defines its own ``BaseSettings`` subclass with ``env_prefix="LOOPMESH_"`` and a
field per scope, so ``LOOPMESH_KAFKA__BOOTSTRAP_SERVERS`` and ``LOOPMESH_INGESTION__PORT``
resolve the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loopmesh.mesh.auth import AuthSettings
from loopmesh.mesh.privacy import PrivacySettings


class KafkaSettings(BaseModel):
    """How to reach Kafka and how clients behave."""

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated ``host:port`` list of brokers."""
    client_id: str = "loopmesh"
    """Prefix of the Kafka client id; the service name is appended."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """Protocol of a secured cluster."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    """SASL mechanism when ``security_protocol`` is one of the SASL ones."""
    sasl_username: str | None = None
    """SASL user name."""
    sasl_password: SecretStr | None = None
    """SASL password (from the environment or a secret store, never the repo)."""
    ssl_cafile: Path | None = None
    """CA bundle that signed the brokers' certificates."""
    ssl_certfile: Path | None = None
    """Client certificate for mutual TLS with the brokers."""
    ssl_keyfile: Path | None = None
    """Key of the client certificate."""
    default_partitions: int = Field(default=3, ge=1)
    """Partitions for topics this project declares at start-up."""
    replication_factor: int = Field(default=1, ge=1)
    """Replication factor for declared topics (1 on one machine, 3 in a cluster)."""
    min_insync_replicas: int | None = Field(default=None, ge=1)
    """``min.insync.replicas`` of declared topics (and their DLQs): replicas that must have an
    ``acks=all`` write, as every LoopMesh producer sends them, before the broker acknowledges
    it; with fewer in sync the broker refuses the write (the doors answer UNAVAILABLE). None
    leaves the broker's default. In a cluster of three with ``replication_factor`` 3, 2: one
    broker can die without a write being lost or refused. At most ``replication_factor``.
    Topics faust creates for the joiner's table take the broker's default."""
    request_timeout_ms: int = Field(default=15_000, ge=1_000)
    """Upper bound on one Kafka request; keeps failures fast instead of hanging."""

    @model_validator(mode="after")
    def _insync_within_replicas(self) -> Self:
        if self.min_insync_replicas is not None and (
            self.min_insync_replicas > self.replication_factor
        ):
            raise ValueError(
                f"min_insync_replicas ({self.min_insync_replicas}) exceeds replication_factor "
                f"({self.replication_factor}): no write could ever be acknowledged"
            )
        return self


class GrpcServerSettings(BaseModel):
    """Where a gRPC server listens and how it secures itself."""

    host: str = "127.0.0.1"
    """Interface to bind; ``0.0.0.0`` inside containers."""
    port: int = Field(default=0, ge=0, le=65535)
    """Port to bind; 0 lets the OS choose (tests)."""
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest request accepted; larger ones get RESOURCE_EXHAUSTED."""
    tls_certfile: Path | None = None
    """Server certificate (PEM); TLS is on when this and the key are set."""
    tls_keyfile: Path | None = None
    """Server key (PEM)."""
    tls_client_cafile: Path | None = None
    """CA for client certificates; when set, clients must present one (mutual TLS)."""
    grace_seconds: float = Field(default=5.0, ge=0)
    """How long in-flight calls may finish on shutdown."""
    max_concurrent_rpcs: int = Field(default=2048, ge=1)
    """Calls (streams included) served at once; one more is refused RESOURCE_EXHAUSTED at
    once instead of queueing in memory without bound."""


class GrpcClientSettings(BaseModel):
    """How a client channel reaches one gRPC server: TLS, client certificate and limits.

    ``loopmesh.mesh.channels`` builds every client channel from one of these; the bearer
    token comes from ``AuthSettings.client_token`` (``LOOPMESH_AUTH__CLIENT_TOKEN``).
    """

    tls: bool = False
    """Use TLS and verify the server against the system's root CAs (or ``tls_cafile``).
    TLS is also on whenever one of the ``tls_*`` files is set."""
    tls_cafile: Path | None = None
    """Root CA bundle (PEM) to verify the server with instead of the system roots."""
    tls_certfile: Path | None = None
    """Client certificate (PEM) for mutual TLS; needs ``tls_keyfile``."""
    tls_keyfile: Path | None = None
    """Key (PEM) of the client certificate; needs ``tls_certfile``."""
    server_name_override: str | None = None
    """Name to expect in the server's certificate instead of the target's host (self-signed
    test certificates, servers addressed by IP). TLS only."""
    timeout_s: float | None = Field(default=None, gt=0)
    """Deadline given to calls that set none themselves; None leaves them without one."""
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest message this channel sends or receives."""

    @property
    def tls_enabled(self) -> bool:
        """Whether the channel uses TLS (``tls`` or any ``tls_*`` file set)."""
        files = (self.tls_cafile, self.tls_certfile, self.tls_keyfile)
        return self.tls or any(f is not None for f in files)


class TritonClientSettings(GrpcClientSettings):
    """``GrpcClientSettings`` of the channels to tritonserver: room for batches of tensors."""

    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest message this channel sends or receives."""


class TelemetrySettings(BaseModel):
    """OpenTelemetry export."""

    service_namespace: str = "loopmesh"
    """``service.namespace`` resource attribute."""
    otlp_endpoint: str | None = None
    """OTLP collector endpoint; when unset spans stay in-process."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the Prometheus metrics endpoint; None disables it."""
    metrics_host: str = "127.0.0.1"
    """Interface of the Prometheus metrics endpoint."""


class InfraSettings(BaseModel):
    """The local stack that ``loopmesh infra up`` starts on one machine."""

    state_dir: Path = Path(".loopmesh")
    """Where data, logs and the state file of the local stack live."""
    host: str = "127.0.0.1"
    """Loopback address every local component binds."""
    kafka_port: int | None = None
    """Kafka listener port; chosen free when unset."""
    triton_grpc_port: int | None = None
    """tritonserver gRPC port; chosen free when unset."""
    triton_http_port: int | None = None
    """tritonserver HTTP port; chosen free when unset."""
    triton_metrics_port: int | None = None
    """tritonserver metrics port; chosen free when unset."""


class MeshSettings(BaseSettings):
    """Settings every process reads; services extend this with their own scope."""

    model_config = SettingsConfigDict(
        env_prefix="LOOPMESH_", env_nested_delimiter="__", extra="ignore"
    )

    kafka: KafkaSettings = KafkaSettings()
    """Kafka connection."""
    auth: AuthSettings = AuthSettings()
    """Token auth on every gRPC server (off when no tokens are set)."""
    telemetry: TelemetrySettings = TelemetrySettings()
    """Tracing and metrics export."""
    privacy: PrivacySettings = PrivacySettings()
    """Entity id pseudonymisation. Every service that takes raw entity ids (ingestion,
    inference's Predict, features' DeleteEntity) maps them with this one key, so one raw id
    has one pseudonym everywhere."""
    infra: InfraSettings = InfraSettings()
    """Local stack."""
    project: Path | None = None
    """The user's project (``LOOPMESH_PROJECT``): a Feast repository declaring the entities
    and stream feature views LoopMesh computes. Unset: the default project, the repository's
    ``feature_store/``. ``loopmesh run --project DIR`` sets it for every process it starts."""
    triton_url: str = "127.0.0.1:8001"
    """tritonserver gRPC address."""
    triton_client: TritonClientSettings = TritonClientSettings()
    """How inference and rollout reach tritonserver (``LOOPMESH_TRITON_CLIENT__*``); plaintext
    by default, Triton usually listening on loopback beside them. No token is sent to it."""
    model_repository: Path = Path(".loopmesh/models")
    """Triton model repository (shared by trainer, rollout and tritonserver)."""
