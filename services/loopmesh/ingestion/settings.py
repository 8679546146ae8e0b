"""Settings of the ingestion service: env `LOOPMESH_INGESTION__...` on top of the mesh settings.

Pseudonymisation (`LOOPMESH_PRIVACY__...`) is a mesh setting, shared with inference and features.
"""

from __future__ import annotations

from loopmesh.mesh.intake import EVENT_LATENESS_S, IntakeLimits
from loopmesh.mesh.intake_server import IntakeScope, TopicName
from loopmesh.mesh.settings import GrpcServerSettings, MeshSettings
from loopmesh.mesh.topics import EVENTS_RAW


class IngestionScope(IntakeScope):
    """The ingestion door."""

    server: GrpcServerSettings = GrpcServerSettings(port=50051)
    """Where the IngestionService listens."""
    topic: TopicName = EVENTS_RAW.name
    """Topic of accepted interaction events."""
    limits: IntakeLimits = IntakeLimits(max_age_seconds=EVENT_LATENESS_S)
    """As every door's, but events older than the features' default allowed lateness are
    refused here: acknowledged, they would be counted by no view. Raise it together with
    ``features.allowed_lateness_s`` (and the views' ``watermark_delay_threshold``)."""


class IngestionSettings(MeshSettings):
    """Everything the ingestion process reads."""

    ingestion: IngestionScope = IngestionScope()
    """The ingestion door."""
