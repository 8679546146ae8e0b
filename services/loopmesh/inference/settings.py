"""Settings of the inference gateway: ``LOOPMESH_INFERENCE__*`` on top of the mesh settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from loopmesh.mesh.settings import GrpcClientSettings, GrpcServerSettings, MeshSettings


class DataPlaneScope(BaseModel):
    """The native data plane (``loopmesh-dataplane``) this gateway runs and controls."""

    binary: Path | None = None
    """The executable; unset: ``loopmesh-dataplane`` beside this Python (``make deps`` puts it
    there), else on ``PATH``."""
    backend_port: int = Field(default=0, ge=0, le=65535)
    """Loopback port of this process' own gRPC server (Predict, SetRoute, health), which the
    data plane proxies to; 0 picks a free one."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Prometheus port of the data plane (on ``telemetry.metrics_host``); None: none."""
    memory_limit: str | None = Field(default=None, pattern=r"^[0-9]+(B|KiB|MiB|GiB|TiB)?$")
    """Go's soft heap limit for the data plane (``GOMEMLIMIT``, e.g. ``384MiB``); unset: its
    own default of 1 GiB. Keep it well inside a container limit the two processes share."""
    max_concurrent_streams: int = Field(default=1024, ge=1)
    """Concurrent calls per client connection on the public port."""
    stats_interval_s: float = Field(default=0.5, gt=0)
    """How often the per-version figures of ModelInfer are drained into the counters."""
    known_refresh_s: float = Field(default=5.0, gt=0)
    """How often the versions of the repository are re-sent even when no route changed."""
    start_timeout_s: float = Field(default=20.0, gt=0)
    """How long the data plane may take to bind its ports."""
    stop_timeout_s: float = Field(default=15.0, gt=0)
    """How long it may take to finish in-flight calls on shutdown before it is killed."""
    admin_timeout_s: float = Field(default=5.0, gt=0)
    """Deadline of one call to its loopback admin API."""
    predict: bool = True
    """Serve Predict in the data plane (the Go hot path); False: every Predict is proxied to
    this process. Measured on two cores, the Python Predict path reached 0.09x direct
    Triton's throughput at 16 concurrent calls. PredictStream, SetRoute and GetRoute stay
    here, and so does any Predict the data plane cannot serve (an invalid request, an unknown
    model or version, bad metadata): it forwards those unchanged, so each error message has
    one definition, this process'."""


class InferenceScope(BaseModel):
    """What the inference gateway alone reads."""

    server: GrpcServerSettings = GrpcServerSettings(port=50054)
    """The public port (served by the data plane): the Open Inference Protocol and, proxied
    to this process, ``loopmesh.v1.InferenceService``, health and reflection."""
    dataplane: DataPlaneScope = DataPlaneScope()
    """The native data plane (``LOOPMESH_INFERENCE__DATAPLANE__*``)."""
    features_url: str = "127.0.0.1:50053"
    """FeatureService gRPC address."""
    features_client: GrpcClientSettings = GrpcClientSettings()
    """How the gateway reaches the FeatureService: TLS, client certificate, limits
    (``LOOPMESH_INFERENCE__FEATURES_CLIENT__*``); its token is ``LOOPMESH_AUTH__CLIENT_TOKEN``."""
    features_timeout_s: float = Field(default=0.5, gt=0)
    """Deadline of one GetOnlineFeatures call."""
    on_features_unavailable: Literal["degrade", "fail"] = "degrade"
    """Feature service down: answer from declared defaults (``degraded`` set) or UNAVAILABLE."""
    default_feature_value: float = 0.0
    """Default of a feature that neither the model's ``feature_defaults`` nor
    ``feature_defaults`` here declares (used for missing values; always reported)."""
    feature_defaults: dict[str, float] = Field(default_factory=dict)
    """Defaults by feature name for every model, below the model's own ``feature_defaults``."""
    default_model: str | None = None
    """Model that ``Predict`` uses when the request names none."""
    triton_timeout_s: float = Field(default=2.0, gt=0)
    """Deadline of one Triton call (shortened to the caller's remaining deadline)."""
    triton_channels: int = Field(default=2, ge=1, le=64)
    """gRPC connections to Triton, used round-robin (one HTTP/2 connection serialises)."""
    batch_max_size: int = Field(default=64, ge=1)
    """Most Predict rows coalesced into one Triton request (<= the model's max_batch_size)."""
    batch_max_delay_ms: float = Field(default=1.0, ge=0)
    """Longest a Predict row waits to be coalesced while earlier batches are in flight."""
    batch_max_inflight: int = Field(default=2, ge=1)
    """Triton requests in flight per model version before rows start to queue and coalesce."""
    stream_max_inflight: int = Field(default=256, ge=1)
    """Items of one PredictStream processed at once; the stream is not read beyond that."""
    shadow_max_inflight: int = Field(default=64, ge=0)
    """Requests being scored by shadow candidates at once; beyond it shadow work is shed (the
    request is answered and logged without it), so mirrored load is bounded and goes first."""
    shadow_timeout_ms: float = Field(default=2000.0, gt=0)
    """A shadow score not back within this is given up (the prediction is logged without it)."""
    predictions_topic: str = "predictions"
    """Topic the prediction log goes to (tests use a unique one)."""
    rollouts_topic: str = "rollouts"
    """Compacted topic of RolloutChanged events the routing weights come from."""
    routes_catchup_timeout_s: float = Field(default=30.0, gt=0)
    """How long start-up may take to read ``rollouts`` to its end before serving."""
    log_queue_size: int = Field(default=10_000, ge=1)
    """Predictions waiting to be logged (here, and in the data plane's producer buffer); when
    full, responses still go out and a counter records the drop."""
    log_batch_size: int = Field(default=500, ge=1)
    """Most prediction events this process' log produces to Kafka in one batch (the data
    plane's producer batches by bytes, franz-go's default)."""
    log_linger_ms: float = Field(default=20.0, ge=0)
    """How long the log (this process' and the data plane's producer) waits for more
    predictions before producing a batch."""
    catalog_refresh_s: float = Field(default=5.0, gt=0)
    """How long the list of published versions (for models without a route) is cached."""
    operational_metrics: bool = True
    """Publish each version's request count, error rate and p99 latency to ``metrics_topic``
    (the rollout controller's error-rate and latency guards are skipped without them)."""
    operational_publish_s: float = Field(default=10.0, gt=0)
    """How often the operational figures of the versions that had requests are published."""
    operational_window_s: float = Field(default=60.0, gt=0)
    """Sliding window the operational figures cover (requests older than this drop out)."""
    metrics_topic: str = "metrics.live"
    """Topic the operational ``VersionMetrics`` go to (tests use a unique one)."""


class InferenceSettings(MeshSettings):
    """Settings of ``python -m loopmesh.inference``."""

    inference: InferenceScope = InferenceScope()
    """The gateway's own scope."""
