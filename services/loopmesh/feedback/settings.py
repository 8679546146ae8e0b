"""Settings of the feedback service: env ``LOOPMESH_FEEDBACK__...``."""

from __future__ import annotations

from loopmesh.mesh.intake_server import IntakeScope, TopicName
from loopmesh.mesh.settings import GrpcServerSettings, MeshSettings
from loopmesh.mesh.topics import FEEDBACK


class FeedbackScope(IntakeScope):
    """The feedback door."""

    server: GrpcServerSettings = GrpcServerSettings(port=50052)
    """Where the FeedbackService listens."""
    topic: TopicName = FEEDBACK.name
    """Topic of accepted feedback."""


class FeedbackSettings(MeshSettings):
    """Everything the feedback process reads."""

    feedback: FeedbackScope = FeedbackScope()
    """The feedback door."""
