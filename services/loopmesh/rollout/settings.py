"""Settings of the rollout controller (``LOOPMESH_ROLLOUT__...``)."""

from __future__ import annotations

from dataclasses import replace

from pydantic import BaseModel, Field

from loopmesh.mesh.events import ModelName
from loopmesh.mesh.settings import GrpcClientSettings, GrpcServerSettings, MeshSettings
from loopmesh.mesh.topics import METRICS_LIVE, MODELS_PUBLISHED, ROLLOUTS, Topic
from loopmesh.rollout.policy import PolicySet, RolloutPolicy

DEFAULT_PORT = 50056


class RolloutTopics(BaseModel):
    """Topic names (overridable so tests and staging can use their own)."""

    models_published: str = MODELS_PUBLISHED.name
    """ModelPublished events from the trainer."""
    metrics_live: str = METRICS_LIVE.name
    """VersionMetrics from the joiner (and the gateway)."""
    rollouts: str = ROLLOUTS.name
    """Compacted RolloutChanged topic this controller writes and rebuilds from."""
    policies: str = "rollout.policies"
    """Compacted topic of per-model policy overrides set over gRPC."""

    def table(self) -> tuple[Topic, Topic, Topic, Topic]:
        """(models_published, metrics_live, rollouts, policies) as Topic definitions."""
        return (
            replace(MODELS_PUBLISHED, name=self.models_published),
            replace(METRICS_LIVE, name=self.metrics_live),
            replace(ROLLOUTS, name=self.rollouts),
            Topic(self.policies, PolicySet, "model_name", compacted=True),
        )


class RolloutScope(BaseModel):
    """The rollout controller's own settings."""

    server: GrpcServerSettings = GrpcServerSettings(port=DEFAULT_PORT)
    """Where the RolloutService gRPC API listens."""
    client: GrpcClientSettings = GrpcClientSettings()
    """How ``loopmesh rollout`` reaches this controller: TLS, client certificate
    (``LOOPMESH_ROLLOUT__CLIENT__*``; its flags override); its token is
    ``LOOPMESH_AUTH__CLIENT_TOKEN`` (an ``operator`` token)."""
    topics: RolloutTopics = RolloutTopics()
    """Kafka topics read and written."""
    consumer_group: str = "loopmesh-rollout"
    """Consumer group for models.published (metrics are re-read from a lookback instead)."""
    default_policy: RolloutPolicy = RolloutPolicy()
    """Policy of every model without its own."""
    policies: dict[ModelName, RolloutPolicy] = Field(default_factory=dict)
    """Complete policies per model name (fields left out take the built-in defaults)."""
    tick_seconds: float = Field(default=1.0, gt=0.0)
    """How often every rollout is re-evaluated even without new metrics (timeouts, drains)."""
    metrics_lookback_seconds: float = Field(default=900.0, gt=0.0)
    """On start, metrics.live is re-read from this long ago to rebuild the live figures."""
    reconcile_seconds: float = Field(default=30.0, gt=0.0)
    """How often Triton's loaded versions are checked against the rollout (e.g. after a
    Triton restart, which forgets explicitly loaded models)."""
    load_timeout_seconds: float = Field(default=300.0, gt=0.0)
    """Upper bound on one Triton load request (a broken stub can hang a load)."""
    history_limit: int = Field(default=200, ge=1)
    """Changes kept per model for ListRollouts."""
    start_timeout_seconds: float = Field(default=60.0, gt=0.0)
    """How long start-up may take to re-read the topics before giving up."""


class RolloutSettings(MeshSettings):
    """Settings of ``python -m loopmesh.rollout``."""

    rollout: RolloutScope = RolloutScope()
    """Rollout controller scope."""
