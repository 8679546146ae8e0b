"""Settings of the ingestion service: env `LOOPMESH_INGESTION__...` on top of the mesh settings.

Pseudonymisation (`LOOPMESH_PRIVACY__...`) is a mesh setting, shared with inference and features.
"""

from __future__ import annotations

from loopmesh.mesh.intake_server import IntakeScope, TopicName
from loopmesh.mesh.settings import GrpcServerSettings, MeshSettings
from loopmesh.mesh.topics import EVENTS_RAW


class IngestionScope(IntakeScope):
    """The ingestion door."""

    server: GrpcServerSettings = GrpcServerSettings(port=50051)
    """Where the IngestionService listens."""
    topic: TopicName = EVENTS_RAW.name
    """Topic of accepted interaction events."""


class IngestionSettings(MeshSettings):
    """Everything the ingestion process reads."""

    ingestion: IngestionScope = IngestionScope()
    """The ingestion door."""
