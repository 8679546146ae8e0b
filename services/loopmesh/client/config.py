"""The one configuration of a LoopMesh client: where the doors are, how to reach them, and
how hard to try.

``ClientConfig`` is a pydantic-settings model like the mesh's own settings: every field can
be given as an argument or through the environment under ``LOOPMESH_CLIENT__`` (nested with
``__``), arguments winning::

    LOOPMESH_CLIENT__INGESTION_URL=ingest.example.com:443
    LOOPMESH_CLIENT__TLS=true
    LOOPMESH_CLIENT__TOKEN=...                     # bearer token (16 characters at least)
    LOOPMESH_CLIENT__RETRY__MAX_ATTEMPTS=8
    LOOPMESH_CLIENT__BATCH__LINGER_S=0.02

``ClientConfig(_env_prefix="MYAPP_LOOPMESH__")`` reads another prefix. The channels are built
by the mesh's one channel factory (``loopmesh.mesh.channels``) from ``channel_settings()``
and ``auth()``; a half-configured TLS pair or a short token is refused here, when the
configuration is made, naming the field.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loopmesh.mesh import channels
from loopmesh.mesh.auth import AuthSettings
from loopmesh.mesh.settings import GrpcClientSettings

ENV_PREFIX = "LOOPMESH_CLIENT__"


class RetryPolicy(BaseModel):
    """Bounded retries with exponential backoff and jitter.

    Retried: UNAVAILABLE always (the doors answer it when Kafka did not acknowledge, and the
    transport when a connection drops or cannot be made), DEADLINE_EXCEEDED only for calls
    that are safe to resend: ingest and feedback, whose event ids make the doors drop a
    repeat (``retry_deadline_exceeded``). Every other status is final at once.
    """

    max_attempts: int = Field(default=5, ge=1)
    """Attempts of one call (or one batch, or one stream window), the first included."""
    initial_backoff_s: float = Field(default=0.1, gt=0)
    """Wait before the first retry."""
    max_backoff_s: float = Field(default=5.0, gt=0)
    """Longest wait between two attempts."""
    multiplier: float = Field(default=2.0, ge=1.0)
    """Growth of the wait from one retry to the next."""
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)
    """Share of each wait drawn at random (0: none, 1: anywhere between 0 and the wait), so
    many clients cut off together do not come back together."""
    total_timeout_s: float | None = Field(default=60.0, gt=0)
    """No retry starts once this long has passed since the first attempt; None: no limit
    beyond ``max_attempts``."""
    retry_deadline_exceeded: bool = True
    """Also retry DEADLINE_EXCEEDED on calls that resend the same event ids (not Predict)."""

    @model_validator(mode="after")
    def _backoffs_ordered(self) -> Self:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be at least initial_backoff_s")
        return self

    def backoff(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the first retry)."""
        if retry < 1:
            raise ValueError("retry counts from 1")
        # Capped before raising to a large power, so many retries never overflow.
        exponent = min(retry - 1, 64)
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**exponent)
        return base * (1.0 - self.jitter * rand())


class BatchPolicy(BaseModel):
    """How events and feedback are grouped into requests, and how much a sender buffers."""

    max_items: int = Field(default=10_000, ge=1)
    """Events in one request: the doors' limit (``LOOPMESH_INGESTION__LIMITS__MAX_BATCH_ITEMS``,
    10,000 by default); more in one request is refused RESOURCE_EXHAUSTED."""
    max_bytes: int = Field(default=3 * 1024 * 1024, ge=1024)
    """Encoded size of one request at most, below the doors' message limit
    (``…__SERVER__MAX_MESSAGE_BYTES``, 4 MiB by default). An event larger than this alone
    goes in a request of its own."""
    linger_s: float = Field(default=0.05, ge=0)
    """How long a buffered sender waits for a batch to fill before it sends what it has."""
    buffer_items: int = Field(default=100_000, ge=1)
    """Items a buffered sender holds at most (waiting and in flight); ``send`` waits for room
    beyond it: backpressure, never unbounded growth."""
    stream_window_items: int = Field(default=50_000, ge=1)
    """``ingest_stream`` cuts its input into IngestStream calls of at most this many events,
    and keeps one call's events for resending until the door answered it."""


