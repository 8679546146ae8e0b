"""Sliding-window live metrics per model version, fed with joined examples (pure, in memory).

The window is in event time: its end is the newest ``feedback_at`` seen for the model (the
model's watermark), so a replayed backlog gives the same figures as live traffic. A version
that stops getting traffic drains as the watermark moves on and is reported once more with
count 0, then forgotten. The windows are rebuilt from traffic after a restart; consumers of
``metrics.live`` (rollout, drift trigger) require a minimum count, so a young window is
never mistaken for a verdict.

Shadow candidates' answers carried by an example (``LabelledExample.shadow``) go to a window of
their own per (shadow version, version that answered), each point holding both answers: its
snapshot is the shadow's figures on those requests plus the paired differences (loss, and
correctness for classifiers) whose mean and variance the rollout bounds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from loopmesh.mesh.events import LabelledExample, Task, VersionMetrics
from loopmesh.mesh.quality import (
    FloatArray,
    log_loss_variance,
    per_example_loss,
    score,
    task_scores,
)

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


ShadowKey = tuple[str, int, int]
"""(model, shadow version, the version that answered)."""


@dataclass
class PairedWindow:
    """(time, shadow's output, the answering version's output, target, prediction id)."""

    seconds: float
    max_points: int
    task: Task = "binary"
    points: deque[tuple[float, Output, Output, float, str]] = field(default_factory=deque)
    ids: set[str] = field(default_factory=set)

    def add(self, at: float, mine: Output, theirs: Output, target: float, pid: str) -> None:
        if pid in self.ids:
            return
        self.points.append((at, mine, theirs, target, pid))
        self.ids.add(pid)
        while len(self.points) > self.max_points:
            self.ids.discard(self.points.popleft()[4])

    def trim(self, end: float) -> None:
        start = end - self.seconds
        while self.points and self.points[0][0] < start:
            self.ids.discard(self.points.popleft()[4])


def _outputs(task: Task, values: list[Output]) -> FloatArray:
    if task == "multiclass":
        return np.array(values, dtype=np.float64).reshape(len(values), -1)
    out: FloatArray = np.array(values, dtype=np.float64)
    return np.clip(out, 0.0, 1.0) if task == "binary" else out


def _correct(task: Task, targets: FloatArray, outputs: FloatArray) -> FloatArray:
    if task == "multiclass":
        right: FloatArray = (np.argmax(outputs, axis=1) == targets).astype(np.float64)
    else:
        right = ((outputs >= 0.5).astype(np.float64) == targets).astype(np.float64)
    return right


def _mean_var(values: FloatArray) -> tuple[float | None, float | None]:
    if values.size == 0:
        return None, None
    return float(values.mean()), float(values.var(ddof=1)) if values.size > 1 else 0.0


class LiveMetrics:
    """Windows of every version this worker owns, and which of them changed."""

    def __init__(self, window_seconds: float, max_points: int) -> None:
        self.window_seconds = window_seconds
        self.max_points = max_points
        self._windows: dict[VersionKey, VersionWindow] = {}
        self._paired: dict[ShadowKey, PairedWindow] = {}
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
        for shadow in example.shadow:
            key3 = (example.model_name, shadow.model_version, example.model_version)
            paired = self._paired.get(key3)
            if paired is None:
                paired = self._paired[key3] = PairedWindow(
                    self.window_seconds, self.max_points, example.task
                )
            mine: Output = tuple(shadow.outputs) if example.task == "multiclass" else shadow.score
            if example.task == "multiclass" and len(shadow.outputs) != len(example.outputs):
                continue  # a shadow with other classes cannot be paired
            paired.add(at, mine, output, example.target, example.prediction_id)
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

    def paired_snapshot(self, model_name: str, version: int, answered_by: int) -> VersionMetrics:
        """Figures of shadow ``version`` on the requests ``answered_by`` answered, paired."""
        window = self._paired.get((model_name, version, answered_by))
        if window is not None:
            window.trim(self._watermark.get(model_name, 0.0))
        points = list(window.points) if window is not None else []
        task: Task = window.task if window is not None else "binary"
        targets = np.fromiter((p[3] for p in points), dtype=np.float64, count=len(points))
        mine = _outputs(task, [p[1] for p in points])
        theirs = _outputs(task, [p[2] for p in points])
        scores = task_scores(task, targets, mine)
        figures: dict[str, float | None] = {
            "loss": scores.loss,
            "loss_var": scores.loss_var if scores.count else None,
            "accuracy": scores.metrics.get("accuracy"),
            "auc": scores.metrics.get("auc"),
            "mae": scores.metrics.get("mae"),
        }
        if task == "binary":
            figures["log_loss"] = scores.loss
            figures["label_rate"] = float(targets.mean()) if targets.size else None
        if points:
            diff = per_example_loss(task, targets, mine) - per_example_loss(task, targets, theirs)
            figures["paired_loss_diff"], figures["paired_loss_diff_var"] = _mean_var(diff)
            if task != "regression":
                right = _correct(task, targets, mine) - _correct(task, targets, theirs)
                figures["paired_accuracy_diff"], figures["paired_accuracy_diff_var"] = _mean_var(
                    right
                )
        return VersionMetrics(
            model_name=model_name,
            model_version=version,
            window_seconds=self.window_seconds,
            count=scores.count,
            task=task,
            shadow_of=answered_by,
            **figures,
        )

    def drain(self) -> list[VersionMetrics]:
        """Metrics of every version of every model whose window moved since the last drain
        (shadow candidates' paired figures included)."""
        out = []
        for model_name in sorted(self._dirty):
            for name, version in self.versions():
                if name != model_name:
                    continue
                metrics = self.snapshot(name, version)
                out.append(metrics)
                if metrics.count == 0:
                    del self._windows[(name, version)]
            for name, version, answered_by in sorted(self._paired):
                if name != model_name:
                    continue
                metrics = self.paired_snapshot(name, version, answered_by)
                out.append(metrics)
                if metrics.count == 0:
                    del self._paired[(name, version, answered_by)]
        self._dirty.clear()
        return out

    def forget(self, model_names: set[str]) -> None:
        """Drop the windows of models whose partitions moved to another worker."""
        for key in [k for k in self._windows if k[0] in model_names]:
            del self._windows[key]
        for pair in [k for k in self._paired if k[0] in model_names]:
            del self._paired[pair]
        for name in model_names:
            self._watermark.pop(name, None)
            self._dirty.discard(name)
