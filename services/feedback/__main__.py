"""``python -m services.feedback`` (or ``loopmesh serve feedback``): run the feedback door."""

from __future__ import annotations

from services.feedback.server import feedback_server
from services.feedback.settings import FeedbackSettings
from services.mesh.intake_server import main

if __name__ == "__main__":
    main(lambda: feedback_server(FeedbackSettings()))
