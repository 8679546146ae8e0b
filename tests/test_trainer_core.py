"""TrainerCore without a broker: drift and count triggers, one run at a time, announcements
that survive a failed publish (real dataset files, real torch, real model repository)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from loopmesh.devstack.synthetic import SyntheticConfig, SyntheticWorld, examples
from loopmesh.mesh import model_repo
from loopmesh.mesh.errors import Unavailable
from loopmesh.mesh.events import ModelPublished, RolloutChanged
from loopmesh.trainer.core import TrainerCore, published_event_id
from loopmesh.trainer.settings import (
    DatasetSettings,
    TrainerScope,
    TrainingSettings,
    TriggerSettings,
)
from tests.test_trainer_drift import served

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


async def test_drift_starts_one_run_and_counts_start_another(tmp_path: Path) -> None:
    announced: list[ModelPublished] = []

    async def announce(event: ModelPublished) -> None:
        announced.append(event)

    core = TrainerCore(
        scope(tmp_path, min_new_examples=300, drift_detector="adwin"),
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

        # The stable version's per-example loss: its own rule, then another (drift).
        world = SyntheticWorld(SyntheticConfig(seed=4))
        at = T0 + timedelta(hours=2)
        same = served(world, 250, rule=0, start=at, model="core", version=1)
        flipped = served(world, 300, rule=1, start=at + timedelta(seconds=250), model="core")
        canary = served(world, 300, rule=1, start=at, model="core", version=9)
        assert core.observe_examples(canary) is None  # not the stable version
        assert core.observe_examples(same) is None
        drift = None
        for i in range(0, len(flipped), 50):
            core.dataset.append(flipped[i : i + 50])  # stored, then observed (the sink)
            drift = drift or core.observe_examples(flipped[i : i + 50])
        assert drift is not None and drift.drift is not None
        assert drift.drift.reason() in drift.reasons
        assert core.observe_examples(flipped) is None  # running: no second run
        await core.wait_idle()
        # The detector restarted at the detection: the same loss alone does not refire.
        core.observe_rollout(RolloutChanged(model_name="core", stable_version=1, state="stable"))
        more = served(world, 300, rule=1, start=at + timedelta(seconds=550), model="core")
        assert core.observe_examples(more) is None
        assert [r.drift is not None for r in core.runs()] == [True, False]

        # A rollout that names another stable version moves the reference (and is persisted).
        core.observe_rollout(RolloutChanged(model_name="core", stable_version=1, state="stable"))
        assert TrainerCore(core.scope, core.repository).stable_version() == 1
    finally:
        await core.stop()


async def test_a_failed_announcement_is_repeated_at_the_next_start(tmp_path: Path) -> None:
    async def broken(event: ModelPublished) -> None:
        raise ConnectionError("broker down")

    core = TrainerCore(
        scope(tmp_path, min_new_examples=None, drift_detector=None),
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
