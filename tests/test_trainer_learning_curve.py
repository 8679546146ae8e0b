"""Concept drift on the real broker: the loop's newest version relearns the new rule.

A shortened run of ``bench/learning_curve.py`` (the bench prints the full table): after the
labelling rule flips, the live AUC of the newest version falls, then recovers to within the
stated margin of a model trained offline on the new rule alone.
"""

from __future__ import annotations

from pathlib import Path

from bench.learning_curve import CurveConfig, report, run_curve
from loopmesh.mesh.settings import KafkaSettings

MARGIN = 0.05


async def test_live_auc_recovers_after_concept_drift(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    config = CurveConfig(
        per_round=300, rounds_before=2, rounds_after=4, window_rows=600, margin=MARGIN
    )
    result = await run_curve(kafka_settings, tmp_path, config)
    report(result)
    before, after = result.rounds[: config.rounds_before], result.rounds[config.rounds_before :]
    assert all(r.rule == 0 for r in before) and all(r.rule == 1 for r in after)
    assert all(r.live.count == config.per_round for r in result.rounds)
    # The drift hurts the version that was serving when it happened...
    assert result.drop > 0.3
    # ...the loop publishes new versions in response...
    assert result.final.serving_version > after[0].serving_version
    # ...and the newest one's live AUC comes back to the offline model's, within the margin.
    assert result.offline_auc > 0.8
    assert result.gap <= MARGIN, (
        f"live {result.final.live.auc:.3f} vs offline {result.offline_auc:.3f}"
    )
