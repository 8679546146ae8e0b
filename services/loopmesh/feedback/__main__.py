"""``python -m loopmesh.feedback`` (or ``loopmesh serve feedback``): run the feedback door."""

from __future__ import annotations

from loopmesh.feedback.server import feedback_server
from loopmesh.feedback.settings import FeedbackSettings
from loopmesh.mesh.intake_server import main

if __name__ == "__main__":
    raise SystemExit(main("feedback", FeedbackSettings(), feedback_server))
