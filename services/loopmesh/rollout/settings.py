"""Settings of the rollout controller (``LOOPMESH_ROLLOUT__...``)."""

from __future__ import annotations

from dataclasses import replace

from pydantic import BaseModel, Field, model_validator

from loopmesh.mesh.events import ModelName, RolloutChanged
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
    leader: str = "rollout.leader"
    """One-partition topic that carries no messages: the controller whose leader group
    (``<consumer_group>-leader``) is assigned its partition is the one that acts."""

    def table(self) -> tuple[Topic, Topic, Topic, Topic]:
        """(models_published, metrics_live, rollouts, policies) as Topic definitions."""
        return (
            replace(MODELS_PUBLISHED, name=self.models_published),
            replace(METRICS_LIVE, name=self.metrics_live),
            replace(ROLLOUTS, name=self.rollouts),
            Topic(self.policies, PolicySet, "model_name", compacted=True),
        )

    def leader_topic(self) -> Topic:
        """The leader group's topic (declared with one partition and no DLQ; never written:
        the value type is nominal)."""
        return Topic(self.leader, RolloutChanged, "model_name", retention_ms=3600 * 1000)


class LeaderSettings(BaseModel):
    """Leadership among controller replicas (``LOOPMESH_ROLLOUT__LEADER__*``): one acts, the
    others wait as standbys (see ``rollout/leader.py``).

    Takeover after the leader dies without leaving (SIGKILL, a lost node) takes at most
    ``session_timeout_seconds + heartbeat_interval_seconds`` plus the new leader's re-read of
    its state (``start_timeout_seconds`` at most; 1-3 s measured): about 13 s with these
    defaults; 7.5-8.1 s measured with a 6 s session on 2 busy cores. A leader that stops
    (SIGTERM) finishes its calls (the server's grace), stops acting and leaves the group: a
    standby leads within a heartbeat plus the re-read after that (1.5 s measured)."""

    session_timeout_seconds: float = Field(default=10.0, ge=1.0)
    """How long the group waits for a silent leader before a standby gets the leadership.
    Kafka only accepts values within its ``group.min.session.timeout.ms`` and
    ``group.max.session.timeout.ms`` (6 s to 30 min by default)."""
    heartbeat_interval_seconds: float = Field(default=1.0, gt=0.0)
    """How often members heartbeat and the leader renews its lease: a leader acts only while
    the group accepted its commit less than ``session - heartbeat`` seconds ago."""

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> LeaderSettings:
        if self.heartbeat_interval_seconds * 3 > self.session_timeout_seconds:
            raise ValueError(
                "heartbeat_interval_seconds must be at most a third of session_timeout_seconds"
            )
        return self


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
    """Consumer group for models.published (metrics are re-read from a lookback instead);
    the leader group is this name with ``-leader``."""
    leader: LeaderSettings = LeaderSettings()
    """Leader election among replicas: session and heartbeat, hence the takeover time."""
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
    """How long start-up may take to learn its role (leader or standby: joining can wait out a
    dead predecessor's session) and, as leader, to re-read the topics, before giving up."""

    @model_validator(mode="after")
    def _start_outlasts_a_session(self) -> RolloutScope:
        # A start beside a dead predecessor waits out its session before the role is known.
        if self.start_timeout_seconds <= self.leader.session_timeout_seconds:
            raise ValueError("start_timeout_seconds must exceed leader.session_timeout_seconds")
        return self

    @property
    def leader_group(self) -> str:
        """The consumer group whose member holding the leader topic's partition acts."""
        return f"{self.consumer_group}-leader"


class RolloutSettings(MeshSettings):
    """Settings of ``python -m loopmesh.rollout``."""

    rollout: RolloutScope = RolloutScope()
    """Rollout controller scope."""
