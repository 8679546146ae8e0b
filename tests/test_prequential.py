"""The prequential benchmark's scoring (``bench/_prequential_scoring.py``): per-segment means
and samples-to-recover on sequences whose answers are known by construction."""

from __future__ import annotations

import pytest

from bench._prequential_scoring import (
    ACCURACY,
    MAE,
    Criterion,
    bounds,
    recovery,
    rolling,
    score,
    segment_means,
)

pytestmark = pytest.mark.unit  # pure logic


def test_segments_are_cut_at_the_drifts() -> None:
    assert bounds(10, [4, 7]) == [(0, 4), (4, 7), (7, 10)]
    assert bounds(10, []) == [(0, 10)]
    values = [1.0] * 4 + [0.0] * 3 + [1.0, 0.0, 1.0]
    means = segment_means(values, [7, 4])
    assert means == pytest.approx([1.0, 0.0, 2 / 3])


def test_recovery_counts_samples_until_the_post_drift_window_is_back() -> None:
    # Perfect before the drift at 1000; after it, wrong for 300 samples, then perfect again.
    values = [1.0] * 1000 + [0.0] * 300 + [1.0] * 2000
    crit = Criterion(higher_is_better=True, tolerance=0.01, window=500, min_samples=100)
    got = recovery(values, 1000, crit)
    assert got.before == 1.0 and got.target == pytest.approx(0.99)
    # The last 500 post-drift samples must hold at most 5 misses: the window
    # (k - 500, k] after the drift holds its first one past sample 300 + 495 = 795.
    assert got.samples == 795
    assert got.lowest == 0.0


def test_a_learner_that_never_drops_recovers_at_the_first_counted_sample() -> None:
    values = [1.0] * 2000
    got = recovery(values, 1000, ACCURACY)
    assert got.samples == ACCURACY.min_samples


def test_never_back_before_the_next_drift_is_not_recovered() -> None:
    values = [1.0] * 1000 + [0.5] * 1000 + [1.0] * 1000
    got = recovery(values, 1000, ACCURACY, until=2000)
    assert got.samples is None
    assert got.lowest == pytest.approx(0.5)
    # Without the next drift in the way it does come back: 500 + 5 samples in.
    assert recovery(values, 1000, ACCURACY).samples is not None


def test_an_error_recovers_within_a_relative_tolerance() -> None:
    # MAE 2.0 before; 4.0 for 200 samples after the drift, then 2.0.
    values = [2.0] * 1000 + [4.0] * 200 + [2.0] * 1000
    crit = Criterion(higher_is_better=False, tolerance=0.01, window=100, min_samples=10)
    got = recovery(values, 1000, crit)
    assert got.target == pytest.approx(2.02)
    # A window of 100 holds no 4.0 (each adds 0.02 to the mean) from k = 300 on; with one
    # 4.0 left its mean is 2.02, the target itself: k = 299.
    assert got.samples == 299
    assert got.lowest == pytest.approx(4.0)
    assert MAE.target(2.0) == pytest.approx(2.02)


def test_score_gives_overall_segments_and_each_drift() -> None:
    values: list[float | None] = [1.0] * 600 + [0.0] * 100 + [1.0] * 600 + [None] * 100
    values += [1.0] * 600
    got = score("x", values, [600, 1300], ACCURACY)
    assert got.answered == len(values) - 100
    assert got.overall == pytest.approx(1800 / 2000)
    assert got.segments == pytest.approx([1.0, 600 / 700, 600 / 700])
    assert [r.drift_at for r in got.recoveries] == [600, 1300]
    # Unanswered samples count as wrong: both drifts cost 100 misses, recovered alike.
    assert got.recoveries[0].samples == got.recoveries[1].samples == 595


def test_rolling_means_every_few_samples() -> None:
    values = [0.0] * 10 + [1.0] * 10
    assert rolling(values, window=10, every=5) == [(5, 0.0), (10, 0.0), (15, 0.5), (20, 1.0)]
