"""``python -m services.ingestion`` (or ``loopmesh serve ingestion``): run the ingestion door."""

from __future__ import annotations

from services.ingestion.server import ingestion_server
from services.ingestion.settings import IngestionSettings
from services.mesh.intake_server import main

if __name__ == "__main__":
    main(lambda: ingestion_server(IngestionSettings()))
