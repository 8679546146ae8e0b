"""``python -m loopmesh.rollout``: the rollout controller until SIGINT/SIGTERM.

Settings come from the environment (``LOOPMESH_ROLLOUT__...``, see settings.py). Run one
replica: the controller is the only writer of the ``rollouts`` topic.
"""

from __future__ import annotations

from loopmesh.mesh.app import main
from loopmesh.rollout.app import RolloutApp
from loopmesh.rollout.settings import RolloutSettings

if __name__ == "__main__":
    raise SystemExit(main("rollout", RolloutSettings(), RolloutApp))
