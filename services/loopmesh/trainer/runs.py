"""Run history: one JSON line per finished run in ``<data_dir>/runs.jsonl`` (append + fsync).

A run is recorded once, when it ends (published, rejected or failed); the run in progress
lives in memory and is reported by GetStatus. A crash mid-run leaves no line; ``core`` keeps
the running record in its state file, so the next start records it (failed, or published when
its version reached the repository, found by its metadata ``run_id``).
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from loopmesh.mesh.events import utcnow
from loopmesh.trainer.triggers import DriftReport

RunStatus = Literal["running", "published", "rejected", "failed"]


def new_run_id() -> str:
    return f"run-{utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


class RunRecord(BaseModel):
    """One training run and its figures."""

    run_id: str = Field(default_factory=new_run_id)
    model_name: str
    status: RunStatus = "running"
    reasons: list[str] = Field(default_factory=list)
    """What triggered it (manual, new examples, drift, age)."""
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    dataset_rows: int = 0
    """Rows appended to the dataset when the run started (new examples count from here)."""
    train_rows: int = 0
    validation_rows: int = 0
    holdout_rows: int = 0
    feature_names: list[str] = Field(default_factory=list)
    candidate: dict[str, float] = Field(default_factory=dict)
    """Holdout figures of the candidate."""
    reference: dict[str, float] = Field(default_factory=dict)
    """Holdout figures of what it was compared with."""
    reference_kind: Literal["stable", "baseline", ""] = ""
    reference_version: int | None = None
    decision: str = ""
    version: int | None = None
    """The version published (None unless status is published)."""
    warm_started: bool = False
    epochs: int = 0
    device: str = ""
    train_seconds: float = 0.0
    error: str = ""
    data_from: datetime | None = None
    data_to: datetime | None = None
    data_since: datetime | None = None
    """The floor of the run's window: examples predicted before it were left out (the change
    point of a drift; ``triggers.drift_floor_seconds``). None: no floor."""
    drift: DriftReport | None = None
    """The drift detection that this run was the first to start after (None: none)."""


class RunHistory:
    """Append-only JSON lines of finished runs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, record: RunRecord) -> None:
        line = record.model_dump_json() + "\n"
        with self._lock, self.path.open("a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def all(self) -> list[RunRecord]:
        """Finished runs, oldest first (a torn last line from a crash is skipped)."""
        if not self.path.exists():
            return []
        records = []
        with self._lock:
            lines = self.path.read_text().splitlines()
        for line in lines:
            if not line.strip():
                continue
            try:
                records.append(RunRecord.model_validate(json.loads(line)))
            except (ValueError, json.JSONDecodeError):
                continue
        return records
