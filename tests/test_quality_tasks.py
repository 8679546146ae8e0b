"""The loss, its variance and the primary metric of each task, against independent
computations straight from the definitions (plain Python, no numpy)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from loopmesh.mesh.quality import PRIMARY, per_example_loss, task_scores


def test_binary_is_log_loss_and_auc() -> None:
    rng = random.Random(1)
    y = [rng.randint(0, 1) for _ in range(200)]
    p = [min(max(rng.random(), 1e-3), 1 - 1e-3) for _ in y]
    losses = [-(t * math.log(q) + (1 - t) * math.log(1 - q)) for t, q in zip(y, p, strict=True)]
    got = task_scores("binary", y, p)
    assert got.loss == pytest.approx(statistics.fmean(losses))
    assert got.loss_var == pytest.approx(statistics.variance(losses))
    pos = [q for t, q in zip(y, p, strict=True) if t]
    neg = [q for t, q in zip(y, p, strict=True) if not t]
    pairs = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    assert got.primary == pytest.approx(pairs / (len(pos) * len(neg)))
    assert PRIMARY["binary"] == ("auc", True)


def test_multiclass_is_cross_entropy_and_accuracy() -> None:
    rng = random.Random(2)
    k = 4
    rows = []
    for _ in range(150):
        raw = [rng.random() + 1e-3 for _ in range(k)]
        rows.append([r / sum(raw) for r in raw])
    y = [rng.randrange(k) for _ in rows]
    losses = [-math.log(row[t]) for row, t in zip(rows, y, strict=True)]
    got = task_scores("multiclass", y, rows)
    assert got.loss == pytest.approx(statistics.fmean(losses))
    assert got.loss_var == pytest.approx(statistics.variance(losses))
    hits = sum(max(range(k), key=row.__getitem__) == t for row, t in zip(rows, y, strict=True))
    assert got.primary == pytest.approx(hits / len(y))
    with pytest.raises(ValueError, match="integers in"):
        per_example_loss("multiclass", [0, 4], rows[:2])


def test_regression_is_squared_error_and_mae() -> None:
    rng = random.Random(3)
    y = [rng.gauss(10, 5) for _ in range(100)]
    out = [t + rng.gauss(0, 2) for t in y]
    squares = [(o - t) ** 2 for o, t in zip(out, y, strict=True)]
    got = task_scores("regression", y, out)
    assert got.loss == pytest.approx(statistics.fmean(squares))
    assert got.loss_var == pytest.approx(statistics.variance(squares))
    assert got.primary == pytest.approx(
        statistics.fmean(abs(o - t) for o, t in zip(out, y, strict=True))
    )
    assert PRIMARY["regression"] == ("mae", False)


def test_no_examples_and_bad_outputs() -> None:
    empty = task_scores("regression", [], [])
    assert (empty.count, empty.loss, empty.primary) == (0, None, None)
    with pytest.raises(ValueError, match="NaN"):
        task_scores("binary", [1], [float("nan")])
