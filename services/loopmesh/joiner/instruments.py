"""OpenTelemetry instruments of the joiner: joins and live metrics per version.

Prometheus names (OTel's conversion):

- ``loopmesh_joiner_joined_feedback_total{model, version}``: predictions joined with their
  feedback (examples emitted);
- ``loopmesh_joiner_unmatched_feedback_dropped_total``: feedback entries whose prediction
  never came, dropped because one worker held more than ``max_unmatched_feedback``;
- ``loopmesh_joiner_unmatched_feedback``: feedback entries now waiting for their prediction;
- ``loopmesh_joiner_no_target_total{model}``: pairs joined whose feedback gives the model's
  label rule no target (a class index beyond its classes, no value for a regression model):
  no example;
- ``loopmesh_joiner_erased_total``: predictions and joins skipped, and stored entries
  deleted, because their entity was erased;
- ``loopmesh_model_live_{loss,log_loss,auc,accuracy,mae,label_rate,count}{model, version}``: the
  latest sliding-window figures per version (a version leaves when its window drains to
  count 0);
- ``loopmesh_model_shadow_{paired_loss_diff,paired_accuracy_diff,count}{model, version,
  paired_with}``: a shadow candidate's paired differences with the version that answered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Observation

from loopmesh.mesh.events import VersionMetrics
from loopmesh.mesh.telemetry import meter

LAG_INTERVAL_S = 5.0
"""How often the joiner's consumer lag is measured (``loopmesh_kafka_consumer_lag``)."""

# Created at import; they bind to the provider setup_telemetry installs later (OTel proxies).
_meter = meter("loopmesh.joiner")
_joined = _meter.create_counter(
    "loopmesh.joiner.joined_feedback",
    unit="{example}",
    description="Predictions joined with their feedback, per model version",
)
_dropped = _meter.create_counter(
    "loopmesh.joiner.unmatched_feedback_dropped",
    unit="{entry}",
    description="Unmatched feedback entries dropped over the cap (oldest first)",
)
_no_target = _meter.create_counter(
    "loopmesh.joiner.no_target",
    unit="{pair}",
    description="Joined pairs whose feedback the model's label rule cannot use",
)
_erased = _meter.create_counter(
    "loopmesh.joiner.erased",
    unit="{entry}",
    description="Predictions and joins of erased entities skipped or deleted",
)
_live: dict[tuple[str, int], VersionMetrics] = {}
_shadow: dict[tuple[str, int, int], VersionMetrics] = {}
_unmatched: list[Callable[[], int]] = []


def _observe_unmatched(_options: CallbackOptions) -> Iterable[Observation]:
    if _unmatched:
        yield Observation(sum(count() for count in _unmatched))


_meter.create_observable_gauge(
    "loopmesh.joiner.unmatched_feedback",
    callbacks=[_observe_unmatched],
    unit="{entry}",
    description="Feedback entries waiting for a prediction the joiner has not seen",
)


def _gauge(figure: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        for (model, version), metrics in list(_live.items()):
            value = getattr(metrics, figure)
            if value is not None:
                yield Observation(value, {"model": model, "version": str(version)})

    return observe


for _figure, _description in (
    ("loss", "Live mean loss of the model's task over the version's feedback window"),
    ("mae", "Live mean absolute error (regression) of the version's feedback window"),
    ("log_loss", "Live log loss of the version's feedback window"),
    ("auc", "Live ROC AUC of the version's feedback window"),
    ("accuracy", "Live accuracy (threshold 0.5) of the version's feedback window"),
    ("label_rate", "Share of positive labels in the version's feedback window"),
    ("count", "Joined examples in the version's feedback window"),
):
    _meter.create_observable_gauge(
        f"loopmesh.model.live.{_figure}", callbacks=[_gauge(_figure)], description=_description
    )


def _shadow_gauge(figure: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        for (model, version, paired), metrics in list(_shadow.items()):
            value = getattr(metrics, figure)
            if value is not None:
                labels = {"model": model, "version": str(version), "paired_with": str(paired)}
                yield Observation(value, labels)

    return observe


for _figure, _description in (
    ("paired_loss_diff", "Shadow's mean loss minus the answering version's, same requests"),
    ("paired_accuracy_diff", "Shadow's accuracy minus the answering version's, same requests"),
    ("count", "Requests in the shadow's paired window"),
):
    _meter.create_observable_gauge(
        f"loopmesh.model.shadow.{_figure}",
        callbacks=[_shadow_gauge(_figure)],
        description=_description,
    )


def record_joined(model: str, version: int) -> None:
    _joined.add(1, {"model": model, "version": str(version)})


def record_no_target(model: str) -> None:
    _no_target.add(1, {"model": model})


def record_dropped(count: int) -> None:
    _dropped.add(count)


def record_erased(count: int = 1) -> None:
    _erased.add(count)


def watch_unmatched(count: Callable[[], int]) -> Callable[[], None]:
    """Report ``count()`` in the unmatched gauge until the returned function is called."""
    _unmatched.append(count)
    return lambda: _unmatched.remove(count)


def record_live(metrics: VersionMetrics) -> None:
    """The newest window figures of one version; a drained window (count 0) is dropped."""
    if metrics.shadow_of is not None:
        pair = (metrics.model_name, metrics.model_version, metrics.shadow_of)
        if metrics.count:
            _shadow[pair] = metrics
        else:
            _shadow.pop(pair, None)
        return
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
    for pair in [k for k in _shadow if k[0] in gone]:
        del _shadow[pair]
