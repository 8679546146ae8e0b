"""Settings of the trainer: ``LOOPMESH_TRAINER__*`` on top of the mesh settings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from loopmesh.mesh import model_repo
from loopmesh.mesh.settings import GrpcServerSettings, MeshSettings
from loopmesh.mesh.topics import (
    ENTITIES_ERASED,
    MODELS_PUBLISHED,
    ROLLOUTS,
    TRAINING_EXAMPLES,
    Topic,
    TopicSet,
)

log = logging.getLogger(__name__)


class TopicNames(TopicSet):
    """Names of the topics the trainer reads and writes (tests and tenants use others)."""

    examples: str = TRAINING_EXAMPLES.name
    """LabelledExample events the joiner writes and the dataset reads."""
    published: str = MODELS_PUBLISHED.name
    """ModelPublished events announcing versions that passed the gate."""
    erased: str = ENTITIES_ERASED.name
    """EntityErased events: those entities leave the training set."""
    rollouts: str = ROLLOUTS.name
    """RolloutChanged events: which version is stable (warm start and gate reference)."""

    BASES: ClassVar[dict[str, Topic]] = {
        "examples": TRAINING_EXAMPLES,
        "published": MODELS_PUBLISHED,
        "erased": ENTITIES_ERASED,
        "rollouts": ROLLOUTS,
    }


class DatasetSettings(BaseModel):
    """The training set on disk and how a run reads it."""

    flush_rows: int = Field(default=1000, ge=1)
    """Examples buffered before a parquet file is written (offsets commit after the write)."""
    flush_seconds: float = Field(default=5.0, gt=0)
    """Longest an example waits in the buffer before a (smaller) file is written."""
    window_rows: int | None = Field(default=20_000, ge=10)
    """A run uses at most the newest this many examples (None: all); keeps drift short."""
    window_seconds: float | None = Field(default=None, gt=0)
    """A run uses only examples predicted within this long before the newest (None: all)."""
    holdout_fraction: float = Field(default=0.2, gt=0, lt=0.9)
    """Newest share of the window (by prediction time) held out for the gate."""
    min_rows: int = Field(default=200, ge=10)
    """Fewer clean rows than this and a run fails fast instead of training on noise."""
    clip_quantile: float = Field(default=0.005, ge=0, lt=0.5)
    """Features are clipped to [q, 1-q] quantiles of the training rows (outliers)."""
    features: list[str] | None = None
    """Model inputs in order; None: the stable version's, else every feature seen, sorted."""


class TrainingSettings(BaseModel):
    """The PyTorch MLP and its optimisation."""

    hidden: list[int] = Field(default_factory=lambda: [32, 16])
    """Hidden layer widths of the MLP."""
    learning_rate: float = Field(default=3e-3, gt=0)
    """Adam learning rate."""
    weight_decay: float = Field(default=1e-4, ge=0)
    """Adam (L2) weight decay."""
    batch_size: int = Field(default=128, ge=1)
    """Mini-batch size (per process under DDP)."""
    max_epochs: int = Field(default=80, ge=1)
    """Upper bound on passes over the training rows."""
    patience: int = Field(default=8, ge=1)
    """Epochs without a better validation log-loss before stopping (best weights kept)."""
    validation_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    """Newest share of the training rows used for early stopping (never the gate holdout)."""
    seed: int = 0
    """Seed of initialisation and shuffling: same data and seed, same weights."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where training runs; auto picks CUDA when available."""
    processes: int = Field(default=1, ge=1, le=64)
    """More than 1: DDP under torchrun with this many processes (one per GPU)."""
    warm_start: bool = True
    """Start from the stable version's weights when the shapes match."""
    threads: int = Field(default=1, ge=0)
    """torch intra-op threads of this process (0: torch's default); a small MLP trains
    fastest on one thread and leaves the other cores to the joiner and consumers."""

    @field_validator("hidden")
    @classmethod
    def _hidden_ok(cls, value: list[int]) -> list[int]:
        if not value or any(w < 1 or w > 4096 for w in value):
            raise ValueError("hidden needs 1+ layer widths between 1 and 4096")
        return value


class GateSettings(BaseModel):
    """What a candidate must beat to be published."""

    min_log_loss_improvement: float = Field(default=0.001, ge=0)
    """Candidate holdout log-loss must be lower than the reference's by at least this."""
    min_auc_improvement: float = Field(default=0.0, ge=0)
    """Candidate holdout AUC must exceed the reference's by more than this."""
    min_loss_improvement: float = Field(default=0.001, ge=0)
    """multiclass and regression: the candidate's holdout loss (cross-entropy, squared error
    in the target's units) must be lower than the reference's by at least this."""


OLD_DRIFT_SETTINGS = frozenset({"drift_metric", "drift_threshold", "drift_min_count"})
"""Settings of the windowed live-metric drift trigger (replaced by ``drift_detector``)."""


