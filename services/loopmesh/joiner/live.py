"""Sliding-window live metrics per model version, fed with joined examples (pure, in memory).

The window is in event time: its end is the newest ``feedback_at`` seen for the model (the
model's watermark), so a replayed backlog gives the same figures as live traffic. A version
that stops getting traffic drains as the watermark moves on and is reported once more with
count 0, then forgotten. The windows are rebuilt from traffic after a restart; consumers of
``metrics.live`` (rollout, drift trigger) require a minimum count, so a young window is
never mistaken for a verdict.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from loopmesh.mesh.events import LabelledExample, Task, VersionMetrics
from loopmesh.mesh.quality import log_loss_variance, score, task_scores

VersionKey = tuple[str, int]
Output = float | tuple[float, ...]
"""What a version answered: a probability or a value, or class probabilities (multiclass)."""


@dataclass
class VersionWindow:
    """(time, output, target, prediction id) of one version's recent examples, oldest first."""

    seconds: float
    max_points: int
    task: Task = "binary"
    points: deque[tuple[float, Output, float, str]] = field(default_factory=deque)
    ids: set[str] = field(default_factory=set)

    def add(self, at: float, output: Output, target: float, prediction_id: str) -> None:
        if prediction_id in self.ids:  # a re-emitted example counts once
            return
        self.points.append((at, output, target, prediction_id))
        self.ids.add(prediction_id)
        while len(self.points) > self.max_points:
            self.ids.discard(self.points.popleft()[3])

    def trim(self, end: float) -> None:
        start = end - self.seconds
        while self.points and self.points[0][0] < start:
            self.ids.discard(self.points.popleft()[3])


class LiveMetrics:
    """Windows of every version this worker owns, and which of them changed."""

    def __init__(self, window_seconds: float, max_points: int) -> None:
        self.window_seconds = window_seconds
        self.max_points = max_points
        self._windows: dict[VersionKey, VersionWindow] = {}
        self._watermark: dict[str, float] = {}
        self._dirty: set[str] = set()
        self.added = 0
        """Examples added since start (all versions)."""

    def add(self, example: LabelledExample) -> None:
        key = (example.model_name, example.model_version)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = VersionWindow(
                self.window_seconds, self.max_points, example.task
            )
        at = example.feedback_at.timestamp()
        output: Output = tuple(example.outputs) if example.task == "multiclass" else example.score
        window.add(at, output, example.target, example.prediction_id)
        self._watermark[example.model_name] = max(self._watermark.get(example.model_name, at), at)
        self._dirty.add(example.model_name)
        self.added += 1

    def versions(self) -> list[VersionKey]:
        return sorted(self._windows)

    def snapshot(self, model_name: str, version: int) -> VersionMetrics:
        """Figures of one version's window as of the model's watermark."""
        window = self._windows.get((model_name, version))
        if window is not None:
            window.trim(self._watermark.get(model_name, 0.0))
        points = list(window.points) if window is not None else []
        task = window.task if window is not None else "binary"
        targets = np.fromiter((p[2] for p in points), dtype=np.float64, count=len(points))
        figures: dict[str, float | None]
        if task == "binary":
            probs = np.fromiter((p[1] for p in points), dtype=np.float64, count=len(points))
            probs = np.clip(probs, 0.0, 1.0)
            binary = score(targets, probs)
            variance = log_loss_variance(targets, probs) if binary.count else None
            count = binary.count
            figures = {
                "loss": binary.log_loss,
                "loss_var": variance,
                "log_loss": binary.log_loss,
                "accuracy": binary.accuracy,
                "auc": binary.auc,
                "label_rate": binary.label_rate,
                "log_loss_var": variance,
            }
        else:
            outputs = (
                np.array([p[1] for p in points], dtype=np.float64).reshape(len(points), -1)
                if task == "multiclass"
                else np.fromiter((p[1] for p in points), dtype=np.float64, count=len(points))
            )
            scores = task_scores(task, targets, outputs)
            count = scores.count
            figures = {
                "loss": scores.loss,
                "loss_var": scores.loss_var if count else None,
                "accuracy": scores.metrics.get("accuracy"),
                "mae": scores.metrics.get("mae"),
            }
        return VersionMetrics(
            model_name=model_name,
            model_version=version,
            window_seconds=self.window_seconds,
            count=count,
            task=task,
            **figures,
        )

    def drain(self) -> list[VersionMetrics]:
        """Metrics of every version of every model whose window moved since the last drain."""
        out = []
        for model_name in sorted(self._dirty):
            for name, version in self.versions():
                if name != model_name:
                    continue
                metrics = self.snapshot(name, version)
                out.append(metrics)
                if metrics.count == 0:
                    del self._windows[(name, version)]
        self._dirty.clear()
        return out

    def forget(self, model_names: set[str]) -> None:
        """Drop the windows of models whose partitions moved to another worker."""
        for key in [k for k in self._windows if k[0] in model_names]:
            del self._windows[key]
        for name in model_names:
            self._watermark.pop(name, None)
            self._dirty.discard(name)
