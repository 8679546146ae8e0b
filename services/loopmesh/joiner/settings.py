"""Settings of the joiner (``LOOPMESH_JOINER__...``): its topics, table and live metrics."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, Field

from loopmesh.mesh.settings import GrpcServerSettings, MeshSettings
from loopmesh.mesh.topics import (
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

    BASES: ClassVar[dict[str, Topic]] = {
        "predictions": PREDICTIONS,
        "feedback": FEEDBACK,
        "examples": TRAINING_EXAMPLES,
        "metrics": METRICS_LIVE,
    }


class JoinerScope(BaseModel):
    """The faust joiner of predictions and feedback, and its live metrics per version."""

    server: GrpcServerSettings = GrpcServerSettings(port=50057)
    """Where the gRPC health service answers (SERVING once the join table is recovered)."""
    topics: JoinerTopics = JoinerTopics()
    """Topic names."""
    data_dir: Path = Path(".loopmesh/joiner")
    """faust's local state (table stores)."""
    app_id: str = "loopmesh-joiner"
    """faust app id: consumer group and prefix of its changelog/internal topics."""
    ttl_seconds: float = Field(default=24 * 3600.0, gt=0)
    """Longest event-time gap between a prediction and its feedback that still joins; also how
    long (wall clock) an unmatched side waits in the table before it is swept."""
    sweep_interval_seconds: float = Field(default=60.0, gt=0)
    """How often expired join entries are deleted (tombstones in the changelog)."""
    reward_threshold: float = 0.0
    """Feedback with a reward and no label counts as label 1 when reward > this."""
    metrics_window_seconds: float = Field(default=600.0, gt=0)
    """Event-time length of the sliding window of live metrics per model version."""
    metrics_max_points: int = Field(default=50_000, ge=10)
    """Most examples one version's window keeps (oldest dropped first)."""
    metrics_publish_interval_seconds: float = Field(default=5.0, gt=0)
    """How often changed windows are published to ``metrics.live``."""
    store: str = "memory://"
    """faust table store (``rocksdb://`` in production keeps large tables off the heap)."""
    session_timeout_seconds: float = Field(default=30.0, gt=0)
    """Consumer-group session timeout (short in tests so joins are fast)."""
    heartbeat_interval_seconds: float = Field(default=3.0, gt=0)
    """Consumer-group heartbeat interval (a third of the session timeout or less)."""


class JoinerSettings(MeshSettings):
    """Settings of ``python -m loopmesh.joiner``."""

    joiner: JoinerScope = JoinerScope()
    """The joiner's own scope."""
