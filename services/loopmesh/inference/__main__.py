"""``python -m loopmesh.inference`` (or ``loopmesh serve inference``): run the gateway."""

from __future__ import annotations

from loopmesh.inference.app import InferenceGateway
from loopmesh.inference.settings import InferenceSettings
from loopmesh.mesh.app import main

if __name__ == "__main__":
    raise SystemExit(main("inference", InferenceSettings(), InferenceGateway))
