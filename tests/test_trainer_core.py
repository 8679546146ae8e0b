"""TrainerCore without a broker: drift and count triggers, one run at a time, announcements
that survive a failed publish (real dataset files, real torch, real model repository)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from loopmesh.devstack.synthetic import SyntheticConfig, SyntheticWorld, examples
from loopmesh.mesh import model_repo
from loopmesh.mesh.errors import Unavailable
from loopmesh.mesh.events import ModelPublished, RolloutChanged, VersionMetrics
from loopmesh.trainer.core import TrainerCore, published_event_id
from loopmesh.trainer.settings import (
    DatasetSettings,
    TrainerScope,
    TrainingSettings,
    TriggerSettings,
)

T0 = datetime(2025, 5, 1, tzinfo=UTC)


def scope(tmp_path: Path, **triggers: object) -> TrainerScope:
    return TrainerScope(
        model_name="core",
        data_dir=tmp_path / "data",
        dataset=DatasetSettings(min_rows=100),
        training=TrainingSettings(max_epochs=15, patience=3),
        triggers=TriggerSettings(cooldown_seconds=0, check_interval_seconds=3600, **triggers),  # type: ignore[arg-type]
    )


def seed(core: TrainerCore, n: int, seed: int = 0, offset_h: int = 0) -> None:
    world = SyntheticWorld(SyntheticConfig(seed=seed))
    batch = world.sample(n)
    start = T0 + timedelta(hours=offset_h)
    core.dataset.append(examples(batch, world.draw_labels(batch), model_name="core", start=start))


def window(version: int, auc: float) -> VersionMetrics:
    return VersionMetrics(
        model_name="core", model_version=version, window_seconds=60, count=500, auc=auc
    )


async def test_drift_starts_one_run_and_counts_start_another(tmp_path: Path) -> None:
    announced: list[ModelPublished] = []

    async def announce(event: ModelPublished) -> None:
        announced.append(event)

    core = TrainerCore(
        scope(tmp_path, min_new_examples=300, drift_threshold=0.05, drift_min_count=100),
        tmp_path / "repo",
        announce=announce,
    )
    await core.start()
    try:
        seed(core, 250)
        assert core.examples_stored() is None  # 250 < 300
        seed(core, 100, seed=1, offset_h=1)
        first = core.examples_stored()
        assert first is not None and first.reasons == ["350 new examples >= 300"]
        assert core.examples_stored() is None  # one run at a time
        done = await core.wait_idle()
        assert done is not None and done.status == "published" and done.version == 1
        assert [e.model_version for e in announced] == [1]
        assert announced[0].event_id == published_event_id("core", 1)
        assert core.examples_stored() is None  # nothing new since that run started

        # The stable version's live AUC: best 0.85, then 0.79 is a drop beyond 0.05.
        assert core.observe_metrics(window(1, 0.80)) is None
        assert core.observe_metrics(window(1, 0.85)) is None
        assert core.observe_metrics(window(9, 0.10)) is None  # not the stable version
        drift = core.observe_metrics(window(1, 0.79))
        assert drift is not None and drift.reasons == ["drift of live auc"]
        assert core.observe_metrics(window(1, 0.70)) is None  # running: no second run
        await core.wait_idle()
        # The reference was reset with that run: the same drop alone does not refire.
        stable = core.stable_version()
        assert stable is not None and core.observe_metrics(window(stable, 0.70)) is None
        assert [r.reasons[0] for r in core.runs()] == [
            "drift of live auc",
            "350 new examples >= 300",
        ]

        # A rollout that names another stable version moves the reference (and is persisted).
        core.observe_rollout(RolloutChanged(model_name="core", stable_version=1, state="stable"))
        assert TrainerCore(core.scope, core.repository).stable_version() == 1
    finally:
        await core.stop()


async def test_a_failed_announcement_is_repeated_at_the_next_start(tmp_path: Path) -> None:
    async def broken(event: ModelPublished) -> None:
        raise ConnectionError("broker down")

    core = TrainerCore(
        scope(tmp_path, min_new_examples=None, drift_threshold=None),
        tmp_path / "repo",
        announce=broken,
    )
    await core.start()
    seed(core, 300)
    started, _ = core.trigger(["manual: test"])
    assert started
    done = await core.wait_idle()
    await core.stop()
    assert done is not None and done.status == "published"  # on disk, though not announced
    assert model_repo.list_versions(tmp_path / "repo", "core") == [1]

    announced: list[ModelPublished] = []

    async def working(event: ModelPublished) -> None:
        announced.append(event)

    again = TrainerCore(core.scope, tmp_path / "repo", announce=working)
    await again.start()
    await again.stop()
    assert [e.model_version for e in announced] == [1]
    meta = model_repo.read_metadata(tmp_path / "repo", "core", 1)
    assert announced[0].sha256 == meta["sha256"] and announced[0].event_id == published_event_id(
        "core", 1
    )
    third: list[ModelPublished] = []

    async def quiet(event: ModelPublished) -> None:
        third.append(event)

    once_more = TrainerCore(core.scope, tmp_path / "repo", announce=quiet)
    await once_more.start()
    await once_more.stop()
    assert third == []  # announced once is enough
    with pytest.raises(Unavailable, match="stopping"):
        once_more.trigger(["after stop"])
