"""Settings of the feedback service: env ``LOOPMESH_FEEDBACK__...``."""

from __future__ import annotations

from services.mesh.intake_server import IntakeScope, TopicName
from services.mesh.settings import GrpcServerSettings, MeshSettings
from services.mesh.topics import FEEDBACK


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
