"""The run report's chart (`live_metrics.png`): readable with twenty versions.

The report data is built the way a run builds it: ``RolloutChanged`` and ``VersionMetrics``
events applied to a ``LoopState``, plus the simulator's drift time.
"""

from __future__ import annotations

import itertools
import math
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.transforms import BboxBase

from loopmesh.devstack.report import chart_data, draw_chart, traffic_shares, write_plot
from loopmesh.devstack.state import LoopState, RolloutMark
from loopmesh.mesh.events import RolloutChanged, RolloutState, VersionMetrics

pytestmark = pytest.mark.unit

MODEL = "ctr"
STARTED = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
FIRST = 40.0  # the stack's start-up: the first version is stable this long into the run
DRIFT = 315.0
END = 680.0


def at(seconds: float) -> datetime:
    return STARTED + timedelta(seconds=seconds)


def rolled_back(version: int) -> bool:
    return version % 3 == 0  # v3, v6, ..., v18: six rollbacks among 19 rollouts


def twenty_versions() -> tuple[LoopState, dict[str, list[float]]]:
    """v1 stable, then v2..v20 each a candidate, a canary at 25 % and 50 %, then promoted or
    rolled back; a drift in the middle. Returns the state and the expected marks (seconds)."""
    state = LoopState(model_name=MODEL)
    rng = np.random.default_rng(7)
    changes: list[tuple[float, RolloutChanged]] = []
    served: dict[int, list[tuple[float, float]]] = {}  # version: serving intervals

    def change(
        t: float, state_: RolloutState, stable: int | None, canary: int | None, w: float
    ) -> None:
        changes.append(
            (
                t,
                RolloutChanged(
                    model_name=MODEL,
                    event_time=at(t),
                    state=state_,
                    stable_version=stable,
                    canary_version=canary,
                    canary_weight=w,
                ),
            )
        )

    change(FIRST, "stable", 1, None, 0.0)
    stable, since = 1, FIRST
    promotions: list[float] = []
    rollbacks: list[float] = []
    t = FIRST + 10
    for version in range(2, 21):
        change(t, "candidate", stable, version, 0.0)
        change(t + 3, "canary", stable, version, 0.25)
        change(t + 13, "canary", stable, version, 0.5)
        if rolled_back(version):
            change(t + 21, "rolled_back", stable, version, 0.0)
            rollbacks.append(t + 21)
            served.setdefault(version, []).append((t + 3, t + 21))
        else:
            change(t + 25, "stable", version, None, 0.0)
            promotions.append(t + 25)
            served.setdefault(stable, []).append((since, t + 25))
            stable, since = version, t + 25
        t += 32
    served.setdefault(stable, []).append((since, END))
    for _, event in changes:
        state.apply(event, now=0.0)

    metrics: list[tuple[float, VersionMetrics]] = []
    for version, spans in served.items():
        quality = 0.70 + 0.01 * version
        for begin, finish in spans:
            for s in np.arange(begin + 2.0, finish, 4.0):
                drop = 0.2 if s >= DRIFT and version < 13 else 0.0
                value = float(np.clip(quality - drop + rng.normal(0, 0.01), 0, 1))
                metrics.append(
                    (
                        float(s),
                        VersionMetrics(
                            model_name=MODEL,
                            model_version=version,
                            event_time=at(float(s)),
                            window_seconds=30.0,
                            count=200,
                            accuracy=value,
                            log_loss=-math.log(value),
                        ),
                    )
                )
    for _, snapshot in sorted(metrics, key=lambda m: m[0]):
        state.apply(snapshot, now=0.0)
    state.drift_at = at(DRIFT)
    return state, {"drift": [DRIFT], "promotion": promotions, "rollback": rollbacks}


@pytest.fixture(scope="module")
def report() -> tuple[LoopState, dict[str, list[float]], Figure]:
    state, marks = twenty_versions()
    chart = chart_data(state, started_at=STARTED, ended_at=at(END))
    fig = draw_chart(chart)
    fig.canvas.draw()  # lay out once: the extents below are the saved ones
    return state, marks, fig


