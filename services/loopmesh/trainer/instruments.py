"""OpenTelemetry instruments of the trainer: runs and stored examples.

Prometheus names (OTel's conversion):

- ``loopmesh_trainer_runs_total{model, status}`` and
  ``loopmesh_trainer_run_duration_seconds{model, status}`` (histogram) per finished run;
- ``loopmesh_trainer_examples_stored_total{model}``: examples written to the dataset.
"""

from __future__ import annotations

from loopmesh.mesh.telemetry import meter
from loopmesh.trainer.runs import RunRecord

# Created at import; they bind to the provider setup_telemetry installs later (OTel proxies).
_meter = meter("loopmesh.trainer")
_runs = _meter.create_counter(
    "loopmesh.trainer.runs", unit="{run}", description="Finished training runs by status"
)
_run_duration = _meter.create_histogram(
    "loopmesh.trainer.run.duration", unit="s", description="Training run wall time by status"
)
_stored = _meter.create_counter(
    "loopmesh.trainer.examples_stored",
    unit="{example}",
    description="Labelled examples written to the training set",
)


def record_run(record: RunRecord) -> None:
    """A finished run (published, rejected or failed)."""
    attributes = {"model": record.model_name, "status": record.status}
    _runs.add(1, attributes)
    if record.finished_at is not None:
        seconds = (record.finished_at - record.started_at).total_seconds()
        _run_duration.record(max(0.0, seconds), attributes)


def record_examples_stored(model: str, count: int) -> None:
    if count:
        _stored.add(count, {"model": model})
