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

from loopmesh.mesh import model_repo, quality
from loopmesh.trainer.dataset import Dataset
from loopmesh.trainer.export import OPSET, ExportedModel, export_module
from loopmesh.trainer.gate import GateDecision, ReferenceKind, decide
from loopmesh.trainer.prepare import Standardisation, choose_features, split_by_time
from loopmesh.trainer.settings import TrainerScope
from loopmesh.trainer.train import FitFn, WarmStart, load_scoring, predict
from loopmesh.trainer.train import warm_start_from as _warm_start_from

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
    )


def run_pipeline(
    scope: TrainerScope,
    dataset: Dataset,
    stable: StableModel | None,
    fit: FitFn,
    *,
    run_id: str,
) -> RunOutcome:
    ds = scope.dataset
    frame = dataset.load(
        scope.model_name, window_rows=ds.window_rows, window_seconds=ds.window_seconds
    )
    if len(frame) < ds.min_rows:
        raise NotEnoughData(f"{len(frame)} clean examples, need at least {ds.min_rows}")
    configured = ds.features or (list(stable.standardisation.feature_names) if stable else None)
    feature_names = choose_features(frame, configured)
    if not feature_names:
        raise NotEnoughData("the examples carry no features")
    x = frame.matrix(feature_names)
    y = frame.labels
    train_idx, holdout_idx = split_by_time(len(frame), ds.holdout_fraction)
    fit_idx, val_idx = split_by_time(len(train_idx), scope.training.validation_fraction)
    fit_idx, val_idx = train_idx[fit_idx], train_idx[val_idx]
    standardisation = Standardisation.fit(x[fit_idx], feature_names, clip_quantile=ds.clip_quantile)
    warm: WarmStart | None = None
    if stable is not None and scope.training.warm_start:
        warm = _warm_start_from(stable.path, stable.standardisation)
    result = fit(
        x[fit_idx], y[fit_idx], x[val_idx], y[val_idx], standardisation, scope.training, warm=warm
    )
    y_holdout = y[holdout_idx]
    candidate = quality.score(y_holdout, predict(result.module, x[holdout_idx]))
    kind: ReferenceKind
    if stable is not None:
        stable_x = frame.matrix(stable.standardisation.feature_names)[holdout_idx]
        reference = quality.score(y_holdout, predict(load_scoring(stable.path), stable_x))
        kind = "stable"
    else:
        constant = np.full(y_holdout.shape, float(np.clip(y[train_idx].mean(), 1e-3, 1 - 1e-3)))
        reference = quality.score(y_holdout, constant)
        kind = "baseline"
    decision = decide(candidate, reference, kind, scope.gate)
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
            "feature_names": feature_names,
            # What the module imputes for a missing input; inference uses it as the default.
            "feature_defaults": dict(
                zip(feature_names, standardisation.mean.tolist(), strict=True)
            ),
            "standardisation": standardisation.to_metadata(),
            "metrics": {
                **{f"holdout_{k}": v for k, v in candidate.as_dict().items()},
                **{f"reference_{k}": v for k, v in reference.as_dict().items()},
                "validation_log_loss": result.validation_log_loss,
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
                "train_rows": outcome.train_rows,
                "validation_rows": outcome.validation_rows,
                "holdout_rows": outcome.holdout_rows,
            },
        }
    return outcome


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
                n_features=len(metadata["feature_names"]),
                n_outputs=payload.n_outputs,
                weights=payload.weights,
                backend=backend,
            )
        except FileExistsError:
            continue  # someone published that number meanwhile: take the next one
        return version, model_repo.read_metadata(repository, model_name, version)
    raise FileExistsError(f"could not find a free version number for {model_name}")
