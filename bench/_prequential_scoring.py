"""Prequential (test-then-train) scoring of one learner's answers on a stream with known drifts.

Pure logic, no I/O: ``bench/prequential.py`` feeds it the per-sample scores of the mesh and of
River's learners, and ``tests/test_prequential.py`` checks it on sequences with known answers.

A learner's answers become one number per sample: 1.0 or 0.0 (correct or not) for a
classifier, the absolute error for a regressor. Over them:

- ``segment_means``: the mean over the whole stream and over each segment between drifts
  (accuracy, or MAE).
- ``recovery``: after a drift at sample ``d``, the number of samples ``k`` until the mean of
  the post-drift rolling window (the last ``min(k, window)`` samples after ``d``) is back at
  the pre-drift level (the mean of the ``window`` samples before ``d``) within a tolerance:
  ``tolerance`` points below it for accuracy, ``tolerance`` relative above it for MAE.
  ``k`` starts at ``min_samples`` so that a lucky handful of samples right after the drift
  does not count; the search stops at the next drift (None: not recovered).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise


@dataclass(frozen=True)
class Criterion:
    """What "back at the pre-drift level" means."""

    higher_is_better: bool
    """True for accuracy, False for an error (MAE)."""
    tolerance: float
    """Accuracy: absolute (0.01 = one point); error: relative (0.01 = 1% above)."""
    window: int = 500
    """Rolling window (samples) of the pre-drift level and of the post-drift figure."""
    min_samples: int = 250
    """Least samples after the drift before a window may count as recovered."""

    def target(self, before: float) -> float:
        if self.higher_is_better:
            return before - self.tolerance
        return before * (1.0 + self.tolerance)

    def met(self, value: float, target: float) -> bool:
        # A tiny slack: a window mean equal to the target (1 - 1/100 in floats) counts.
        eps = 1e-12
        return value >= target - eps if self.higher_is_better else value <= target + eps


ACCURACY = Criterion(higher_is_better=True, tolerance=0.01)
"""Within one accuracy point of the pre-drift level."""
MAE = Criterion(higher_is_better=False, tolerance=0.01)
"""Within 1% (relative) of the pre-drift MAE."""


@dataclass(frozen=True)
class Recovery:
    drift_at: int
    before: float
    """The pre-drift level: the mean of the ``window`` samples before the drift."""
    target: float
    lowest: float
    """The worst post-drift window figure before recovery (or up to the next drift)."""
    samples: int | None
    """Samples after the drift until recovered; None: not recovered before the next drift."""


class Prefix:
    """Means over any range of a sequence in O(1) (prefix sums)."""

    def __init__(self, values: Sequence[float]) -> None:
        self._sums = [0.0, *accumulate(float(v) for v in values)]

    def __len__(self) -> int:
        return len(self._sums) - 1

    def mean(self, start: int, end: int) -> float | None:
        """Mean of ``values[start:end]``; None when the range is empty."""
        start, end = max(0, start), min(len(self), end)
        if end <= start:
            return None
        return (self._sums[end] - self._sums[start]) / (end - start)


def bounds(n: int, drifts: Sequence[int]) -> list[tuple[int, int]]:
    """The segments ``[start, end)`` of a stream of ``n`` samples cut at ``drifts``."""
    cuts = [0, *sorted(d for d in drifts if 0 < d < n), n]
    return list(pairwise(cuts))


def segment_means(values: Sequence[float], drifts: Sequence[int]) -> list[float | None]:
    """Mean of each segment between drifts, in order."""
    prefix = Prefix(values)
    return [prefix.mean(start, end) for start, end in bounds(len(values), drifts)]


def recovery(
    values: Sequence[float], drift_at: int, criterion: Criterion, until: int | None = None
) -> Recovery:
    """How many samples after ``drift_at`` the learner needed to get back (see the module)."""
    prefix = Prefix(values)
    end = len(values) if until is None else min(until, len(values))
    before = prefix.mean(drift_at - criterion.window, drift_at)
    if before is None:
        raise ValueError(f"no samples before the drift at {drift_at}")
    target = criterion.target(before)
    lowest: float | None = None
    for k in range(max(1, criterion.min_samples), end - drift_at + 1):
        figure = prefix.mean(max(drift_at, drift_at + k - criterion.window), drift_at + k)
        assert figure is not None  # k >= 1 samples after the drift
        if criterion.met(figure, target):
            return Recovery(drift_at, before, target, before if lowest is None else lowest, k)
        if lowest is None or (figure < lowest if criterion.higher_is_better else figure > lowest):
            lowest = figure
    return Recovery(drift_at, before, target, before if lowest is None else lowest, None)


def rolling(values: Sequence[float], window: int, every: int) -> list[tuple[int, float]]:
    """(sample count, mean of the last ``window`` samples) every ``every`` samples."""
    prefix = Prefix(values)
    out = []
    for end in range(every, len(values) + 1, every):
        mean = prefix.mean(end - window, end)
        assert mean is not None
        out.append((end, mean))
    return out


@dataclass(frozen=True)
class LearnerScore:
    """One learner's prequential figures on one stream."""

    name: str
    overall: float | None
    segments: list[float | None]
    recoveries: list[Recovery]
    answered: int
    """Samples with an answer (the mesh may fail a call; River always answers)."""


def score(
    name: str, values: Sequence[float | None], drifts: Sequence[int], criterion: Criterion
) -> LearnerScore:
    """Overall and per-segment means and each drift's recovery. A sample without an answer
    (None) counts as wrong for accuracy; for an error it is left out (and counted)."""
    if criterion.higher_is_better:
        filled = [0.0 if v is None else v for v in values]
    else:
        # An unanswered sample has no error to count: carry the previous one (rare; counted).
        filled, last = [], 0.0
        for v in values:
            last = last if v is None else v
            filled.append(last)
    cuts = sorted(drifts)
    nexts = [*cuts[1:], len(filled)]
    return LearnerScore(
        name=name,
        overall=Prefix(filled).mean(0, len(filled)),
        segments=segment_means(filled, cuts),
        recoveries=[
            recovery(filled, d, criterion, until=e) for d, e in zip(cuts, nexts, strict=True)
        ],
        answered=sum(v is not None for v in values),
    )
