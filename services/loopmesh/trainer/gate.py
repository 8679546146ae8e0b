"""The evaluation gate: a candidate is published only if it beats the reference on the holdout.

The reference is the stable version scored on the very same holdout rows, or, before any
version exists, a constant predictor at the training label rate (AUC 0.5). Both log-loss and
AUC must improve by the configured margins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from loopmesh.mesh.quality import Scores
from loopmesh.trainer.settings import GateSettings

ReferenceKind = Literal["stable", "baseline"]


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reason: str
    candidate: Scores
    reference: Scores
    reference_kind: ReferenceKind


def decide(
    candidate: Scores, reference: Scores, kind: ReferenceKind, settings: GateSettings
) -> GateDecision:
    """Accept when log-loss and AUC both beat the reference by their margins."""
    problems = []
    if candidate.log_loss is None or candidate.auc is None:
        problems.append("candidate figures are undefined (holdout has one class only)")
    else:
        ref_ll = reference.log_loss if reference.log_loss is not None else float("inf")
        ref_auc = reference.auc if reference.auc is not None else 0.5
        needed_ll = ref_ll - settings.min_log_loss_improvement
        if not candidate.log_loss < needed_ll:
            problems.append(
                f"log_loss {candidate.log_loss:.4f} not below {kind} {ref_ll:.4f} "
                f"- {settings.min_log_loss_improvement:g}"
            )
        if not candidate.auc > ref_auc + settings.min_auc_improvement:
            problems.append(
                f"auc {candidate.auc:.4f} not above {kind} {ref_auc:.4f} "
                f"+ {settings.min_auc_improvement:g}"
            )
    if problems:
        return GateDecision(False, "; ".join(problems), candidate, reference, kind)
    reason = (
        f"beats {kind}: log_loss {candidate.log_loss:.4f} < {reference.log_loss or 0:.4f}, "
        f"auc {candidate.auc:.4f} > {reference.auc if reference.auc is not None else 0.5:.4f}"
    )
    return GateDecision(True, reason, candidate, reference, kind)
