"""The run's artefacts: a PNG of live metric and traffic per version with rollout events, and
a JSON summary.

The chart has two panels on one time axis (seconds since the run started):

1. the live metric of each version (one line per version, from ``VersionMetrics``);
2. the traffic share of each version, stacked so the shares sum to 1. The share is the
   *configured* one, derived from ``RolloutChanged`` (stable gets ``1 - canary_weight``, the
   canary ``canary_weight``), not a measured request count.

Drift, promotions and rollbacks are vertical lines across both panels, explained once in a
small legend; a version has the same colour in both panels and one legend outside the plots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from loopmesh.devstack.state import LoopState, MetricPoint, RolloutMark
from loopmesh.mesh.quality import LOSS, PRIMARY

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.typing import LineStyleType

FIGSIZE = (13.0, 8.0)
DPI = 120

_METRIC_PREFERENCE = ("accuracy", "auc", "log_loss", "mae", "loss")
"""Which of the data's metrics the chart shows when the caller names none: the first with
values (a person reads accuracy at a glance; other tasks bring other fields)."""
_NOT_METRICS = frozenset({"at", "version", "count"})
_METRIC_NAMES = {
    "log_loss": "log loss",
    "accuracy": "accuracy",
    "auc": "AUC",
    "mae": "MAE",
    "mse": "MSE",
    "cross_entropy": "cross-entropy",
}
_HIGHER_IS_BETTER = {name for name, higher in PRIMARY.values() if higher}
_LOWER_IS_BETTER = {name for name, higher in PRIMARY.values() if not higher} | set(LOSS.values())


@dataclass(frozen=True)
class MarkStyle:
    label: str
    colour: str
    linestyle: LineStyleType
    linewidth: float


MARK_STYLES: dict[str, MarkStyle] = {
    "drift": MarkStyle("concept drift", "black", "-", 2.2),
    "promotion": MarkStyle("promotion (canary → stable)", "#1a7f37", "--", 1.5),
    "rollback": MarkStyle("rollback / abort", "#c62828", (0, (1.0, 1.2)), 1.8),
}
"""The kinds of marks, in legend order; the line's gid is ``mark:<kind>``."""


@dataclass(frozen=True)
class Chart:
    """What the chart shows, in seconds since the run started: pure data, no matplotlib."""

    model_name: str
    metric: str
    """The field of the metric points shown in panel 1, e.g. ``accuracy``."""
    metric_label: str
    lines: dict[int, tuple[list[float], list[float]]]
    """Per version: (seconds, metric values) of its live-metric points."""
    share_times: list[float]
    """Seconds of each rollout change, then the end of the run: the shares hold from each
    time until the next (a step function)."""
    shares: dict[int, list[float]]
    """Per version: its configured traffic share at each of ``share_times``."""
    marks: dict[str, list[float]]
    """Per kind of ``MARK_STYLES``: the seconds at which it happened."""
    start: float
    end: float

    @property
    def versions(self) -> list[int]:
        return sorted(set(self.lines) | set(self.shares))


