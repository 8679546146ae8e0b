"""The controller core with its two outside effects recorded in memory (a unit test of logic:
the real Kafka and Triton paths are covered in test_rollout_e2e and test_rollout_restart)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from loopmesh.mesh import model_repo
from loopmesh.mesh.errors import UnknownModel
from loopmesh.mesh.events import ModelPublished, RolloutChanged, VersionMetrics
from loopmesh.rollout.core import RolloutController
from loopmesh.rollout.machine import Refused
from loopmesh.rollout.policy import PolicySet, RolloutPolicy
from loopmesh.rollout.settings import RolloutScope

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Effects:
    """Publisher and loader in one, so the order of loads and publications is one list."""

    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []
        self.in_triton: dict[str, set[int]] = {}
        self.fail_loads = False
        self.policies: list[PolicySet] = []
        self.events: list[RolloutChanged] = []
        self.expected: list[dict[int, str]] = []

    async def rollout_changed(self, event: RolloutChanged) -> None:
        self.events.append(event)
        self.log.append(("publish", (event.state, event.canary_version, event.canary_weight)))

    async def policy_set(self, event: PolicySet) -> None:
        self.policies.append(event)

    async def loaded(self, model: str) -> set[int]:
        return set(self.in_triton.get(model, set()))

    async def ensure(
        self, model: str, versions: set[int], expected_sha: dict[int, str] | None = None
    ) -> bool:
        if self.fail_loads:
            raise RuntimeError("Triton said no")
        self.expected.append(dict(expected_sha or {}))
        self.log.append(("load", tuple(sorted(versions))))
        self.in_triton[model] = set(versions)
        return True


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def published(repo: Path, version: int) -> ModelPublished:
    model_repo.write_version(repo, "m", version, b"torchscript", {}, n_features=2)
    sha = model_repo.read_metadata(repo, "m", version)["sha256"]
    return ModelPublished(model_name="m", model_version=version, sha256=sha, feature_names=[])


def controller(repo: Path, effects: Effects, clock: Clock, **policy: object) -> RolloutController:
    scope = RolloutScope(
        default_policy=RolloutPolicy(
            min_samples=10, min_step_seconds=5, step_timeout_seconds=50, **policy
        )  # type: ignore[arg-type]
    )
    return RolloutController(scope, effects, effects, repo, clock=clock)


async def feed(ctl: RolloutController, clock: Clock, losses: dict[int, float]) -> None:
    for version, loss in losses.items():
        await ctl.on_metrics(
            VersionMetrics(
                model_name="m",
                model_version=version,
                window_seconds=600,
                count=500,
                log_loss=loss,
                log_loss_var=0.01,
                event_time=clock(),
            )
        )


async def test_versions_are_loaded_before_the_change_that_gives_them_traffic(repo: Path) -> None:
    effects, clock = Effects(), Clock()
    ctl = controller(repo, effects, clock)
    await ctl.on_published(published(repo, 1))
    await ctl.on_published(published(repo, 2))
    await ctl.on_published(published(repo, 3))  # queued behind v2's rollout
    assert ctl.pending == {"m": 3}
    await ctl.tick()
    assert effects.log == [
        ("load", (1,)),
        ("publish", ("stable", None, 0.0)),
        ("publish", ("candidate", 2, 0.0)),
        ("load", (1, 2)),
        ("publish", ("canary", 2, 0.05)),
    ]
    effects.log.clear()
    clock.tick(1)
    await feed(ctl, clock, {1: 0.5, 2: 0.9})
    await ctl.tick()
    # v2 is worse: rolled back; then the pending v3 starts at once.
    assert [entry[1] for entry in effects.log[:4]] == [
        ("rolled_back", 2, 0.0),
        ("candidate", 3, 0.0),
        (1, 2, 3),  # v2 drains while v3 loads
        ("canary", 3, 0.05),
    ]
    assert ctl.status("m").record.canary_version == 3 and not ctl.pending


async def test_a_failed_load_aborts_with_the_reason(repo: Path) -> None:
    effects, clock = Effects(), Clock()
    ctl = controller(repo, effects, clock)
    await ctl.on_published(published(repo, 1))
    effects.fail_loads = True
    await ctl.on_published(published(repo, 2))
    await ctl.tick()
    record = ctl.status("m").record
    assert (record.state, record.stable_version, record.canary_version) == ("aborted", 1, 2)
    assert "Triton said no" in record.reason


async def test_restore_resumes_state_policies_and_queued_versions(repo: Path) -> None:
    effects, clock = Effects(), Clock()
    ctl = controller(repo, effects, clock)
    await ctl.on_published(published(repo, 1))
    await ctl.on_published(published(repo, 2))
    await ctl.tick()
    published(repo, 3)  # in the repository; its event was consumed before a crash
    await ctl.set_policy("m", {"min_samples": 77}, reset=False)
    history = [h.event for h in ctl.history["m"]]

    again = controller(repo, Effects(), clock)
    again.restore(history, effects.policies)
    status = again.status("m")
    assert (status.record.state, status.record.step, status.record.canary_version) == (
        "canary",
        1,
        2,
    )
    assert status.record.changed_at == history[-1].event_time
    assert status.policy.min_samples == 77 and again.pending == {"m": 3}
    with pytest.raises(UnknownModel):
        again.status("other")
    with pytest.raises(Refused):
        await again.resume("m", reason="")
    with pytest.raises(ValueError):
        await again.pause("../m", reason="")


async def test_the_announced_sha256_survives_a_restart_and_is_checked_on_every_load(
    repo: Path,
) -> None:
    effects, clock = Effects(), Clock()
    ctl = controller(repo, effects, clock)
    first, second = published(repo, 1), published(repo, 2)
    await ctl.on_published(first)
    await ctl.on_published(second)
    await ctl.tick()
    # Every state names its versions' announced sha256: the compacted topic remembers them.
    assert effects.events[-1].sha256 == {1: first.sha256, 2: second.sha256}
    published(repo, 3)  # announced, consumed, not in a rollout yet when the process died
    third = ModelPublished(
        model_name="m",
        model_version=3,
        sha256=model_repo.read_metadata(repo, "m", 3)["sha256"],
        feature_names=[],
    )

    restarted = Effects()
    again = controller(repo, restarted, clock)
    again.restore(effects.events, effects.policies, [third])
    await again.tick()  # reconciles what Triton has (nothing, after its own restart)
    assert restarted.expected[0] == {1: first.sha256, 2: second.sha256}
    # A load after the restart still holds each version to its announcement.
    clock.tick(1)
    await feed(again, clock, {1: 0.5, 2: 0.9})
    await again.tick()
    assert any(e.get(3) == third.sha256 for e in restarted.expected), restarted.expected


async def test_a_newer_version_that_beat_the_canary_preempts_it(repo: Path) -> None:
    """Issue 22, latest wins: candidates queued behind a stale canary (v8 went through its
    steps while better v9..v11 waited)."""
    effects, clock = Effects(), Clock()
    ctl = controller(repo, effects, clock)
    await ctl.on_published(published(repo, 1))
    await ctl.on_published(published(repo, 2))
    await ctl.tick()
    assert ctl.status("m").record.canary_version == 2
    # v3 did not beat v2 on the trainer's holdout: it waits, as before.
    await ctl.on_published(published(repo, 3))
    assert ctl.status("m").record.canary_version == 2 and ctl.pending == {"m": 3}
    # v4 did: v2's rollout ends at once, and v4 (the newest) is next.
    better = published(repo, 4).model_copy(
        update={"preempts": 2, "metrics": {"holdout_loss": 0.41, "preempted_loss": 0.52}}
    )
    effects.log.clear()
    await ctl.on_published(better)
    ended = ctl.history["m"][-1].event
    assert (ended.state, ended.canary_version, ended.canary_weight) == ("aborted", 2, 0.0)
    assert "preempted" in ended.reason and "0.4100 < 0.5200 of v2" in ended.reason
    await ctl.tick()
    record = ctl.status("m").record
    assert (record.state, record.canary_version, record.stable_version) == ("canary", 4, 1)
    assert not ctl.pending  # v3 is skipped: v4 is newer
    # A claim about a version no longer in rollout changes nothing.
    stale = published(repo, 5).model_copy(update={"preempts": 2})
    await ctl.on_published(stale)
    assert ctl.status("m").record.canary_version == 4 and ctl.pending == {"m": 5}


def paired(version: int, clock: Clock, diff: float, *, with_stable: int = 1) -> VersionMetrics:
    """The joiner's paired figures of a shadow against the version that answered."""
    return VersionMetrics(
        model_name="m",
        model_version=version,
        window_seconds=600,
        count=500,
        loss=0.5 + diff,
        shadow_of=with_stable,
        paired_loss_diff=diff,
        paired_loss_diff_var=0.01,
        event_time=clock(),
    )


