"""What the loop has done so far, folded from the mesh's own Kafka topics.

Pure logic: the watcher feeds events in, the dashboard and the report read the state out.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from loopmesh.mesh.events import (
    Event,
    FeedbackEvent,
    InteractionEvent,
    LabelledExample,
    ModelPublished,
    PredictionLogged,
    RolloutChanged,
    VersionMetrics,
)


@dataclass
class MetricPoint:
    at: datetime
    version: int
    count: int
    log_loss: float | None
    accuracy: float | None
    auc: float | None
    loss: float | None = None
    """The task's loss (log loss, cross-entropy, squared error)."""
    mae: float | None = None
    """Regression: mean absolute error."""


@dataclass
class RolloutMark:
    at: datetime
    state: str
    stable: int | None
    canary: int | None
    weight: float
    step: int
    reason: str
    shadows: tuple[int, ...] = ()


@dataclass
class Publication:
    at: datetime
    version: int
    parent: int | None
    metrics: dict[str, float]


@dataclass
class LoopState:
    """Counters, per-version live metrics, publications and rollout changes."""

    model_name: str
    events: int = 0
    predictions: int = 0
    feedback: int = 0
    examples: int = 0
    metric_points: list[MetricPoint] = field(default_factory=list)
    publications: list[Publication] = field(default_factory=list)
    rollout_marks: list[RolloutMark] = field(default_factory=list)
    last_example_at: datetime | None = None
    """Arrival (event time) of the newest labelled example: the feedback that can trigger."""
    example_time_before_publish: dict[int, datetime] = field(default_factory=dict)
    drift_at: datetime | None = None
    _rates: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)

    def apply(self, event: Event, now: float) -> None:
        if isinstance(event, InteractionEvent):
            self.events += 1
            self._tick("events", now)
        elif isinstance(event, PredictionLogged):
            self.predictions += 1
            self._tick("predictions", now)
        elif isinstance(event, FeedbackEvent):
            self.feedback += 1
            self._tick("feedback", now)
        elif isinstance(event, LabelledExample):
            self.examples += 1
            self.last_example_at = max(self.last_example_at or event.feedback_at, event.feedback_at)
        elif (
            isinstance(event, VersionMetrics)
            and event.model_name == self.model_name
            # The gateway's operational snapshots carry no quality figure: not a chart point.
            and not _operational_only(event)
            # A shadow's paired figures are not the version's own traffic.
            and event.shadow_of is None
        ):
            self.metric_points.append(
                MetricPoint(
                    event.event_time,
                    event.model_version,
                    event.count,
                    event.log_loss,
                    event.accuracy,
                    event.auc,
                    event.loss,
                    event.mae,
                )
            )
        elif isinstance(event, ModelPublished) and event.model_name == self.model_name:
            self.publications.append(
                Publication(
                    event.event_time, event.model_version, event.parent_version, event.metrics
                )
            )
            if self.last_example_at is not None:
                self.example_time_before_publish[event.model_version] = self.last_example_at
        elif isinstance(event, RolloutChanged) and event.model_name == self.model_name:
            self.rollout_marks.append(
                RolloutMark(
                    event.event_time,
                    event.state,
                    event.stable_version,
                    event.canary_version,
                    event.canary_weight,
                    event.step,
                    event.reason,
                    tuple(event.shadow_versions),
                )
            )

    def _tick(self, name: str, now: float) -> None:
        window = self._rates.setdefault(name, deque())
        window.append((now, 1))
        while window and window[0][0] < now - 10.0:
            window.popleft()

    def rate(self, name: str, now: float) -> float:
        """Events per second over the last 10 s."""
        window = self._rates.get(name)
        if not window:
            return 0.0
        recent = [t for t, _ in window if t >= now - 10.0]
        return len(recent) / 10.0

    # -- derived figures ---------------------------------------------------------------

    def current_route(self) -> RolloutMark | None:
        return self.rollout_marks[-1] if self.rollout_marks else None

    def latest_metrics(self) -> dict[int, MetricPoint]:
        latest: dict[int, MetricPoint] = {}
        for point in self.metric_points:
            latest[point.version] = point
        return latest

    def promotions(self) -> list[RolloutMark]:
        """Changes that made another version stable (from canary or straight from shadow;
        not a first version's start)."""
        out = []
        for before, mark in zip(self.rollout_marks, self.rollout_marks[1:], strict=False):
            if mark.state == "stable" and mark.stable is not None and mark.stable != before.stable:
                out.append(mark)
        return out

    def rollbacks(self) -> list[RolloutMark]:
        """Candidates that ended without promotion (``dropped``: in shadow, unseen by users)."""
        return [m for m in self.rollout_marks if m.state in ("rolled_back", "aborted", "dropped")]

    def dropped_in_shadow(self) -> list[int]:
        """Versions dropped from shadow: each answered no user."""
        out: list[int] = []
        for before, mark in zip(self.rollout_marks, self.rollout_marks[1:], strict=False):
            out.extend(v for v in before.shadows if v not in mark.shadows and v != mark.stable)
            if mark.canary is not None and mark.canary in before.shadows and mark.weight > 0:
                out.remove(mark.canary)  # advanced to canary, not dropped
        return out

    def freshness_seconds(self) -> dict[int, float]:
        """Per version: newest feedback before it was published → first canary traffic."""
        out: dict[int, float] = {}
        for version, fed_at in self.example_time_before_publish.items():
            first_canary = next(
                (
                    m.at
                    for m in self.rollout_marks
                    if (m.canary == version and m.weight > 0 and m.state == "canary")
                    or (m.stable == version and m.state == "stable")
                ),
                None,
            )
            if first_canary is not None:
                out[version] = (first_canary - fed_at).total_seconds()
        return out

    def serving_accuracy(self) -> list[tuple[datetime, float]]:
        """Accuracy of whichever version was stable when each metrics point was taken."""
        return self._serving(lambda point: point.accuracy)

    def serving_mae(self) -> list[tuple[datetime, float]]:
        """Regression: MAE of whichever version was stable at each metrics point."""
        return self._serving(lambda point: point.mae)

    def _serving(
        self, figure: Callable[[MetricPoint], float | None]
    ) -> list[tuple[datetime, float]]:
        out: list[tuple[datetime, float]] = []
        for point in self.metric_points:
            stable = self._stable_at(point.at)
            value = figure(point)
            if point.version == stable and value is not None and point.count > 0:
                out.append((point.at, value))
        return out

    def _stable_at(self, at: datetime) -> int | None:
        stable: int | None = None
        for mark in self.rollout_marks:
            if mark.at > at:
                break
            stable = mark.stable
        if stable is None and self.publications:
            stable = self.publications[0].version
        return stable

    def drift_recovery_seconds(self, margin: float = 0.05) -> float | None:
        """Drift onset → the serving version's accuracy is back within ``margin`` of before
        (a regression model's MAE: back within ``2 * margin`` of it, relatively)."""
        if self.drift_at is None:
            return None
        series = self.serving_accuracy()
        relative = False
        if not series:
            # Lower is better: negated, so "worse" is "smaller" as for accuracy.
            series = [(at, -mae) for at, mae in self.serving_mae()]
            relative = True
        before = [acc for at, acc in series if at < self.drift_at]
        if not before:
            return None
        baseline = sum(before[-5:]) / len(before[-5:])
        if relative:
            margin = 2 * margin * abs(baseline)
        after = [(at, acc) for at, acc in series if at >= self.drift_at]
        dipped = False
        for at, acc in after:
            if acc < baseline - margin:
                dipped = True
            elif dipped and acc >= baseline - margin:
                return (at - self.drift_at).total_seconds()
        return None

    def summary(self) -> dict[str, object]:
        fresh = self.freshness_seconds()
        recovery = self.drift_recovery_seconds()
        latest = self.latest_metrics()
        return {
            "model_name": self.model_name,
            "events": self.events,
            "predictions": self.predictions,
            "feedback": self.feedback,
            "labelled_examples": self.examples,
            "versions_published": [p.version for p in self.publications],
            "promotions": [m.stable for m in self.promotions()],
            "rollbacks": [
                {"version": m.canary, "state": m.state, "reason": m.reason}
                for m in self.rollbacks()
            ],
            "dropped_in_shadow": self.dropped_in_shadow(),
            "rollout_changes": len(self.rollout_marks),
            "freshness_seconds": {str(k): round(v, 3) for k, v in fresh.items()},
            "drift_at": self.drift_at.isoformat() if self.drift_at else None,
            "drift_recovery_seconds": None if recovery is None else round(recovery, 3),
            "latest_metrics": {
                str(v): {
                    "count": p.count,
                    "accuracy": _round(p.accuracy),
                    "log_loss": _round(p.log_loss),
                    "auc": _round(p.auc),
                    "loss": _round(p.loss),
                    "mae": _round(p.mae),
                }
                for v, p in sorted(latest.items())
            },
        }


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 4)


def _operational_only(event: VersionMetrics) -> bool:
    """A gateway snapshot: error rate or latency, and none of the trainer's quality figures."""
    quality = (event.loss, event.log_loss, event.accuracy, event.auc, event.mae)
    operational = (event.error_rate, event.latency_p99_ms)
    return all(v is None for v in quality) and any(v is not None for v in operational)
