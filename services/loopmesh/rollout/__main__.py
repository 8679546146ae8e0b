"""``python -m loopmesh.rollout``: the rollout controller until SIGINT/SIGTERM.

Settings come from the environment (``LOOPMESH_ROLLOUT__...``, see settings.py). The
controller is the only writer of the ``rollouts`` topic: a second replica on the same topics
and group waits as a standby and takes over when the leader goes (leader.py).
"""

from __future__ import annotations

from loopmesh.mesh.app import main
from loopmesh.rollout.app import RolloutApp
from loopmesh.rollout.settings import RolloutSettings

if __name__ == "__main__":
    raise SystemExit(main("rollout", RolloutSettings(), RolloutApp))
