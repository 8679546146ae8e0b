"""When to retrain: new examples, drift of the stable version's loss, model age.

Pure decisions over plain numbers; ``core`` feeds them and makes sure only one run exists at
a time. Each trigger can be disabled (None) and they combine with ``any`` or ``all``.
Examples are counted since the last run *started* (not since the last published version):
otherwise a rejected run would be retried on every new example.

Drift: ``LossDriftDetector`` runs River's ADWIN (or Page-Hinkley) over the per-example loss
of the examples the stable version served, in prediction order (``example_losses``: the
joiner's loss of each task, from ``mesh.quality``). At a detection the change point is the
split of the detector's window that best separates a lower mean loss before from a higher
one after (the likelihood-ratio estimate of one mean shift, as in binary segmentation):
ADWIN's own shrunk window starts at a bucket boundary, often hundreds of examples before the
change, too early to narrow the training window with. The detection delay is what came
after that point: examples, and seconds of prediction time.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from pydantic import BaseModel
from river.drift import ADWIN, PageHinkley

from loopmesh.mesh.events import LabelledExample
from loopmesh.mesh.quality import per_example_loss
from loopmesh.trainer.settings import TriggerSettings

HISTORY = 50_000
"""The change point is searched among at most this many newest examples of the detector."""
MIN_SEGMENT = 5
"""Fewest examples on either side of an estimated change point."""


class DriftReport(BaseModel):
    """One detection: which detector, where the change began, how long it took to see it."""

    detector: str
    model_version: int
    """The stable version whose examples drifted."""
    change_at: datetime
    """Prediction time of the first example after the estimated change point."""
    detected_at: datetime
    """Prediction time of the example at which the detector fired."""
    delay_examples: int
    """Examples from the change point to the detection (both included)."""
    delay_seconds: float
    """Prediction time from the change point to the detection."""
    examples_seen: int
    """Examples the detector had seen since it started (stable version or last detection)."""
    loss_before: float
    """Mean per-example loss before the change point (in the detector's window)."""
    loss_after: float
    """Mean per-example loss from the change point on."""

    def reason(self) -> str:
        return (
            f"drift ({self.detector} over per-example loss of version {self.model_version}): "
            f"change at {self.change_at.isoformat(timespec='seconds')}, detected "
            f"{self.delay_examples} examples / {self.delay_seconds:.1f}s later "
            f"(loss {self.loss_before:.4g} -> {self.loss_after:.4g})"
        )


def example_losses(examples: Sequence[LabelledExample]) -> list[float | None]:
    """The loss of each example as the joiner's live windows count it (None: the example has
    no loss of its task, e.g. a binary target that is not 0/1 or multiclass without outputs)."""
    out: list[float | None] = [None] * len(examples)
    for task in ("binary", "regression"):
        rows = [i for i, e in enumerate(examples) if e.task == task]
        if not rows:
            continue
        y = np.asarray([examples[i].target for i in rows], dtype=np.float64)
        score = np.asarray([examples[i].score for i in rows], dtype=np.float64)
        losses = per_example_loss(task, y, np.clip(score, 0.0, 1.0) if task == "binary" else score)
        for i, target, loss in zip(rows, y, losses, strict=True):
            if task == "binary" and target not in (0.0, 1.0):
                continue
            if math.isfinite(loss):
                out[i] = float(loss)
    for i, e in enumerate(examples):
        if e.task == "multiclass" and e.outputs:
            try:
                loss = float(per_example_loss("multiclass", [e.target], [e.outputs])[0])
            except ValueError:
                continue  # a class index its outputs do not have
            out[i] = loss if math.isfinite(loss) else None
    return out


def change_point(losses: Sequence[float], min_segment: int = MIN_SEGMENT) -> int | None:
    """Index of the first loss after the most likely upward shift of the mean (None: too few
    losses, or no split with a higher mean after it)."""
    x = np.asarray(losses, dtype=np.float64)
    n = x.size
    if n < 2 * min_segment:
        return None
    cumulative = np.cumsum(x)
    k = np.arange(1, n, dtype=np.float64)  # a split after k losses
    before = cumulative[:-1] / k
    after = (cumulative[-1] - cumulative[:-1]) / (n - k)
    statistic = (after - before) * np.sqrt(k * (n - k) / n)
    statistic[: min_segment - 1] = -np.inf
    statistic[n - min_segment :] = -np.inf
    best = int(np.argmax(statistic))
    if not statistic[best] > 0:
        return None
    return best + 1


class LossDriftDetector:
    """ADWIN or Page-Hinkley over the per-example loss of whichever version is stable.

    ``observe`` returns a ``DriftReport`` when the loss got worse; the detector then starts
    afresh (one drift episode, one report). A drop of the loss detected by ADWIN is no drift to
    retrain for: the detector starts afresh without a report.
    """

    def __init__(self, settings: TriggerSettings, version: int | None = None) -> None:
        if settings.drift_detector is None:
            raise ValueError("drift_detector is None: the drift trigger is disabled")
        self.kind: str = settings.drift_detector
        self.settings = settings
        self.version = version
        """The stable version whose examples it watches."""
        self.seen = 0
        """Examples since the detector started (or since its last detection)."""
        self.last: DriftReport | None = None
        self._history: deque[tuple[float, float]] = deque(maxlen=HISTORY)
        """(loss, prediction time) of the newest examples since the detector started."""
        self._total = 0.0
        self._detector: ADWIN | PageHinkley = self._new()

    def _new(self) -> ADWIN | PageHinkley:
        s = self.settings
        if self.kind == "adwin":
            return ADWIN(  # type: ignore[no-untyped-call]
                delta=s.drift_delta, clock=s.drift_clock, grace_period=s.drift_min_examples
            )
        return PageHinkley(
            min_instances=s.drift_min_examples,
            delta=s.drift_ph_delta,
            threshold=s.drift_ph_threshold,
            alpha=s.drift_ph_alpha,
            mode="up",
        )

    def reset(self, version: int | None = None) -> None:
        """Start afresh, on ``version``'s examples when given."""
        if version is not None:
            self.version = version
        self.seen = 0
        self._total = 0.0
        self._history.clear()
        self._detector = self._new()

    @property
    def mean_loss(self) -> float | None:
        """Mean loss of the examples seen since the detector started."""
        return self._total / self.seen if self.seen else None

    def observe(self, loss: float, at: float) -> DriftReport | None:
        """Feed the loss of one example predicted at ``at`` (epoch seconds)."""
        detector = self._detector
        # ADWIN's window before this example: it holds the change ADWIN may find now.
        window = int(detector.width) + 1 if isinstance(detector, ADWIN) else None
        detector.update(loss)  # type: ignore[no-untyped-call]
        self.seen += 1
        self._total += loss
        self._history.append((loss, at))
        if not detector.drift_detected:
            return None
        report = self._report(window)
        self.reset()
        if report is not None:
            self.last = report
        return report

    def _report(self, window: int | None) -> DriftReport | None:
        recent = list(self._history)
        if window is not None:
            recent = recent[-window:]
        losses = [loss for loss, _ in recent]
        start = change_point(losses)
        if start is None:
            return None
        before, after = float(np.mean(losses[:start])), float(np.mean(losses[start:]))
        if not after > before:
            return None
        # Clocks of separate partitions interleave a little: the earliest after the split.
        change = min(at for _, at in recent[start:])
        detected = recent[-1][1]
        return DriftReport(
            detector=self.kind,
            model_version=self.version or 0,
            change_at=datetime.fromtimestamp(change, UTC),
            detected_at=datetime.fromtimestamp(detected, UTC),
            delay_examples=len(recent) - start,
            delay_seconds=max(0.0, detected - change),
            examples_seen=self.seen,
            loss_before=before,
            loss_after=after,
        )


@dataclass(frozen=True)
class TriggerInputs:
    new_examples: int
    total_examples: int
    drift: DriftReport | None
    """A detection no run has started on yet."""
    newest_version_age: float | None
    """Seconds since the newest version was published; None when there is none."""
    since_last_run: float | None
    """Seconds since the last run ended; None when there was none."""


@dataclass
class TriggerPolicy:
    settings: TriggerSettings
    min_rows: int

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
        if s.drift_detector is not None:
            drift = inputs.drift
            checks.append((drift.reason() if drift else "drift", drift is not None))
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
