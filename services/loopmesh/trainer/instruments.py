"""OpenTelemetry instruments of the trainer: joins, live metrics per version, runs, examples.

Prometheus names (OTel's conversion):

- ``loopmesh_trainer_joined_feedback_total{model, version}``: predictions joined with their
  feedback (examples emitted by the joiner);
- ``loopmesh_model_live_{log_loss,auc,accuracy,label_rate,count}{model, version}``: the
  joiner's latest sliding-window figures per version (a version leaves when its window
  drains to count 0);
- ``loopmesh_trainer_runs_total{model, status}`` and
  ``loopmesh_trainer_run_duration_seconds{model, status}`` (histogram) per finished run;
- ``loopmesh_trainer_examples_stored_total{model}``: examples written to the dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Observation

from loopmesh.mesh.events import VersionMetrics
from loopmesh.mesh.telemetry import meter
from loopmesh.trainer.runs import RunRecord

LAG_INTERVAL_S = 5.0
"""How often the joiner's consumer lag is measured (``loopmesh_kafka_consumer_lag``)."""

# Created at import; they bind to the provider setup_telemetry installs later (OTel proxies).
_meter = meter("loopmesh.trainer")
_joined = _meter.create_counter(
    "loopmesh.trainer.joined_feedback",
    unit="{example}",
    description="Predictions joined with their feedback, per model version",
)
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
_live: dict[tuple[str, int], VersionMetrics] = {}


def _gauge(figure: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        for (model, version), metrics in list(_live.items()):
            value = getattr(metrics, figure)
            if value is not None:
                yield Observation(value, {"model": model, "version": str(version)})

    return observe


for _figure, _description in (
    ("log_loss", "Live log loss of the version's feedback window"),
    ("auc", "Live ROC AUC of the version's feedback window"),
    ("accuracy", "Live accuracy (threshold 0.5) of the version's feedback window"),
    ("label_rate", "Share of positive labels in the version's feedback window"),
    ("count", "Joined examples in the version's feedback window"),
):
    _meter.create_observable_gauge(
        f"loopmesh.model.live.{_figure}", callbacks=[_gauge(_figure)], description=_description
    )


def record_joined(model: str, version: int) -> None:
    _joined.add(1, {"model": model, "version": str(version)})


def record_live(metrics: VersionMetrics) -> None:
    """The newest window figures of one version; a drained window (count 0) is dropped."""
    key = (metrics.model_name, metrics.model_version)
    if metrics.count:
        _live[key] = metrics
    else:
        _live.pop(key, None)


def forget_live(models: Iterable[str]) -> None:
    """Stop reporting models whose windows moved to another joiner worker."""
    gone = set(models)
    for key in [k for k in _live if k[0] in gone]:
        del _live[key]


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