async def test_shadows_are_loaded_before_announced_and_latest_wins_there(repo: Path) -> None:
    """Issue 22, shadow first: a candidate is loaded and announced as a shadow (no weight);
    a newer one that beat it on the holdout takes its place; the best that is no worse on the
    same requests advances; one worse is dropped, never having had a weight."""
    effects, clock = Effects(), Clock()
    ctl = controller(repo, effects, clock, shadow_share=0.5, max_shadows=2)
    await ctl.on_published(published(repo, 1))
    effects.log.clear()
    await ctl.on_published(published(repo, 2))
    assert effects.log == [("load", (1, 2)), ("publish", ("shadow", None, 0.0))]
    assert (effects.events[-1].shadow_versions, effects.events[-1].shadow_share) == ([2], 0.5)
    # v3 beat v2 on the trainer's holdout: it replaces v2 in shadow.
    better = published(repo, 3).model_copy(
        update={"preempts": 2, "metrics": {"holdout_loss": 0.4, "preempted_loss": 0.5}}
    )
    await ctl.on_published(better)
    record = ctl.status("m").record
    assert (record.state, record.shadows) == ("shadow", (3,))
    assert "v2 preempted in shadow by v3" in record.reason
    # v4 without a claim joins beside it (room for two); v5 waits.
    await ctl.on_published(published(repo, 4))
    await ctl.on_published(published(repo, 5))
    assert ctl.status("m").record.shadows == (3, 4) and ctl.pending == {"m": 5}
    # v4 is worse on the same requests: dropped; v5 takes the free place.
    clock.tick(1)
    await ctl.on_metrics(paired(4, clock, +0.3))
    await ctl.tick()
    record = ctl.status("m").record
    assert (record.state, record.shadows, record.stable_version) == ("shadow", (3, 5), 1)
    assert any("v4 dropped in shadow" in h.event.reason for h in ctl.history["m"])
    assert all(e.canary_weight == 0.0 for e in effects.events)
    # v3 and v5 both no worse; v5 better still: v5 goes to canary, v3 is dropped.
    clock.tick(1)
    await ctl.on_metrics(paired(3, clock, -0.005))
    await ctl.on_metrics(paired(5, clock, -0.01))
    ctl.policies.default = ctl.policies.default.merged({"shadow_promote_margin": None})
    await ctl.tick()
    record = ctl.status("m").record
    assert (record.state, record.canary_version, record.shadows) == ("canary", 5, ())
    assert "v3 dropped (v5 did better)" in record.reason