def panels(fig: Figure) -> tuple[Axes, Axes]:
    axes = fig.get_axes()
    assert len(axes) == 2
    return axes[0], axes[1]


def version_lines(ax: Axes) -> dict[int, Line2D]:
    out = {}
    for line in ax.get_lines():
        gid = line.get_gid() or ""
        if gid.startswith("version:"):
            out[int(gid.split(":")[1])] = line
    return out


def version_layers(ax: Axes) -> dict[int, PolyCollection]:
    out = {}
    for layer in ax.collections:
        gid = layer.get_gid() or ""
        if gid.startswith("version:") and isinstance(layer, PolyCollection):
            out[int(gid.split(":")[1])] = layer
    return out


def test_png_is_written_at_the_expected_size(tmp_path: Path) -> None:
    state, _ = twenty_versions()
    path = write_plot(state, tmp_path / "run" / "live_metrics.png", started_at=STARTED)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1560, 960)  # 13 x 8 in at 120 dpi, not cropped by the layout
    assert len(data) > 20_000


def test_two_panels_share_the_time_axis_in_seconds(report: tuple[object, object, Figure]) -> None:
    metric_ax, share_ax = panels(report[2])
    assert metric_ax.get_shared_x_axes().joined(metric_ax, share_ax)
    assert share_ax.get_xlabel() == "seconds since the run started"
    low, high = share_ax.get_xlim()
    assert low == pytest.approx(FIRST) and high == pytest.approx(END)
    assert "accuracy" in metric_ax.get_ylabel()
    assert "configured traffic share" in share_ax.get_ylabel()


def test_one_line_per_version_with_distinct_colours_and_the_same_colour_in_both_panels(
    report: tuple[object, object, Figure],
) -> None:
    metric_ax, share_ax = panels(report[2])
    lines = version_lines(metric_ax)
    assert sorted(lines) == list(range(1, 21))
    colours = {v: to_rgba(line.get_color()) for v, line in lines.items()}
    assert len(set(colours.values())) == 20
    for a, b in itertools.combinations(colours.values(), 2):  # distinct, not merely unequal
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) > 0.15
    layers = version_layers(share_ax)
    assert sorted(layers) == list(range(1, 21))
    for version, layer in layers.items():
        assert tuple(np.asarray(layer.get_facecolor())[0]) == pytest.approx(colours[version])


def test_the_metric_label_comes_from_the_data() -> None:
    state, _ = twenty_versions()
    for point in state.metric_points:
        point.accuracy = None  # only log loss left, as another task's data might have
    chart = chart_data(state, started_at=STARTED)
    assert chart.metric == "log_loss"
    assert chart.metric_label.startswith("live log loss (lower is better)")
    fig = draw_chart(chart)
    assert panels(fig)[0].get_ylabel() == chart.metric_label


def test_marks_are_drawn_at_their_times_in_both_panels(
    report: tuple[LoopState, dict[str, list[float]], Figure],
) -> None:
    _, expected, fig = report
    assert len(expected["rollback"]) == 6 and len(expected["promotion"]) == 13
    for ax in panels(fig):
        for kind, times in expected.items():
            drawn = sorted(
                float(np.asarray(line.get_xdata())[0])
                for line in ax.get_lines()
                if line.get_gid() == f"mark:{kind}"
            )
            assert drawn == pytest.approx(sorted(times)), kind
    # One small legend explains them; no rotated text per mark.
    legend = panels(fig)[0].get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == [
        "concept drift",
        "promotion (canary → stable)",
        "rollback / abort",
    ]
    ylabels = {ax.yaxis.label for ax in fig.get_axes()}
    texts = [t for t in fig.findobj(Text) if t.get_text() and t not in ylabels]
    assert all(t.get_rotation() == 0 for t in texts)


