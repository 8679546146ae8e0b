"""``python -m loopmesh.features``: FeatureService and the stream agents until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import sys

from loopmesh.features.app import FeaturesApp
from loopmesh.features.settings import FeaturesSettings
from loopmesh.mesh.app import main

if __name__ == "__main__":
    # feast imports torch when installed, only for OnlineResponse.to_tensor, which this
    # service never calls: blocking it saves seconds of start-up and hundreds of MB.
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    # aiokafka narrates every rebalance at INFO, feast every registry refresh; their
    # warnings are what matters.
    for noisy in ("aiokafka", "feast"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    raise SystemExit(main("features", FeaturesSettings(), FeaturesApp))
