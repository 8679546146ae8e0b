"""The dataset on disk and PyTorch training: real parquet files, real torch, no broker."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from loopmesh.devstack.synthetic import FEATURE_NAMES, SyntheticConfig, SyntheticWorld, examples
from loopmesh.mesh import model_repo, quality
from loopmesh.mesh.events import LabelledExample
from loopmesh.trainer import dataset as dataset_module
from loopmesh.trainer.dataset import Dataset
from loopmesh.trainer.export import OnnxScoring, export_module
from loopmesh.trainer.pipeline import load_stable, publish_files, run_pipeline
from loopmesh.trainer.prepare import Standardisation
from loopmesh.trainer.scoring import MLP, ScoringModule
from loopmesh.trainer.settings import TrainerScope, TrainingSettings
from loopmesh.trainer.train import (
    WarmStart,
    adapt_warm_state,
    fit,
    load_scoring,
    new_mlp,
    predict,
    warm_start_from,
)

T0 = datetime(2025, 3, 1, 23, 59, tzinfo=UTC)
FAST = TrainingSettings(max_epochs=30, patience=4)


def ex(pid: str, entity: str, at: float, label: int, **features: float) -> LabelledExample:
    t = T0 + timedelta(seconds=at)
    return LabelledExample(
        prediction_id=pid,
        entity_id=entity,
        model_name="m",
        model_version=1,
        features=features,
        target=float(label),
        score=0.5,
        predicted_at=t,
        feedback_at=t,
    )


def test_dataset_appends_files_dedups_evolves_and_windows(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    first = ds.append([ex("a", "e1", 0, 1, x=1.0), ex("b", "e2", 120, 0, x=2.0)])
    # The two rows fall on two days: one file per day, hive-style partition directories.
    assert sorted(p.parent.name for p in first) == ["date=2025-03-01", "date=2025-03-02"]
    stamps = {p: p.stat().st_mtime_ns for p in first}
    # A redelivered row and a row with a new feature, in a later flush.
    ds.append([ex("a", "e1", 0, 1, x=1.0), ex("c", "e3", 60, 1, x=3.0, y=5.0)])
    assert {p: p.stat().st_mtime_ns for p in first} == stamps  # never rewritten
    assert ds.row_count("m") == 4 and ds.row_count("other") == 0
    frame = ds.load("m")
    assert frame.prediction_ids.tolist() == ["a", "c", "b"]  # deduplicated, by time
    assert np.isnan(frame.features["y"][0]) and frame.features["y"][1] == 5.0
    assert frame.matrix(["x", "y", "z"]).shape == (3, 3)
    assert ds.load("m", window_rows=2).prediction_ids.tolist() == ["c", "b"]
    assert ds.load("m", window_seconds=70).prediction_ids.tolist() == ["c", "b"]
    # A fresh instance over the same directory sees the same data (counts from metadata).
    assert Dataset(tmp_path).row_count("m") == 4


def test_a_flush_syncs_the_directories_of_what_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    [path] = Dataset(tmp_path).append([ex("a", "e1", 0, 1, x=1.0)])
    # The file, then its directory (the rename), and every directory the flush created.
    assert str(path.parent) in synced
    assert str(path.parent.parent) in synced  # date=... is new: its parent holds the entry
    assert synced.index(str(path.parent)) > max(
        i for i, name in enumerate(synced) if name.endswith(".tmp")
    )


def test_a_windowed_load_reads_only_the_days_its_window_reaches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = Dataset(tmp_path)
    day = 86400.0
    for d in range(10):  # one flush per day, three rows each (one of them redelivered)
        rows = [ex(f"p{d}-{i}", f"e{i}", d * day + i * 60, i % 2, x=float(d)) for i in range(3)]
        ds.append([*rows, rows[0]])
    everything = ds.load("m")
    opened: list[str] = []
    real_read = pq.read_table

    def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path).parent.name)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module.pq, "read_table", spy)
    hour = ds.load("m", window_seconds=3600)
    assert set(opened) <= {"date=2025-03-10", "date=2025-03-11"}, opened
    newest = everything.predicted_at.max()
    keep = everything.predicted_at >= newest - 3600
    assert hour.prediction_ids.tolist() == everything.prediction_ids[keep].tolist()
    opened.clear()
    last_two = ds.load("m", window_rows=2)
    assert set(opened) == {"date=2025-03-11"}, opened
    assert last_two.prediction_ids.tolist() == everything.prediction_ids[-2:].tolist()
    opened.clear()
    five = ds.load("m", window_rows=5)  # more than a day holds: the day before too
    assert set(opened) == {"date=2025-03-11", "date=2025-03-10"}, opened
    assert five.prediction_ids.tolist() == everything.prediction_ids[-5:].tolist()


def test_erased_entities_are_excluded_then_purged(tmp_path: Path) -> None:
    ds = Dataset(tmp_path)
    ds.append([ex("a", "gone", 0, 1, x=1.0), ex("b", "kept", 1, 0, x=2.0)])
    ds.append([ex("c", "gone", 2, 1, x=3.0)])
    ds.record_erasures(["gone"])
    assert ds.load("m").entity_ids.tolist() == ["kept"]
    assert ds.purge_erased() == 2
    remaining = [
        pq.read_table(p).column("entity_id").to_pylist() for p in ds.examples_dir.rglob("*.parquet")
    ]
    assert remaining == [["kept"]]  # the file with only erased rows is gone
    assert ds.row_count("m") == 1
    # Examples of an erased entity arriving later never reach disk.
    ds.append([ex("d", "gone", 3, 1, x=4.0), ex("e", "kept", 4, 0, x=5.0)])
    assert ds.load("m").entity_ids.tolist() == ["kept", "kept"]
    stored = [
        e
        for p in ds.examples_dir.rglob("*.parquet")
        for e in pq.read_table(p)["entity_id"].to_pylist()
    ]
    assert "gone" not in stored


def data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, Standardisation]:
    world = SyntheticWorld(SyntheticConfig(seed=seed))
    batch = world.sample(n)
    y = world.draw_labels(batch).astype(np.float64)
    st = Standardisation.fit(batch.features, FEATURE_NAMES, clip_quantile=0.005)
    return batch.features, y, st


def test_training_is_deterministic_and_the_onnx_export_takes_raw_features(
    tmp_path: Path,
) -> None:
    x, y, st = data(seed=2, n=1200)
    a = fit(x[:900], y[:900], x[900:1000], y[900:1000], st, FAST)
    b = fit(x[:900], y[:900], x[900:1000], y[900:1000], st, FAST)
    for (ka, va), (kb, vb) in zip(
        a.module.state_dict().items(), b.module.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb), ka
    assert a.best_epoch >= 1 and a.epochs <= FAST.max_epochs and not a.warm_started
    p = predict(a.module, x[1000:])
    assert quality.roc_auc(y[1000:], p) > 0.75
    exported = export_module(a.module, x[1000:])
    assert exported.n_features == len(FEATURE_NAMES) and exported.n_outputs == 1
    (tmp_path / "model.onnx").write_bytes(exported.onnx)
    scripted = OnnxScoring(tmp_path / "model.onnx")
    np.testing.assert_allclose(predict(scripted, x[1000:]), p, atol=1e-6)
    # NaN inputs are imputed with the training mean inside the module, never NaN out.
    holes = x[1000:1010].copy()
    holes[:, 2] = np.nan
    out = predict(scripted, holes)
    assert np.isfinite(out).all()
    filled = holes.copy()
    filled[:, 2] = st.mean[2]
    np.testing.assert_allclose(out, predict(scripted, filled), atol=1e-6)


def test_warm_start_keeps_the_function_under_new_statistics() -> None:
    x, y, st_old = data(seed=3, n=800)
    trained = fit(x[:600], y[:600], x[600:], y[600:], st_old, FAST)
    x2, _, st_new = data(seed=9, n=800)
    warm = WarmStart(dict(trained.module.mlp.state_dict()), st_old)
    mlp = new_mlp(len(FEATURE_NAMES), FAST)
    state = adapt_warm_state(warm, st_new, mlp)
    assert state is not None
    mlp.load_state_dict(state)
    inside = np.all(
        (x2 >= np.maximum(st_old.low, st_new.low)) & (x2 <= np.minimum(st_old.high, st_new.high)),
        axis=1,
    )
    assert inside.sum() > 100
    np.testing.assert_allclose(
        predict(ScoringModule(mlp, st_new), x2[inside]),
        predict(trained.module, x2[inside]),
        atol=1e-5,
    )
    other = Standardisation(("a",) * 8, st_new.low, st_new.high, st_new.mean, st_new.std)
    assert adapt_warm_state(warm, other, mlp) is None  # other features: no warm start
    wide = new_mlp(len(FEATURE_NAMES), FAST.model_copy(update={"hidden": [4]}))
    assert adapt_warm_state(warm, st_new, wide) is None  # other shapes: no warm start


def test_pipeline_publishes_then_gates_against_the_stable_version(tmp_path: Path) -> None:
    """Baseline first, then stable: a version is written only when the gate passes."""
    world = SyntheticWorld(SyntheticConfig(seed=5))
    scope = TrainerScope(model_name="pipe", data_dir=tmp_path / "data", training=FAST)
    repo = tmp_path / "repo"
    ds = Dataset(scope.data_dir)
    batch = world.sample(400)
    ds.append(examples(batch, world.draw_labels(batch), model_name="pipe", start=T0))
    first = run_pipeline(scope, ds, None, fit, run_id="r1")
    assert first.decision.accepted and first.decision.reference_kind == "baseline"
    assert first.payload is not None
    version, meta = publish_files(repo, "pipe", first.payload, first.metadata)
    assert version == 1 and model_repo.verify_sha256(repo, "pipe", 1)
    names = sorted(FEATURE_NAMES)  # inferred from the data: every feature seen, sorted
    assert meta["feature_names"] == names and meta["run_id"] == "r1"
    assert set(meta["standardisation"]) == {"feature_names", "clip_low", "clip_high", "mean", "std"}
    price = names.index("price")
    assert meta["feature_defaults"]["price"] == pytest.approx(
        meta["standardisation"]["mean"][price]
    )
    stable = load_stable(repo, "pipe", 1)
    assert stable is not None
    assert meta["format"] == "onnx" and meta["n_outputs"] == 1
    assert meta["export"]["max_abs_diff"] <= 1e-4 and meta["weights_sha256"]
    # What model.onnx computes equals what its weights and metadata say it computes.
    scripted = load_scoring(stable.path)
    warm = warm_start_from(stable.path, stable.standardisation)
    assert warm is not None
    mlp = MLP(len(names), list(FAST.hidden))
    mlp.load_state_dict(warm.state)
    frame = ds.load("pipe")
    z = stable.standardisation.transform(frame.matrix(names))
    with torch.no_grad():
        expected = torch.sigmoid(mlp(torch.as_tensor(z, dtype=torch.float32))).reshape(-1)
    np.testing.assert_allclose(predict(scripted, frame.matrix(names)), expected.numpy(), atol=1e-5)

    # More data: the warm-started candidate is compared with version 1 on the same holdout.
    more = world.sample(1600)
    ds.append(
        examples(more, world.draw_labels(more), model_name="pipe", start=T0 + timedelta(hours=1))
    )
    second = run_pipeline(scope, ds, stable, fit, run_id="r2")
    assert second.warm_started and second.decision.reference_kind == "stable"
    cand, ref = second.decision.candidate, second.decision.reference
    assert cand.count == ref.count == second.holdout_rows
    assert second.decision.accepted == (
        cand.auc is not None
        and ref.auc is not None
        and cand.auc > ref.auc
        and cand.log_loss is not None
        and ref.log_loss is not None
        and cand.log_loss < ref.log_loss - scope.gate.min_log_loss_improvement
    )
    # A tampered stable version is not used as a reference or a warm start: its graph...
    weights = stable.path.parent / model_repo.WEIGHTS_FILE
    original = stable.path.read_bytes(), weights.read_bytes()
    stable.path.write_bytes(original[0] + b"x")
    assert load_stable(repo, "pipe", 1) is None
    # ... or its weights, which a warm start refuses to read too.
    stable.path.write_bytes(original[0])
    weights.write_bytes(original[1] + b"x")
    assert load_stable(repo, "pipe", 1) is None
    with pytest.raises(ValueError, match="sha256"):
        warm_start_from(stable.path, stable.standardisation)
