"""The evaluation gate: a candidate is published only if it beats the reference on the holdout.

The reference is the stable version scored on the very same holdout rows, or, before any
version exists, a constant predictor (the training label rate, AUC 0.5; the training class
frequencies; the training target mean). A binary candidate must improve both log-loss and AUC
by the configured margins; a multiclass or regression one its task's loss (cross-entropy,
squared error) by ``min_loss_improvement``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from loopmesh.mesh.quality import LOSS, PRIMARY, Scores, TaskScores
from loopmesh.trainer.settings import GateSettings

ReferenceKind = Literal["stable", "baseline"]


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reason: str
    candidate: Scores | TaskScores
    reference: Scores | TaskScores
    reference_kind: ReferenceKind


def decide_task(
    candidate: TaskScores, reference: TaskScores, kind: ReferenceKind, settings: GateSettings
) -> GateDecision:
    """Accept when the task's loss beats the reference's by ``min_loss_improvement``."""
    name = LOSS[candidate.task]
    if candidate.loss is None:
        return GateDecision(False, "candidate figures are undefined", candidate, reference, kind)
    ref = reference.loss if reference.loss is not None else float("inf")
    needed = ref - settings.min_loss_improvement
    primary = PRIMARY[candidate.task][0]
    shown = f"{primary} {_fmt(candidate.primary)} vs {kind} {_fmt(reference.primary)}"
    if not candidate.loss < needed:
        reason = (
            f"{name} {candidate.loss:.4f} not below {kind} {ref:.4f} "
            f"- {settings.min_loss_improvement:g} ({shown})"
        )
        return GateDecision(False, reason, candidate, reference, kind)
    reason = f"beats {kind}: {name} {candidate.loss:.4f} < {ref:.4f} ({shown})"
    return GateDecision(True, reason, candidate, reference, kind)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


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
