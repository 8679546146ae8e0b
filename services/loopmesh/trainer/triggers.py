"""When to retrain: new examples, drift of the stable version's live metric, model age.

Pure decisions over plain numbers; ``core`` feeds them and makes sure only one run exists at
a time. Each trigger can be disabled (None) and they combine with ``any`` or ``all``.
Examples are counted since the last run *started* (not since the last published version):
otherwise a rejected run would be retried on every new example.
"""

from __future__ import annotations

from dataclasses import dataclass

from loopmesh.mesh.events import VersionMetrics
from loopmesh.trainer.settings import TriggerSettings

HIGHER_IS_BETTER = {"auc": True, "accuracy": True, "log_loss": False, "loss": False, "mae": False}


@dataclass
class DriftDetector:
    """Watches one live metric of the stable version against its best window so far."""

    metric: str
    threshold: float
    min_count: int
    version: int | None = None
    best: float | None = None
    current: float | None = None

    def observe(self, metrics: VersionMetrics, stable_version: int | None) -> bool:
        """Feed one window; True when the stable version has drifted beyond the threshold."""
        if stable_version is None or metrics.model_version != stable_version:
            return False
        if self.version != stable_version:
            self.version, self.best, self.current = stable_version, None, None
        value = getattr(metrics, self.metric)
        if value is None or metrics.count < self.min_count:
            return False
        self.current = float(value)
        higher = HIGHER_IS_BETTER[self.metric]
        if self.best is None or (value > self.best if higher else value < self.best):
            self.best = float(value)
        return self.drifted

    @property
    def drifted(self) -> bool:
        if self.best is None or self.current is None:
            return False
        worse = (
            self.best - self.current
            if HIGHER_IS_BETTER[self.metric]
            else (self.current - self.best)
        )
        return worse > self.threshold

    def reset(self) -> None:
        """Forget the reference (after a run started, so one drift starts one run)."""
        self.best = self.current = None


@dataclass(frozen=True)
class TriggerInputs:
    new_examples: int
    total_examples: int
    drifted: bool
    newest_version_age: float | None
    """Seconds since the newest version was published; None when there is none."""
    since_last_run: float | None
    """Seconds since the last run ended; None when there was none."""


@dataclass
class TriggerPolicy:
    settings: TriggerSettings
    min_rows: int
    drift_metric: str = "auc"
    """The metric the drift detector watches (the setting, or the task's primary)."""

    def due(self, inputs: TriggerInputs) -> list[str]:
        """Reasons to start a run now (empty: not due)."""
        s = self.settings
        if inputs.since_last_run is not None and inputs.since_last_run < s.cooldown_seconds:
            return []
        if inputs.total_examples < self.min_rows:
            return []
        checks: list[tuple[str, bool]] = []
        if s.min_new_examples is not None:
            checks.append(
                (
                    f"{inputs.new_examples} new examples >= {s.min_new_examples}",
                    inputs.new_examples >= s.min_new_examples,
                )
            )
        if s.drift_threshold is not None:
            checks.append((f"drift of live {self.drift_metric}", inputs.drifted))
        if s.max_age_seconds is not None:
            age = inputs.newest_version_age
            old = age is None or age >= s.max_age_seconds
            # Age alone never retrains on data it has already seen.
            checks.append((f"newest version older than {s.max_age_seconds:g}s", old))
            if inputs.new_examples == 0:
                checks[-1] = (checks[-1][0], False)
        if not checks:
            return []
        fired = [reason for reason, ok in checks if ok]
        if s.mode == "all":
            return fired if len(fired) == len(checks) else []
        return fired