def test_stacked_shares_sum_to_one(report: tuple[object, object, Figure]) -> None:
    state, _, fig = report
    assert isinstance(state, LoopState)
    chart = chart_data(state, started_at=STARTED, ended_at=at(END))
    share_ax = panels(fig)[1]
    layers = version_layers(share_ax)
    ys = (np.arange(999) + 0.5) / 999  # heights in (0, 1), off the weights' round numbers
    for t in np.linspace(FIRST + 1, END - 1, 37):
        # The data: the share in force at t sums to 1.
        i = int(np.searchsorted(chart.share_times, t, side="right")) - 1
        assert sum(s[i] for s in chart.shares.values()) == pytest.approx(1.0)
        # The drawing: every height at t is covered by exactly one version's band.
        points = np.column_stack([np.full_like(ys, t), ys])
        covered = sum(
            layer.get_paths()[0].contains_points(points).astype(int) for layer in layers.values()
        )
        assert np.all(covered == 1), t


def test_shares_follow_the_route() -> None:
    def mark(state: str, stable: int | None, canary: int | None, weight: float) -> RolloutMark:
        return RolloutMark(STARTED, state, stable, canary, weight, 0, "")

    times, shares = traffic_shares(
        [
            (0.0, mark("stable", 1, None, 0.0)),
            (5.0, mark("canary", 1, 2, 0.25)),
            (9.0, mark("rolled_back", 1, 2, 0.0)),
            (12.0, mark("candidate", None, 3, 0.0)),  # a lone canary takes everything
        ],
        end=20.0,
    )
    assert times == [0.0, 5.0, 9.0, 12.0, 20.0]
    assert shares == {
        1: [1.0, 0.75, 1.0, 0.0, 0.0],
        2: [0.0, 0.25, 0.0, 0.0, 0.0],
        3: [0.0, 0.0, 0.0, 1.0, 1.0],
    }


def test_no_labels_overlap_and_legends_sit_outside_the_plots(
    report: tuple[object, object, Figure],
) -> None:
    fig = report[2]
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]  # an Agg canvas
    texts: list[Text] = []
    legends: list[Legend] = [*fig.legends]
    legends += [legend for ax in fig.get_axes() if (legend := ax.get_legend()) is not None]
    assert len(legends) == 2  # the versions' and the marks'

    for ax in fig.get_axes():
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        # The tick labels drawn: those of ticks inside the view (the locator returns more).
        area = ax.get_window_extent(renderer)
        texts += [
            label
            for label in ax.get_xticklabels()
            if area.x0 - 0.5 <= _centre(label.get_window_extent(renderer))[0] <= area.x1 + 0.5
        ]
        texts += [
            label
            for label in ax.get_yticklabels()
            if area.y0 - 0.5 <= _centre(label.get_window_extent(renderer))[1] <= area.y1 + 0.5
        ]
    for legend in legends:
        texts += [*legend.get_texts(), legend.get_title()]
    texts += [t for t in fig.texts if t.get_text() == fig.get_suptitle()]
    shown = [t for t in texts if t.get_visible() and t.get_text().strip()]
    assert len(shown) > 40  # 20 version names, 3 marks, ticks, titles
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in shown]
    figure_box = fig.bbox
    for text, box in boxes:
        assert _inside(box, figure_box), f"{text!r} is cut off"
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert _overlap(box_a, box_b) < 1.0, f"{a!r} overlaps {b!r}"
    legend_boxes = [legend.get_window_extent(renderer) for legend in legends]
    plot_areas = [ax.get_window_extent(renderer) for ax in fig.get_axes()]
    for box in legend_boxes:
        assert _inside(box, figure_box)
        for area in plot_areas:
            assert _overlap(box, area) < 1.0, "a legend covers a plot"
    for box_a, box_b in itertools.combinations(legend_boxes, 2):
        assert _overlap(box_a, box_b) < 1.0


def test_an_empty_run_still_draws(tmp_path: Path) -> None:
    path = write_plot(LoopState(model_name=MODEL), tmp_path / "live_metrics.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _overlap(a: BboxBase, b: BboxBase) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return float(max(width, 0.0) * max(height, 0.0))


def _centre(box: BboxBase) -> tuple[float, float]:
    return (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2


def _inside(box: BboxBase, outer: BboxBase) -> bool:
    return bool(
        box.x0 >= outer.x0 - 0.5
        and box.y0 >= outer.y0 - 0.5
        and box.x1 <= outer.x1 + 0.5
        and box.y1 <= outer.y1 + 0.5
    )