def chart_data(
    state: LoopState,
    *,
    started_at: datetime | None = None,
    ended_at: datetime | None = None,
    metric: str | None = None,
) -> Chart:
    """Fold the run's state into the chart's series; ``started_at`` is time zero (default: the
    first thing recorded), ``ended_at`` the right edge (default: the last thing recorded)."""
    times = [p.at for p in state.metric_points] + [m.at for m in state.rollout_marks]
    if state.drift_at is not None:
        times.append(state.drift_at)
    zero = started_at or (min(times) if times else None)

    def seconds(at: datetime) -> float:
        return 0.0 if zero is None else (at - zero).total_seconds()

    name = metric or _pick_metric(state.metric_points)
    lines: dict[int, tuple[list[float], list[float]]] = {}
    for point in sorted(state.metric_points, key=lambda p: p.at):
        value = getattr(point, name, None)
        if not isinstance(value, int | float) or not math.isfinite(value) or point.count == 0:
            continue
        xs, ys = lines.setdefault(point.version, ([], []))
        xs.append(seconds(point.at))
        ys.append(float(value))

    end_at = max([*times, *([ended_at] if ended_at else [])], default=None)
    end = seconds(end_at) if end_at is not None else 0.0
    share_times, shares = traffic_shares(
        [(seconds(m.at), m) for m in sorted(state.rollout_marks, key=lambda m: m.at)], end
    )
    marks = {
        "drift": [seconds(state.drift_at)] if state.drift_at is not None else [],
        "promotion": [seconds(m.at) for m in state.promotions()],
        "rollback": [seconds(m.at) for m in state.rollbacks()],
    }
    start = min((seconds(t) for t in times), default=0.0)
    return Chart(
        model_name=state.model_name,
        metric=name,
        metric_label=metric_label(name),
        lines=lines,
        share_times=share_times,
        shares=shares,
        marks=marks,
        start=start,
        end=max(end, start),
    )


def _pick_metric(points: Sequence[MetricPoint]) -> str:
    candidates = [f.name for f in fields(MetricPoint) if f.name not in _NOT_METRICS]
    ordered = [n for n in _METRIC_PREFERENCE if n in candidates] + [
        n for n in candidates if n not in _METRIC_PREFERENCE
    ]
    for name in ordered:
        if any(getattr(p, name) is not None and p.count > 0 for p in points):
            return name
    return ordered[0]


def readable_metric(name: str) -> str:
    return _METRIC_NAMES.get(name, name.replace("_", " "))


def metric_label(name: str) -> str:
    """The axis label of a metric field: its readable name and which way is better."""
    readable = readable_metric(name)
    if name in _HIGHER_IS_BETTER:
        direction = "higher is better"
    elif name in _LOWER_IS_BETTER:
        direction = "lower is better"
    else:
        return f"live {readable}\n(joined feedback, sliding window)"
    return f"live {readable} ({direction})\n(joined feedback, sliding window)"


def route_shares(mark: RolloutMark) -> dict[int, float]:
    """The configured traffic share per version after one rollout change, as the gateway
    routes it: the canary gets its weight and the stable version the rest; a lone canary (no
    stable version) gets everything, whatever its weight."""
    stable, canary = mark.stable, mark.canary
    if canary is None or canary == stable:
        return {} if stable is None else {stable: 1.0}
    if stable is None:
        return {canary: 1.0}
    weight = min(max(mark.weight, 0.0), 1.0)
    return {stable: 1.0 - weight, canary: weight}


def traffic_shares(
    marks: Iterable[tuple[float, RolloutMark]], end: float
) -> tuple[list[float], dict[int, list[float]]]:
    """Step series of the configured shares: (times, share per version at each time). Each
    change holds until the next; the last one until ``end``."""
    steps = [(at, route_shares(mark)) for at, mark in marks]
    if not steps:
        return [], {}
    steps.append((max(end, steps[-1][0]), steps[-1][1]))
    versions = sorted({v for _, share in steps for v in share})
    times = [at for at, _ in steps]
    return times, {v: [share.get(v, 0.0) for _, share in steps] for v in versions}


_PALETTE = (
    # tab10, then ten colours picked greedily for the largest CIELAB distance to all before
    # them and to the marks' colours, among tab20b/c, Dark2, Set1/2 and Paired (L* < 78, so
    # a line still reads on white): no two closer than a delta E of 24 (tab20's pairs: 17).
    *("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"),
    *("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"),
    *("#a6761d", "#ff9896", "#cab2d6", "#e7298a", "#8ca252"),
    *("#393b79", "#e6ab02", "#fdae6b", "#66c2a5", "#7b4173"),
)


