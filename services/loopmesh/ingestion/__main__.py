"""``python -m loopmesh.ingestion`` (or ``loopmesh serve ingestion``): run the ingestion door."""

from __future__ import annotations

from loopmesh.ingestion.server import ingestion_server
from loopmesh.ingestion.settings import IngestionSettings
from loopmesh.mesh.intake_server import main

if __name__ == "__main__":
    raise SystemExit(main("ingestion", IngestionSettings(), ingestion_server))
