"""`loopmesh run` headless: the whole loop on real Kafka, tritonserver and Feast.

The runner starts its own stack and every service as processes, seeds a model, drives the
simulator with a concept drift, and stops as soon as a full cycle after the drift and a
recovery have happened. The 8-minute cap only bounds a broken run: how many candidates the
trainer publishes before one beats stable varies from run to run, and each Triton reload of a
python-backend version takes 20-35 s on two busy cores, so a healthy run takes 4-5.5 minutes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from loopmesh.devstack.runner import RunOptions, run_loop
from loopmesh.devstack.state import LoopState

pytestmark = pytest.mark.e2e  # assembles the mesh: several services on real parts


def _done(state: LoopState) -> bool:
    promoted_after_drift = state.drift_at is not None and any(
        m.at > state.drift_at for m in state.promotions()
    )
    return promoted_after_drift and state.drift_recovery_seconds() is not None


async def test_loop_cycles_and_recovers_from_drift(tmp_path: Path) -> None:
    out = io.StringIO()
    options = RunOptions(
        duration_seconds=480,
        headless=True,
        out_dir=tmp_path,
        # Small thresholds so a cycle, the drift and a recovery fit in a few minutes.
        requests_per_second=60,
        retrain_every_examples=500,
        canary_weights=(0.25, 0.5),
        canary_min_samples=60,
        canary_step_seconds=5,
        metrics_window_seconds=40,
        drift_after_seconds=5,
        stop_when=_done,
    )
    summary = await run_loop(options, Console(file=out, width=160))
    log = out.getvalue()

    published = summary["versions_published"]
    assert isinstance(published, list) and published == sorted(published) and len(published) >= 2
    promotions = summary["promotions"]
    assert isinstance(promotions, list) and promotions, log
    assert set(promotions) <= set(published)
    # A full cycle: a version trained from live feedback served canary traffic, then won.
    freshness = summary["freshness_seconds"]
    assert isinstance(freshness, dict)
    promoted_fresh = [v for v in promotions if str(v) in freshness]
    assert promoted_fresh, (freshness, promotions)
    seconds = summary["seconds"]
    assert isinstance(seconds, float)
    assert all(0 < freshness[str(v)] < seconds for v in promoted_fresh)
    recovery = summary["drift_recovery_seconds"]
    assert isinstance(recovery, float) and 0 < recovery < seconds, log

    # The figures agree with each other: nothing joined that was not predicted and answered.
    simulator = summary["simulator"]
    assert isinstance(simulator, dict)
    # (Feedback calls cut short at shutdown may land without being counted as sent.)
    assert summary["labelled_examples"] <= summary["feedback"] <= summary["predictions"]
    assert summary["predictions"] <= simulator["predicted"]
    assert summary["labelled_examples"] > 0

    run_dirs = list(tmp_path.iterdir())
    assert len(run_dirs) == 1
    written = json.loads((run_dirs[0] / "summary.json").read_text())
    assert written["promotions"] == promotions
    assert (run_dirs[0] / "live_metrics.png").stat().st_size > 10_000
