"""The live terminal view of the loop (rich)."""

from __future__ import annotations

import time

from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from loopmesh.devstack.state import LoopState


def render(state: LoopState, *, started: float, notes: list[str]) -> Group:
    now = time.monotonic()
    traffic = Table(title="traffic", expand=True)
    for column in (
        "events/s",
        "predictions/s",
        "feedback/s",
        "events",
        "predictions",
        "feedback",
        "joined examples",
    ):
        traffic.add_column(column, justify="right")
    traffic.add_row(
        f"{state.rate('events', now):.1f}",
        f"{state.rate('predictions', now):.1f}",
        f"{state.rate('feedback', now):.1f}",
        str(state.events),
        str(state.predictions),
        str(state.feedback),
        str(state.examples),
    )

    versions = Table(title="live metrics per version (sliding window)", expand=True)
    for column in ("version", "role", "weight", "samples", "accuracy", "loss", "AUC", "MAE"):
        versions.add_column(column, justify="right")
    route = state.current_route()
    for version, point in sorted(state.latest_metrics().items()):
        role, weight = "retired", "0%"
        if route is not None and version == route.stable:
            role, weight = "stable", f"{1 - route.weight:.0%}"
        if route is not None and version == route.canary and route.state == "canary":
            role, weight = f"canary step {route.step}", f"{route.weight:.0%}"
        if route is not None and version in route.shadows:
            role, weight = "shadow", "0%"
        versions.add_row(
            f"v{version}",
            role,
            weight,
            str(point.count),
            _fmt(point.accuracy),
            _fmt(point.loss if point.loss is not None else point.log_loss),
            _fmt(point.auc),
            _fmt(point.mae),
        )

    history = Table(title="training and rollouts", expand=True)
    history.add_column("when")
    history.add_column("what")
    items: list[tuple[float, str]] = []
    for pub in state.publications[-6:]:
        figures = ", ".join(f"{k}={v:.3f}" for k, v in sorted(pub.metrics.items())[:4])
        items.append((pub.at.timestamp(), f"published v{pub.version} ({figures})"))
    for mark in state.rollout_marks[-8:]:
        shadows = f" shadow v{', v'.join(map(str, mark.shadows))}" if mark.shadows else ""
        what = (
            f"{mark.state}: stable v{mark.stable} canary v{mark.canary}{shadows} "
            f"weight {mark.weight:.0%} {mark.reason}"
        )
        items.append((mark.at.timestamp(), what))
    for at, what in sorted(items)[-10:]:
        history.add_row(time.strftime("%H:%M:%S", time.localtime(at)), what)

    fresh = state.freshness_seconds()
    recovery = state.drift_recovery_seconds()
    footer = [f"running {now - started:,.0f}s"]
    if fresh:
        version = max(fresh)
        footer.append(f"freshness v{version}: {fresh[version]:.1f}s feedback→canary")
    if state.drift_at is not None:
        footer.append(
            "drift injected; "
            + (f"recovered in {recovery:.0f}s" if recovery is not None else "recovering…")
        )
    footer.extend(notes[-3:])
    return Group(traffic, versions, history, Panel(" · ".join(footer), title="LoopMesh"))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
