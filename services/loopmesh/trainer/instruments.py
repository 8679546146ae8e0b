"""OpenTelemetry instruments of the trainer: runs and stored examples.

Prometheus names (OTel's conversion):

- ``loopmesh_trainer_runs_total{model, status}`` and
  ``loopmesh_trainer_run_duration_seconds{model, status}`` (histogram) per finished run;
- ``loopmesh_trainer_examples_stored_total{model}``: examples written to the dataset;
- ``loopmesh_trainer_drift_detections_total{model, detector}``: drifts of the stable version's
  per-example loss, and per detection ``loopmesh_trainer_drift_detection_delay_seconds`` and
  ``loopmesh_trainer_drift_detection_delay_examples`` (histograms, ``{model, detector}``):
  prediction time and examples from the estimated change point to the detection.
"""

from __future__ import annotations

from loopmesh.mesh.telemetry import meter
from loopmesh.trainer.runs import RunRecord
from loopmesh.trainer.triggers import DriftReport

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

_drifts = _meter.create_counter(
    "loopmesh.trainer.drift.detections",
    unit="{detection}",
    description="Drifts detected in the stable version's per-example loss",
)
_drift_delay = _meter.create_histogram(
    "loopmesh.trainer.drift.detection_delay",
    unit="s",
    description="Prediction time from a drift's estimated change point to its detection",
    explicit_bucket_boundaries_advisory=[1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400],
)
_drift_delay_examples = _meter.create_histogram(
    "loopmesh.trainer.drift.detection_delay_examples",
    unit="{example}",
    description="Examples from a drift's estimated change point to its detection",
    explicit_bucket_boundaries_advisory=[10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
)


def record_drift(model: str, report: DriftReport) -> None:
    """One drift detection and its delay."""
    attributes = {"model": model, "detector": report.detector}
    _drifts.add(1, attributes)
    _drift_delay.record(report.delay_seconds, attributes)
    _drift_delay_examples.record(report.delay_examples, attributes)


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
