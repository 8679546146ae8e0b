"""The run's artefacts: a PNG of live metric per version with rollout events, and a JSON summary."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from loopmesh.devstack.state import LoopState

_MARK_COLOURS = {"canary": "tab:orange", "stable": "tab:green", "rolled_back": "tab:red"}


def write_plot(state: LoopState, path: Path) -> Path:
    """Live accuracy per model version over time; vertical lines mark rollout changes."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    by_version: dict[int, tuple[list[float], list[float]]] = {}
    for point in state.metric_points:
        if point.accuracy is None or point.count == 0:
            continue
        xs, ys = by_version.setdefault(point.version, ([], []))
        xs.append(_days(point.at))
        ys.append(point.accuracy)
    for version, (xs, ys) in sorted(by_version.items()):
        ax.plot(xs, ys, marker=".", linewidth=1.2, label=f"v{version}")
    for mark in state.rollout_marks:
        colour = _MARK_COLOURS.get(mark.state, "tab:gray")
        at = _days(mark.at)
        ax.axvline(at, color=colour, alpha=0.35, linestyle="--", linewidth=0.8)
        label = f"{mark.state} v{mark.canary or mark.stable} {mark.weight:.0%}"
        ax.annotate(label, (at, 1.0), rotation=90, fontsize=6, va="top", color=colour)
    if state.drift_at is not None:
        drift = _days(state.drift_at)
        ax.axvline(drift, color="black", linewidth=1.5, label="concept drift")
    ax.xaxis_date()
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("live accuracy (joined feedback, sliding window)")
    ax.set_xlabel("time")
    ax.set_title(f"LoopMesh: {state.model_name} live metric per version")
    if ax.get_legend_handles_labels()[0]:  # nothing served yet (a run stopped early): no legend
        ax.legend(loc="lower left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _days(at: datetime) -> float:
    # matplotlib's date axis counts days since its epoch, 1970-01-01 UTC by default.
    return at.timestamp() / 86400.0


def write_summary(state: LoopState, path: Path, extra: dict[str, object] | None = None) -> Path:
    data = state.summary()
    if extra:
        data.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path