class ClientConfig(BaseSettings):
    """Addresses of the doors, TLS, token, deadlines, retries and batching of one client."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid"
    )

    ingestion_url: str = "127.0.0.1:50051"
    """``host:port`` of the IngestionService."""
    feedback_url: str = "127.0.0.1:50052"
    """``host:port`` of the FeedbackService."""
    inference_url: str = "127.0.0.1:50054"
    """``host:port`` of the InferenceService (the gateway's public port)."""
    token: SecretStr | None = None
    """Bearer token sent on every call (``authorization: Bearer …``); at least 16 characters.
    Give it through the environment or a secret store, never in code."""
    tls: bool = False
    """Use TLS, verifying the servers against the system roots (or ``tls_cafile``). TLS is
    also on whenever one of the ``tls_*`` files is set."""
    tls_cafile: Path | None = None
    """Root CA bundle (PEM) to verify the servers with instead of the system roots."""
    tls_certfile: Path | None = None
    """Client certificate (PEM) for mutual TLS; needs ``tls_keyfile``."""
    tls_keyfile: Path | None = None
    """Key (PEM) of the client certificate; needs ``tls_certfile``."""
    server_name_override: str | None = None
    """Name expected in the servers' certificates instead of the host of the address."""
    deadline_s: float = Field(default=15.0, gt=0)
    """Deadline of one attempt of a unary call (Ingest, Submit, Predict) that names none
    itself. Above the doors' Kafka acknowledgement timeout (10 s), so a slow broker is
    answered UNAVAILABLE by the door rather than cut short here."""
    stream_deadline_s: float = Field(default=300.0, gt=0)
    """Deadline of one IngestStream or SubmitStream call that names none itself."""
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest message a channel sends or receives."""
    tracing: bool = True
    """Add the OpenTelemetry client interceptor (each call a CLIENT span carrying the trace
    context to the door; spans go wherever the application's tracer provider sends them)."""
    retry: RetryPolicy = RetryPolicy()
    """Retries of failed calls."""
    batch: BatchPolicy = BatchPolicy()
    """Request sizes and the buffered senders' linger and bound."""

    @model_validator(mode="after")
    def _usable(self) -> Self:
        channels.check(self.channel_settings())  # InvalidArgument is a ValueError
        self.auth()
        return self

    def channel_settings(self) -> GrpcClientSettings:
        """The mesh channel factory's settings for every door of this client."""
        return GrpcClientSettings(
            tls=self.tls,
            tls_cafile=self.tls_cafile,
            tls_certfile=self.tls_certfile,
            tls_keyfile=self.tls_keyfile,
            server_name_override=self.server_name_override,
            timeout_s=self.deadline_s,
            max_message_bytes=self.max_message_bytes,
        )

    def auth(self) -> AuthSettings:
        """The token as the channel factory takes it (checked for length)."""
        return AuthSettings(client_token=self.token)

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel arguments on top of the factory's: reconnect quickly, so a retry after a
        restart finds the door again within the retry policy's waits."""
        # Not grpc.min_reconnect_backoff_ms: grpc-core also takes it as the shortest time a
        # connection attempt (TLS handshake included) may take, 20 s by default.
        initial_ms = max(1, round(self.retry.initial_backoff_s * 1000))
        max_ms = max(initial_ms, round(self.retry.max_backoff_s * 1000))
        return [
            ("grpc.initial_reconnect_backoff_ms", initial_ms),
            ("grpc.max_reconnect_backoff_ms", max_ms),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # One connection per client, not shared with other channels of the process.
            ("grpc.use_local_subchannel_pool", 1),
        ]
