"""One training run, start to verdict, as blocking code (``core`` runs it in a worker thread).

load -> features -> time split -> standardise -> warm start -> fit -> score candidate and
reference on the same holdout -> gate -> when accepted, the ONNX export verified on the holdout
rows (``export.ExportError`` fails the run) and the metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from loopmesh.mesh import model_repo, quality
from loopmesh.mesh.model_spec import ContextField
from loopmesh.trainer.dataset import Dataset, Frame
from loopmesh.trainer.export import OPSET, ExportedModel, export_module
from loopmesh.trainer.gate import GateDecision, ReferenceKind, decide, decide_task
from loopmesh.trainer.plan import ModelPlan
from loopmesh.trainer.prepare import Standardisation, choose_features, split_by_time
from loopmesh.trainer.settings import TrainerScope
from loopmesh.trainer.train import FitFn, WarmStart, load_scoring, predict
from loopmesh.trainer.train import warm_start_from as _warm_start_from

FloatArray = npt.NDArray[np.float64]
EXPORT_CHECK_ROWS = 4096
"""Holdout rows the ONNX graph must reproduce the trained module on."""


class NotEnoughData(ValueError):
    """Fewer clean rows than ``dataset.min_rows``."""


@dataclass
class StableModel:
    """The version the candidate must beat and may start from."""

    version: int
    path: Path
    standardisation: Standardisation
    categorical: tuple[ContextField, ...] = ()
    """Its categorical inputs (the tail of its input row)."""


@dataclass
class RunOutcome:
    decision: GateDecision
    feature_names: list[str]
    train_rows: int
    validation_rows: int
    holdout_rows: int
    epochs: int
    warm_started: bool
    device: str
    train_seconds: float
    data_from: datetime | None
    data_to: datetime | None
    payload: ExportedModel | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def load_stable(repository: Path, model_name: str, version: int | None) -> StableModel | None:
    """The stable version if it exists, is intact (sha256) and carries its standardisation."""
    if version is None or version not in model_repo.list_versions(repository, model_name):
        return None
    if not model_repo.verify_sha256(repository, model_name, version):
        return None
    meta = model_repo.read_metadata(repository, model_name, version)
    if "standardisation" not in meta:
        return None
    vdir = model_repo.version_dir(repository, model_name, version)
    return StableModel(
        version=version,
        path=vdir / model_repo.MODEL_FILE,
        standardisation=Standardisation.from_metadata(meta["standardisation"]),
        categorical=tuple(ContextField.model_validate(f) for f in meta.get("categorical") or ()),
    )


def run_pipeline(
    scope: TrainerScope,
    dataset: Dataset,
    stable: StableModel | None,
    fit: FitFn,
    *,
    run_id: str,
    plan: ModelPlan | None = None,
    challenged: StableModel | None = None,
    since: datetime | None = None,
) -> RunOutcome:
    """One run; ``challenged``: the version in canary, which an accepted candidate preempts
    when it beats it on the same holdout rows (``metadata["preempts"]``); ``since``: the
    floor of the window (a drift's change point), at least ``dataset.min_rows`` kept."""
    ds = scope.dataset
    plan = plan or ModelPlan()
    frame = dataset.load(
        scope.model_name,
        window_rows=ds.window_rows,
        window_seconds=ds.window_seconds,
        since=None if since is None else since.timestamp(),
        since_min_rows=ds.min_rows,
    )
    frame = frame.take(np.flatnonzero(_valid_targets(plan, frame.labels)))
    if len(frame) < ds.min_rows:
        raise NotEnoughData(f"{len(frame)} clean examples, need at least {ds.min_rows}")
    configured = (
        ds.features
        or plan.inputs_from(list(frame.features))
        or (list(stable.standardisation.feature_names) if stable else None)
    )
    feature_names = choose_features(frame, configured)
    if not feature_names and not plan.categorical:
        raise NotEnoughData("the examples carry no features")
    # The input row Triton gets: the numeric inputs, then the categorical embedding rows.
    x = np.hstack([frame.matrix(feature_names), plan.encode(frame.categorical, len(frame))])
    y = frame.labels
    train_idx, holdout_idx = split_by_time(len(frame), ds.holdout_fraction)
    fit_idx, val_idx = split_by_time(len(train_idx), scope.training.validation_fraction)
    fit_idx, val_idx = train_idx[fit_idx], train_idx[val_idx]
    n = len(feature_names)
    standardisation = Standardisation.fit(
        x[fit_idx][:, :n], feature_names, clip_quantile=ds.clip_quantile
    )
    warm: WarmStart | None = None
    if stable is not None and scope.training.warm_start:
        warm = _warm_start_from(stable.path, stable.standardisation)
    result = fit(
        x[fit_idx],
        y[fit_idx],
        x[val_idx],
        y[val_idx],
        standardisation,
        scope.training,
        warm=warm,
        plan=plan,
    )
    y_holdout = y[holdout_idx]
    candidate_out = predict(result.module, x[holdout_idx])
    kind: ReferenceKind
    if stable is not None:
        reference_out = _answers(stable, frame, holdout_idx)
        kind = "stable"
    else:
        reference_out = _baseline(plan, y[train_idx], len(holdout_idx))
        kind = "baseline"
    candidate = _scores(plan, y_holdout, candidate_out)
    reference = _scores(plan, y_holdout, reference_out)
    if isinstance(candidate, quality.Scores) and isinstance(reference, quality.Scores):
        decision = decide(candidate, reference, kind, scope.gate)
    else:
        assert isinstance(candidate, quality.TaskScores)
        assert isinstance(reference, quality.TaskScores)
        decision = decide_task(candidate, reference, kind, scope.gate)
    candidate_loss = _loss_of(candidate)
    preempted_loss: float | None = None
    if decision.accepted and challenged is not None:
        rival = _scores(plan, y_holdout, _answers(challenged, frame, holdout_idx))
        margin = (
            scope.gate.min_log_loss_improvement
            if plan.task == "binary"
            else scope.gate.min_loss_improvement
        )
        theirs = _loss_of(rival)
        if candidate_loss is not None and theirs is not None and candidate_loss < theirs - margin:
            preempted_loss = theirs
    stamps = frame.predicted_at
    outcome = RunOutcome(
        decision=decision,
        feature_names=feature_names,
        train_rows=int(fit_idx.size),
        validation_rows=int(val_idx.size),
        holdout_rows=int(holdout_idx.size),
        epochs=result.epochs,
        warm_started=result.warm_started,
        device=result.device,
        train_seconds=result.seconds,
        data_from=datetime.fromtimestamp(float(stamps[0]), UTC),
        data_to=datetime.fromtimestamp(float(stamps[-1]), UTC),
    )
    if decision.accepted:
        # Never published unless exported and reproduced on the holdout rows (NaNs included).
        outcome.payload = export_module(result.module, x[holdout_idx][:EXPORT_CHECK_ROWS])
        outcome.metadata = {
            "task": plan.task,
            **({"classes": plan.classes} if plan.task == "multiclass" else {}),
            "feature_names": feature_names,
            "categorical": [f.model_dump(exclude_none=True) for f in plan.categorical],
            **(
                {
                    "target": {
                        "mean": result.module.target_mean.item(),
                        "std": result.module.target_std.item(),
                    }
                }
                if plan.task == "regression"
                else {}
            ),
            # What the module imputes for a missing input; inference uses it as the default.
            "feature_defaults": dict(
                zip(feature_names, standardisation.mean.tolist(), strict=True)
            ),
            "standardisation": standardisation.to_metadata(),
            **(
                {"preempts": challenged.version}
                if preempted_loss is not None and challenged is not None
                else {}
            ),
            "metrics": {
                **{f"holdout_{k}": v for k, v in candidate.as_dict().items()},
                **{f"reference_{k}": v for k, v in reference.as_dict().items()},
                **(
                    {"holdout_loss": _loss_of(candidate)} if _loss_of(candidate) is not None else {}
                ),
                **({"preempted_loss": preempted_loss} if preempted_loss is not None else {}),
                # The task's loss: log loss, cross-entropy, squared error (standardised target).
                "validation_loss": result.validation_log_loss,
            },
            "reference_kind": kind,
            "export": {
                "opset": OPSET,
                "check_rows": int(min(holdout_idx.size, EXPORT_CHECK_ROWS)),
                "max_abs_diff": outcome.payload.max_abs_diff,
            },
            "parent_version": stable.version if stable else None,
            "run_id": run_id,
            "training": {
                "hidden": list(scope.training.hidden),
                "seed": scope.training.seed,
                "epochs": result.epochs,
                "best_epoch": result.best_epoch,
                "warm_started": result.warm_started,
                "device": result.device,
            },
            "data_window": {
                "from": outcome.data_from.isoformat() if outcome.data_from else None,
                "to": outcome.data_to.isoformat() if outcome.data_to else None,
                "since": since.isoformat() if since else None,
                "train_rows": outcome.train_rows,
                "validation_rows": outcome.validation_rows,
                "holdout_rows": outcome.holdout_rows,
            },
        }
    return outcome


def _answers(model: StableModel, frame: Frame, rows: npt.NDArray[np.int64]) -> FloatArray:
    """A published version's answers for ``rows`` of ``frame``, from its own inputs."""
    x = np.hstack(
        [
            frame.matrix(model.standardisation.feature_names),
            ModelPlan(categorical=model.categorical).encode(frame.categorical, len(frame)),
        ]
    )[rows]
    return predict(load_scoring(model.path), x)


def _scores(
    plan: ModelPlan, y: FloatArray, answers: FloatArray
) -> quality.Scores | quality.TaskScores:
    if plan.task == "binary":
        return quality.score(y, answers)
    return quality.task_scores(plan.task, y, answers)


def _loss_of(scores: quality.Scores | quality.TaskScores) -> float | None:
    """The task's loss (log loss for a binary model)."""
    return scores.log_loss if isinstance(scores, quality.Scores) else scores.loss


def _valid_targets(plan: ModelPlan, y: FloatArray) -> npt.NDArray[np.bool_]:
    """Rows whose target the task can learn (examples of another rule or schema are not)."""
    valid: npt.NDArray[np.bool_] = np.isfinite(y)
    if plan.task == "binary":
        valid &= (y == 0.0) | (y == 1.0)
    elif plan.task == "multiclass":
        valid &= (y >= 0) & (y < (plan.classes or 0)) & (np.floor(y) == y)
    return valid


def _baseline(plan: ModelPlan, y_train: FloatArray, rows: int) -> FloatArray:
    """The constant predictor a first version must beat: the training label rate, class
    frequencies or target mean."""
    if plan.task == "multiclass":
        k = plan.classes or 1
        counts = np.bincount(y_train.astype(np.int64), minlength=k)[:k] + 1.0
        return np.tile(counts / counts.sum(), (rows, 1))
    if plan.task == "regression":
        return np.full(rows, float(y_train.mean()))
    return np.full(rows, float(np.clip(y_train.mean(), 1e-3, 1 - 1e-3)))


def publish_files(
    repository: Path,
    model_name: str,
    payload: ExportedModel,
    metadata: dict[str, Any],
    *,
    backend: str = "python",
) -> tuple[int, dict[str, Any]]:
    """Write the next version; returns it with its stored metadata (sha256 included)."""
    for _ in range(3):
        versions = model_repo.list_versions(repository, model_name)
        version = (versions[-1] + 1) if versions else 1
        try:
            model_repo.write_version(
                repository,
                model_name,
                version,
                payload.onnx,
                metadata,
                n_features=payload.n_features,
                n_outputs=payload.n_outputs,
                weights=payload.weights,
                backend=backend,
            )
        except FileExistsError:
            continue  # someone published that number meanwhile: take the next one
        return version, model_repo.read_metadata(repository, model_name, version)
    raise FileExistsError(f"could not find a free version number for {model_name}")
