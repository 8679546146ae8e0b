"""``python -m loopmesh.joiner`` (or ``loopmesh serve joiner``): run the joiner."""

from __future__ import annotations

from loopmesh.joiner.app import JoinerApp
from loopmesh.joiner.settings import JoinerSettings
from loopmesh.mesh.app import main

if __name__ == "__main__":
    raise SystemExit(main("joiner", JoinerSettings(), JoinerApp))