def version_colours(versions: Sequence[int]) -> dict[int, tuple[float, float, float, float]]:
    """A distinct colour per version, the same in every panel: a fixed palette of twenty,
    then (more versions) evenly spaced hues, still distinct but closer together."""
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    ordered = sorted(versions)
    if len(ordered) <= len(_PALETTE):
        return {v: to_rgba(_PALETTE[i]) for i, v in enumerate(ordered)}
    hsv = colormaps["hsv"]
    return {v: hsv(i / len(ordered)) for i, v in enumerate(ordered)}


def draw_chart(chart: Chart) -> Figure:
    """The two-panel figure of ``chart`` (not saved; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and in CI
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: nothing global to close, and a renderer for extents
    metric_ax, share_ax = fig.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    ).tolist()
    versions = chart.versions
    colours = version_colours(versions)

    for version, (xs, ys) in sorted(chart.lines.items()):
        metric_ax.plot(
            xs,
            ys,
            color=colours[version],
            linewidth=1.6,
            marker="o",
            markersize=2.5,
            label=f"v{version}",
            gid=f"version:{version}",
        )
    metric_ax.set_ylabel(chart.metric_label)
    metric_ax.grid(True, axis="y", alpha=0.3)
    if not chart.lines:  # a run stopped before any feedback was joined
        metric_ax.text(0.5, 0.5, "no live metrics yet", transform=metric_ax.transAxes, ha="center")

    if chart.shares:
        stacked = sorted(chart.shares)
        layers = share_ax.stackplot(
            chart.share_times,
            *[chart.shares[v] for v in stacked],
            colors=[colours[v] for v in stacked],
            labels=[f"v{v}" for v in stacked],
            step="post",
            linewidth=0.0,
        )
        for version, layer in zip(stacked, layers, strict=True):
            layer.set_gid(f"version:{version}")
    share_ax.set_ylim(0.0, 1.0)
    share_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    share_ax.set_ylabel("configured traffic share\n(from rollout changes)")
    share_ax.set_xlabel("seconds since the run started")
    share_ax.set_xlim(chart.start, chart.end if chart.end > chart.start else chart.start + 1.0)

    halo = [patheffects.withStroke(linewidth=3.5, foreground="white", alpha=0.8)]
    mark_handles = []
    for kind, style in MARK_STYLES.items():
        times = chart.marks.get(kind, [])
        if not times:
            continue
        for ax in (metric_ax, share_ax):
            for at in times:
                ax.axvline(
                    at,
                    color=style.colour,
                    linestyle=style.linestyle,
                    linewidth=style.linewidth,
                    zorder=5,
                    gid=f"mark:{kind}",
                    path_effects=halo,
                )
        mark_handles.append(
            Line2D(
                [],
                [],
                color=style.colour,
                linestyle=style.linestyle,
                linewidth=style.linewidth,
                label=style.label,
            )
        )

    shown = readable_metric(chart.metric)
    fig.suptitle(f"LoopMesh: {chart.model_name}, live {shown} and traffic per version")
    if versions:
        per_column = 25
        fig.legend(
            handles=[
                Line2D([], [], color=colours[v], linewidth=5, label=f"v{v}") for v in versions
            ],
            loc="outside right upper",
            title="version",
            fontsize=8,
            ncols=math.ceil(len(versions) / per_column),
        )
    if mark_handles:
        metric_ax.legend(
            handles=mark_handles,
            loc="lower left",
            bbox_to_anchor=(0.0, 1.0),
            ncols=len(mark_handles),
            fontsize=8,
            frameon=False,
            borderaxespad=0.2,
        )
    return fig


def write_plot(
    state: LoopState,
    path: Path,
    *,
    started_at: datetime | None = None,
    ended_at: datetime | None = None,
) -> Path:
    """Live metric and configured traffic share per version over time, rollout marks across."""
    fig = draw_chart(chart_data(state, started_at=started_at, ended_at=ended_at))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def write_summary(state: LoopState, path: Path, extra: dict[str, object] | None = None) -> Path:
    data = state.summary()
    if extra:
        data.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path
