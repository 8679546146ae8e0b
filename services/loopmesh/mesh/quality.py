"""Quality figures shared by the live window, the gate and the benchmark: binary ones, and the
loss, its variance and the primary metric of every task (binary, multiclass, regression).

Pure numpy. AUC is the Mann-Whitney statistic with average ranks for ties, so a constant
predictor scores exactly 0.5 and the figure matches the usual ROC-curve area.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from loopmesh.mesh.events import Task

EPS = 1e-7
"""Probabilities are clipped to [EPS, 1-EPS] so one confident miss cannot be infinite."""

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Scores:
    """Figures of one set of predictions against labels (None where undefined)."""

    count: int
    log_loss: float | None
    auc: float | None
    accuracy: float | None
    label_rate: float | None

    def as_dict(self) -> dict[str, float]:
        """The defined figures, for metadata and events (which refuse None and NaN)."""
        return {k: float(v) for k, v in asdict(self).items() if v is not None}


def log_loss(labels: npt.ArrayLike, probs: npt.ArrayLike) -> float:
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    if y.size == 0:
        raise ValueError("log_loss of no examples")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def log_loss_variance(labels: npt.ArrayLike, probs: npt.ArrayLike) -> float:
    """Variance of the per-example log loss (the rollout's confidence bound uses it)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    if y.size == 0:
        raise ValueError("log_loss_variance of no examples")
    losses = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(losses.var(ddof=1)) if y.size > 1 else 0.0


def accuracy(labels: npt.ArrayLike, probs: npt.ArrayLike, threshold: float = 0.5) -> float:
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if y.size == 0:
        raise ValueError("accuracy of no examples")
    return float(np.mean((p >= threshold) == (y >= 0.5)))


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    y = np.asarray(labels, dtype=np.float64) >= 0.5
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(s)
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _average_ranks(values: FloatArray) -> FloatArray:
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start of each run of equal values; every member gets the run's mean 1-based rank.
    starts = np.concatenate(([True], sorted_values[1:] != sorted_values[:-1]))
    run_id = np.cumsum(starts) - 1
    run_start = np.flatnonzero(starts)
    run_end = np.concatenate((run_start[1:], [values.size]))
    mean_rank = (run_start + run_end + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def score(labels: npt.ArrayLike, probs: npt.ArrayLike) -> Scores:
    """All figures at once; every figure but count is None for no examples."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} differ in shape")
    if y.size == 0:
        return Scores(0, None, None, None, None)
    if not np.all(np.isfinite(p)):
        raise ValueError("predictions contain NaN or infinity")
    return Scores(
        count=int(y.size),
        log_loss=log_loss(y, p),
        auc=roc_auc(y, p),
        accuracy=accuracy(y, p),
        label_rate=float(y.mean()),
    )


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# ------------------------------------------------------------------ figures of every task

PRIMARY: dict[str, tuple[str, bool]] = {
    "binary": ("auc", True),
    "multiclass": ("accuracy", True),
    "regression": ("mae", False),
}
"""Each task's primary metric and whether higher is better (the gate and the dashboards)."""
LOSS: dict[str, str] = {"binary": "log_loss", "multiclass": "cross_entropy", "regression": "mse"}
"""Each task's loss: the per-example quantity whose mean the canary analysis compares."""


@dataclass(frozen=True)
class TaskScores:
    """One task's figures: the loss (mean per-example loss, what training minimises and the
    canary bound compares), the variance of the per-example loss (the bound's width), and the
    task's metrics by name (None where undefined)."""

    task: str
    count: int
    loss: float | None
    loss_var: float | None
    metrics: dict[str, float | None]

    @property
    def primary(self) -> float | None:
        return self.metrics.get(PRIMARY[self.task][0])

    def as_dict(self) -> dict[str, float]:
        """The defined figures by name: ``loss``, ``loss_var``, the metrics, ``count``."""
        figures = {"loss": self.loss, "loss_var": self.loss_var, **self.metrics}
        out = {k: float(v) for k, v in figures.items() if v is not None}
        out["count"] = float(self.count)
        return out


def per_example_loss(task: Task, targets: npt.ArrayLike, outputs: npt.ArrayLike) -> FloatArray:
    """The loss of each example: log loss (binary, outputs are probabilities), cross-entropy
    (multiclass, outputs are ``[n, k]`` class probabilities, targets class indices) or squared
    error (regression)."""
    y = np.asarray(targets, dtype=np.float64)
    out = np.asarray(outputs, dtype=np.float64)
    if task == "binary":
        p = np.clip(out, EPS, 1 - EPS)
        losses: FloatArray = -(y * np.log(p) + (1 - y) * np.log(1 - p))
        return losses
    if task == "multiclass":
        if out.ndim != 2 or out.shape[0] != y.size:
            raise ValueError(f"multiclass outputs must be [n, k], got {out.shape} for {y.size}")
        index = y.astype(np.int64)
        if np.any(index < 0) or np.any(index >= out.shape[1]) or np.any(index != y):
            raise ValueError(f"class labels must be integers in [0, {out.shape[1]})")
        chosen = np.clip(out[np.arange(y.size), index], EPS, 1.0)
        ce: FloatArray = -np.log(chosen)
        return ce
    squared: FloatArray = (out - y) ** 2
    return squared


def task_scores(task: Task, targets: npt.ArrayLike, outputs: npt.ArrayLike) -> TaskScores:
    """Every figure of ``task`` at once; all None but the count for no examples."""
    y = np.asarray(targets, dtype=np.float64)
    out = np.asarray(outputs, dtype=np.float64)
    names = {"binary": ("auc", "accuracy"), "multiclass": ("accuracy",), "regression": ("mae",)}
    if y.size == 0:
        return TaskScores(task, 0, None, None, dict.fromkeys(names[task]))
    if not np.all(np.isfinite(out)):
        raise ValueError("outputs contain NaN or infinity")
    if task != "multiclass" and y.shape != out.shape:
        raise ValueError(f"targets {y.shape} and outputs {out.shape} differ in shape")
    losses = per_example_loss(task, y, out)
    metrics: dict[str, float | None]
    if task == "binary":
        metrics = {"auc": roc_auc(y, out), "accuracy": accuracy(y, out)}
    elif task == "multiclass":
        metrics = {"accuracy": float(np.mean(np.argmax(out, axis=1) == y))}
    else:
        metrics = {"mae": float(np.mean(np.abs(out - y)))}
    return TaskScores(
        task=task,
        count=int(y.size),
        loss=float(losses.mean()),
        loss_var=float(losses.var(ddof=1)) if y.size > 1 else 0.0,
        metrics=metrics,
    )