class TriggerSettings(BaseModel):
    """When a run starts by itself (TriggerTraining starts one any time)."""

    mode: Literal["any", "all"] = "any"
    """Fire when any enabled trigger is due, or only when all of them are."""
    min_new_examples: int | None = Field(default=1000, ge=1)
    """Examples stored since the last run started (None disables)."""
    drift_detector: Literal["adwin", "page_hinkley"] | None = "adwin"
    """Drift trigger over the stable version's per-example loss (the joiner's: log loss,
    cross-entropy, squared error), fed with every labelled example that version served, in
    prediction order: ``adwin`` (River's ADWIN, a change of the mean in either direction; only
    a worsening fires), ``page_hinkley`` (an increase of the mean), None disables. A
    detection starts one run on the examples after the estimated change point."""
    drift_delta: float = Field(default=0.002, gt=0, lt=1)
    """ADWIN's confidence: a smaller delta needs stronger evidence (fewer false alarms, a
    longer delay)."""
    drift_clock: int = Field(default=32, ge=1)
    """ADWIN tests for a change every this many examples (1: every example; the delay is
    rounded up to it)."""
    drift_ph_threshold: float = Field(default=50.0, gt=0)
    """Page-Hinkley: the cumulative excess loss (in the loss's units) that counts as drift."""
    drift_ph_delta: float = Field(default=0.005, ge=0)
    """Page-Hinkley: the loss increase per example tolerated as noise."""
    drift_ph_alpha: float = Field(default=1 - 1e-4, gt=0, le=1)
    """Page-Hinkley: the forgetting factor of the cumulative sum."""
    drift_min_examples: int = Field(default=100, ge=1)
    """No detection before the detector has seen this many examples of the stable version
    (since it became stable, or since the last detection)."""
    drift_floor_seconds: float | None = Field(default=86400.0, gt=0)
    """After a drift, every run (the one it starts and the later ones) trains only on
    examples predicted at or after the estimated change point (at least the newest
    ``dataset.min_rows``, the gate's holdout still the newest share of that), until a newer
    drift moves the floor or this long has passed since the detection (None: until a newer
    drift). Promoting a retrained version does not lift it: the examples before the change
    follow the old concept whichever version serves them. Once ``dataset.window_rows`` or
    ``window_seconds`` no longer reach back to the change point the floor changes nothing."""
    max_age_seconds: float | None = Field(default=None, gt=0)
    """Retrain when the newest version is older than this (None disables)."""
    cooldown_seconds: float = Field(default=30.0, ge=0)
    """Least time between the end of a run and the next automatic start."""
    check_interval_seconds: float = Field(default=5.0, gt=0)
    """How often the time-based trigger is evaluated."""

    @model_validator(mode="before")
    @classmethod
    def _old_drift_settings(cls, data: Any) -> Any:
        """The settings of the windowed-metric drift trigger it replaced are ignored, loudly."""
        if isinstance(data, dict):
            old = sorted(OLD_DRIFT_SETTINGS & set(data))
            if old:
                log.warning(
                    "trigger settings %s are no longer used (ignored): the drift trigger is "
                    "drift_detector (ADWIN or Page-Hinkley over the per-example loss), "
                    "drift_delta, drift_min_examples",
                    ", ".join(old),
                )
                data = {k: v for k, v in data.items() if k not in OLD_DRIFT_SETTINGS}
        return data


class TrainerScope(BaseModel):
    """What the trainer alone reads."""

    server: GrpcServerSettings = GrpcServerSettings(port=50055)
    """Where TrainerService listens."""
    model_name: str = "ctr"
    """The model this trainer trains and publishes (one trainer per model)."""
    data_dir: Path = Path(".loopmesh/trainer")
    """Dataset, run history and state of this trainer."""
    topics: TopicNames = TopicNames()
    """Topic names."""
    dataset: DatasetSettings = DatasetSettings()
    """The training set."""
    training: TrainingSettings = TrainingSettings()
    """The model and its optimisation."""
    gate: GateSettings = GateSettings()
    """The evaluation gate."""
    triggers: TriggerSettings = TriggerSettings()
    """Automatic retraining."""
    triton_backend: Literal["python", "onnxruntime"] = "python"
    """The backend the published config.pbtxt names (``LOOPMESH_TRAINER__TRITON_BACKEND``):
    ``python`` for the nvidia-pytriton wheel's tritonserver (``model.py`` runs model.onnx
    with onnxruntime), ``onnxruntime`` for Triton's own backend in the NVIDIA container.
    Either serves the same version directories."""

    @field_validator("model_name")
    @classmethod
    def _model_name_ok(cls, value: str) -> str:
        return model_repo.validate_model_name(value)


class TrainerSettings(MeshSettings):
    """Settings of ``python -m loopmesh.trainer``."""

    trainer: TrainerScope = TrainerScope()
    """The trainer's own scope."""
