"""Settings of the features service: ``LOOPMESH_FEATURES__*`` on top of the mesh settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

from loopmesh.mesh.intake import EVENT_LATENESS_S
from loopmesh.mesh.settings import GrpcServerSettings, MeshSettings
from loopmesh.mesh.topics import ENTITIES_ERASED, EVENTS_RAW


class StreamTuning(BaseModel):
    """Consumer-group timing of the fold (tests shorten it so joins are fast)."""

    session_timeout_s: float = Field(default=30.0, ge=1.0)
    """A worker silent this long leaves the group and its partitions move (Kafka's minimum
    is the broker's ``group.min.session.timeout.ms``, 6 s by default)."""
    heartbeat_interval_s: float = Field(default=3.0, gt=0)
    """How often the worker tells the group it is alive (well below the session timeout)."""
    rebalance_timeout_s: float = Field(default=60.0, ge=1.0)
    """How long a rebalance waits for members to rejoin (also the longest a batch may take,
    state recovery of newly assigned partitions included)."""


class DataPlaneScope(BaseModel):
    """The native data plane (``loopmesh-dataplane`` in features mode) on the public port."""

    enabled: bool = True
    """Serve ``GetOnlineFeatures`` from the Go data plane, which reads the online store itself
    (the other calls are proxied to this process). False: this process serves the port alone
    (a host without the binary)."""
    binary: Path | None = None
    """The executable; unset: ``loopmesh-dataplane`` beside this Python (``make deps`` puts it
    there), else on ``PATH``."""
    backend_port: int = Field(default=0, ge=0, le=65535)
    """Loopback port of this process' own gRPC server (GetFeatureSchema, DeleteEntity,
    health), which the data plane proxies to; 0 picks a free one."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Prometheus port of the data plane (on ``telemetry.metrics_host``); None: none."""
    memory_limit: str | None = Field(default=None, pattern=r"^[0-9]+(B|KiB|MiB|GiB|TiB)?$")
    """Go's soft heap limit for the data plane (``GOMEMLIMIT``, e.g. ``256MiB``); unset: its
    own default of 1 GiB. Keep it well inside a container limit the two processes share."""
    max_concurrent_streams: int = Field(default=1024, ge=1)
    """Concurrent calls per client connection on the public port."""
    stats_interval_s: float = Field(default=0.5, gt=0)
    """How often its answered calls are drained into this process's RPC metrics."""
    start_timeout_s: float = Field(default=20.0, gt=0)
    """How long the data plane may take to bind its ports."""
    stop_timeout_s: float = Field(default=15.0, gt=0)
    """How long it may take to finish in-flight calls on shutdown before it is killed."""
    admin_timeout_s: float = Field(default=5.0, gt=0)
    """Deadline of one call to its loopback admin API."""


class FeaturesScope(BaseModel):
    """What the features service alone reads."""

    server: GrpcServerSettings = GrpcServerSettings(port=50053)
    """Where FeatureService listens (the data plane, when enabled)."""
    dataplane: DataPlaneScope = DataPlaneScope()
    """The native data plane (``LOOPMESH_FEATURES__DATAPLANE__*``)."""
    repo_path: Path = Path(".loopmesh/feature_store")
    """Applied Feast repo (``feature_store.yaml`` and registry), as ``loopmesh infra up``
    prepares it."""
    online_store: Literal["sqlite", "redis"] = "sqlite"
    """Online store: the repo's SQLite file, or Redis at ``redis_url``."""
    redis_url: SecretStr | None = None
    """``redis://[user:password@]host[:port][/db]`` (``rediss://`` for TLS) when the online
    store is Redis."""
    run_server: bool = True
    """Serve FeatureService in this process."""
    run_agents: bool = True
    """Run the stream agents (events -> Feast) in this process."""
    app_id: str = Field(default="loopmesh-features", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The consumer group and the prefix of its own topics: the state's changelog
    (``<app_id>-entity_state-changelog``) and the re-keyed events (``<app_id>-rekeyed``)."""
    events_topic: str = EVENTS_RAW.name
    """Topic of InteractionEvents (tests use a unique one)."""
    erasures_topic: str = ENTITIES_ERASED.name
    """Compacted topic of EntityErased events (tests use a unique one)."""
    push_batch_size: int = Field(default=500, ge=1)
    """Most events folded before their entities' rows are pushed to the online store."""
    push_batch_s: float = Field(default=0.05, gt=0)
    """Longest an event waits for its batch to fill before the batch is pushed."""
    push_retry_s: float = Field(default=1.0, gt=0)
    """Pause before retrying a push the online store refused (the batch is retried, never
    dropped; its offsets are not committed meanwhile)."""
    allowed_lateness_s: float = Field(default=EVENT_LATENESS_S, ge=0)
    """Allowed lateness of a view whose source sets no ``watermark_delay_threshold``: an
    event older than the view's newest event by more is late (counted in
    ``loopmesh_features_late_events_total``, reported to the events topic's DLQ, not folded)."""
    dedup_ids: int = Field(default=1000, ge=0, le=20_000)
    """Event ids each entity remembers (its newest accepted): a copy of an event written
    again under the same id is recognised among them. Kafka redeliveries are recognised by
    offset, whatever this is. Bounds the state: about 40 bytes per id."""
    stale_after_s: float | None = Field(default=None, gt=0)
    """Values older than this are served as STALE; unset uses each view's TTL."""
    max_entities: int = Field(default=1000, ge=1)
    """Most entity ids in one GetOnlineFeatures request."""
    store_threads: int = Field(default=1, ge=1, le=64)
    """Threads that call Feast. Keep 1 for SQLite (Feast shares one connection); Redis
    reads can use more."""
    store_timeout_s: float = Field(default=10.0, gt=0)
    """Longest one online-store call (read, push, delete) may take before its caller gets
    UNAVAILABLE (reads) or retries (pushes)."""
    stream: StreamTuning = StreamTuning()
    """Consumer-group timing of the fold."""

    @model_validator(mode="after")
    def _redis_needs_url(self) -> FeaturesScope:
        if self.online_store == "redis" and self.redis_url is None:
            raise ValueError("features.online_store=redis needs features.redis_url")
        return self


class FeaturesSettings(MeshSettings):
    """Settings of ``python -m loopmesh.features``."""

    features: FeaturesScope = FeaturesScope()
    """The features service's own scope."""
