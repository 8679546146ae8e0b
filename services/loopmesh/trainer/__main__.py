"""``python -m loopmesh.trainer`` (or ``loopmesh serve trainer``): run the trainer."""

from __future__ import annotations

from loopmesh.mesh.app import main
from loopmesh.trainer.app import TrainerApp
from loopmesh.trainer.settings import TrainerSettings

if __name__ == "__main__":
    raise SystemExit(main("trainer", TrainerSettings(), TrainerApp))
