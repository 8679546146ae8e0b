"""The example projects run end to end with `loopmesh run --project DIR`, headless.

``examples/friedman``: a regression model (a team-written module with a zone embedding, stream
features the project declares) on River's FriedmanDrift stream, bootstrapped through
``TrainerService.AddExamples``, retrained from joined feedback values, canaried and promoted;
after the stream's global abrupt drift it recovers. The run stops as soon as that has happened;
the cap only bounds a broken run.
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

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _recovered(state: LoopState) -> bool:
    promoted_after_drift = state.drift_at is not None and any(
        m.at > state.drift_at for m in state.promotions()
    )
    return promoted_after_drift and state.drift_recovery_seconds() is not None


async def test_the_friedman_example_learns_promotes_and_recovers_from_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOPMESH_PROJECT", str(EXAMPLES / "friedman"))
    out = io.StringIO()
    options = RunOptions(
        duration_seconds=600,
        headless=True,
        out_dir=tmp_path,
        requests_per_second=60,
        bootstrap_examples=1500,
        retrain_every_examples=500,
        canary_min_samples=60,
        canary_step_seconds=5,
        # The demo gate tolerates this much squared error (minutes²) while the bound narrows.
        canary_max_regression=2.0,
        metrics_window_seconds=40,
        drift_after_seconds=5,
        stop_when=_recovered,
    )
    summary = await run_loop(options, Console(file=out, width=160))
    log = out.getvalue()

    assert summary["model_name"] == "minutes"
    published = summary["versions_published"]
    promotions = summary["promotions"]
    assert isinstance(published, list) and len(published) >= 2, log
    assert isinstance(promotions, list) and len(promotions) >= 2, log
    recovery = summary["drift_recovery_seconds"]
    assert isinstance(recovery, float) and recovery > 0, log
    assert summary["labelled_examples"] > 0
    latest = summary["latest_metrics"]
    assert isinstance(latest, dict)
    # Live figures of a regression model: its loss (squared error) and MAE, no AUC.
    measured = [f for f in latest.values() if f["count"] > 0]
    assert measured, latest
    assert all(f["mae"] is not None and f["loss"] is not None for f in measured)
    assert all(f["auc"] is None and f["accuracy"] is None for f in measured)
    run_dir = next(tmp_path.iterdir())
    assert json.loads((run_dir / "summary.json").read_text())["promotions"] == promotions
