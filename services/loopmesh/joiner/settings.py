"""Settings of the joiner (``LOOPMESH_JOINER__...``): its topics, table and live metrics."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, Field

from loopmesh.mesh.settings import GrpcServerSettings, MeshSettings
from loopmesh.mesh.topics import (
    ENTITIES_ERASED,
    FEEDBACK,
    METRICS_LIVE,
    PREDICTIONS,
    TRAINING_EXAMPLES,
    Topic,
    TopicSet,
)


class JoinerTopics(TopicSet):
    """Names of the topics the joiner reads and writes (tests and tenants use others)."""

    predictions: str = PREDICTIONS.name
    """PredictionLogged events, keyed by prediction_id."""
    feedback: str = FEEDBACK.name
    """FeedbackEvent events, keyed by prediction_id (co-partitioned with predictions)."""
    examples: str = TRAINING_EXAMPLES.name
    """LabelledExample events the joiner writes (the trainer's dataset reads them)."""
    metrics: str = METRICS_LIVE.name
    """VersionMetrics the joiner writes (rollout controller and drift trigger read them)."""
    erased: str = ENTITIES_ERASED.name
    """EntityErased events: an erased entity's predictions up to the erasure never join."""

    BASES: ClassVar[dict[str, Topic]] = {
        "predictions": PREDICTIONS,
        "feedback": FEEDBACK,
        "examples": TRAINING_EXAMPLES,
        "metrics": METRICS_LIVE,
        "erased": ENTITIES_ERASED,
    }


class JoinerScope(BaseModel):
    """The faust joiner of predictions and feedback, and its live metrics per version."""

    server: GrpcServerSettings = GrpcServerSettings(port=50057)
    """Where the gRPC health service answers (SERVING once the join table is recovered)."""
    topics: JoinerTopics = JoinerTopics()
    """Topic names."""
    data_dir: Path = Path(".loopmesh/joiner")
    """Local state: faust's table stores (RocksDB files) and the erased-entity index. Losing it
    costs a longer start (rebuilt from the changelog and ``entities.erased``), not data."""
    app_id: str = "loopmesh-joiner"
    """faust app id: consumer group and prefix of its changelog/internal topics."""
    ttl_seconds: float = Field(default=24 * 3600.0, gt=0)
    """Longest event-time gap between a prediction and its feedback that still joins; also how
    long (wall clock) a prediction waits in the table for its feedback before it is swept."""
    unmatched_feedback_wait_seconds: float = Field(default=600.0, gt=0)
    """How long (wall clock) feedback whose prediction is not known yet waits for it. Predictions
    are logged when served, so feedback that outruns its prediction does so by the prediction
    log's lag, not by hours; feedback for an id that never existed should not stay 24 h."""
    max_unmatched_feedback: int = Field(default=100_000, ge=1)
    """Most unmatched feedback entries one worker keeps; beyond it the oldest are dropped,
    counted (``loopmesh_joiner_unmatched_feedback_dropped_total``) and logged. Each costs about
    300 bytes of memory (the age index: 30 MiB at the default) besides its place on disk."""
    sweep_interval_seconds: float = Field(default=600.0, gt=0)
    """How often every stored entry is read to delete expired predictions and stored ones of
    erased entities (tombstones in the changelog). About 2 µs an entry: a day at 100
    predictions/s (8.6 M entries) is some 15 s of one core per pass, in chunks between which
    the agents run. Unmatched feedback expires from its age index every 30 s instead."""
    reward_threshold: float = 0.0
    """Feedback with a reward and no label counts as label 1 when reward > this."""
    metrics_window_seconds: float = Field(default=600.0, gt=0)
    """Event-time length of the sliding window of live metrics per model version."""
    metrics_max_points: int = Field(default=50_000, ge=10)
    """Most examples one version's window keeps (oldest dropped first)."""
    metrics_publish_interval_seconds: float = Field(default=5.0, gt=0)
    """How often changed windows are published to ``metrics.live``."""
    store: str = "rocksdb://"
    """faust table store: ``rocksdb://`` (rocksdict) keeps the join table on disk under
    ``data_dir``; ``memory://`` holds it on the heap (tests that want no files only: a day of
    predictions does not fit)."""
    rocksdb_block_cache_mib: int = Field(default=32, ge=1)
    """RocksDB read cache per table partition (MiB): with the write buffers, the joiner's
    memory for its table does not grow with the table."""
    rocksdb_write_buffer_mib: int = Field(default=16, ge=1)
    """RocksDB memtable size per table partition (MiB); at most two per partition are held."""
    session_timeout_seconds: float = Field(default=30.0, gt=0)
    """Consumer-group session timeout (short in tests so joins are fast)."""
    heartbeat_interval_seconds: float = Field(default=3.0, gt=0)
    """Consumer-group heartbeat interval (a third of the session timeout or less)."""


class JoinerSettings(MeshSettings):
    """Settings of ``python -m loopmesh.joiner``."""

    joiner: JoinerScope = JoinerScope()
    """The joiner's own scope."""
