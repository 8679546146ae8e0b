"""Pure logic of the rollout controller: policy, statistics, metrics book and state machine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from loopmesh.mesh.events import VersionMetrics
from loopmesh.rollout import machine
from loopmesh.rollout.analysis import (
    Arm,
    Operational,
    Snapshot,
    Verdict,
    compare,
    estimate_served,
    fixed_radius,
    sequence_radius,
)
from loopmesh.rollout.machine import Record, Refused
from loopmesh.rollout.metrics import MetricsBook
from loopmesh.rollout.policy import PolicyBook, PolicySet, RolloutPolicy

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = RolloutPolicy(min_samples=100, min_step_seconds=60, step_timeout_seconds=600)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def arm(version: int, value: float, count: int = 1000, variance: float = 0.1, **kw: float) -> Arm:
    return Arm(version, count, value, variance, measured=True, **kw)  # type: ignore[arg-type]


# -- policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"weights": (0.25, 0.05)}, "weights"),
        ({"weights": ()}, "weights"),
        ({"weights": (0.5, 1.0)}, "weights"),
        ({"confidence": 1.0}, "confidence"),
        ({"min_samples": 0}, "min_samples"),
        ({"min_step_seconds": 700.0}, ""),  # longer than the step timeout
        ({"max_error_rate": 1.5}, "max_error_rate"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_policies_name_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        POLICY.merged(changes)
    assert field in str(info.value)


def test_policy_resolution_order() -> None:
    special = RolloutPolicy(min_samples=7)
    book = PolicyBook(POLICY, {"ctr": special})
    assert book.get("other") is POLICY and book.get("ctr") is special
    override = special.merged({"min_samples": 9})
    book.apply(PolicySet(model_name="ctr", policy=override))
    assert book.get("ctr").min_samples == 9
    book.apply(PolicySet(model_name="ctr", policy=None))
    assert book.get("ctr") is special
    assert POLICY.weight_at(0) == 0.0 and POLICY.weight_at(3) == 0.5 and POLICY.steps == 3


# -- analysis ---------------------------------------------------------------------------------


def test_better_canary_advances_worse_rolls_back_close_holds() -> None:
    better = compare(POLICY, arm(2, 0.40), arm(1, 0.50))
    assert better.action == "advance" and better.figures["upper"] <= POLICY.max_regression
    worse = compare(POLICY, arm(2, 0.60), arm(1, 0.50))
    assert worse.action == "rollback" and worse.figures["lower"] > POLICY.max_regression
    assert "canary loss is higher" in worse.reason
    close = compare(POLICY, arm(2, 0.502), arm(1, 0.50))
    assert close.action == "hold" and not close.starved and "inconclusive" in close.reason


def test_higher_is_better_metrics_are_oriented() -> None:
    policy = POLICY.merged({"metric": "accuracy"})
    assert compare(policy, arm(2, 0.70), arm(1, 0.80)).action == "rollback"
    assert compare(policy, arm(2, 0.90), arm(1, 0.80)).action == "advance"


def test_too_few_samples_or_no_metrics_hold_as_starved() -> None:
    few = compare(POLICY, arm(2, 0.1, count=12), arm(1, 0.5))
    assert few.action == "hold" and few.starved and "canary 12/100" in few.reason
    unmeasured = compare(POLICY, Arm(2), arm(1, 0.5))
    assert unmeasured.starved and "metrics of canary" in unmeasured.reason


def test_guards_roll_back_when_reported_and_are_skipped_when_not() -> None:
    skipped = compare(POLICY, arm(2, 0.4), arm(1, 0.5))
    assert "error rate and latency guard skipped" in skipped.reason
    n = {"requests": 1000, "latency_samples": 1000}
    errors = compare(POLICY, arm(2, 0.4, count=5, error_rate=0.2, **n), arm(1, 0.5))
    assert errors.action == "rollback" and "error rate 20.00%" in errors.reason
    increase = compare(
        POLICY, arm(2, 0.4, error_rate=0.03, **n), arm(1, 0.5, error_rate=0.001, **n)
    )
    assert increase.action == "rollback" and "vs stable" in increase.reason
    slow = compare(
        POLICY,
        arm(2, 0.4, latency_p99_ms=40.0, latency_p99_low_ms=38.0, **n),
        arm(1, 0.5, latency_p99_ms=10.0, latency_p99_high_ms=11.0, **n),
    )
    assert slow.action == "rollback" and "x stable" in slow.reason
    limit = POLICY.merged({"max_latency_p99_ms": 25.0, "max_latency_ratio": None})
    assert compare(limit, arm(2, 0.4, latency_p99_ms=30.0, **n), arm(1, 0.5)).action == "rollback"
    fine = compare(POLICY, arm(2, 0.4, error_rate=0.0, latency_p99_ms=9.0, **n), arm(1, 0.5))
    assert fine.action == "advance" and "skipped" not in fine.reason


def test_guards_wait_for_evidence_and_fail_only_on_a_bound() -> None:
    """Issue 22: a p99 guard rolled a canary back after about 2 requests ("191 ms > 1.5 x
    stable 109 ms"); the error-rate guard decided on 5."""
    few = compare(
        POLICY,
        arm(2, 0.4, latency_p99_ms=286.0, latency_samples=44, error_rate=0.2, requests=5),
        arm(1, 0.5, latency_p99_ms=162.7, latency_samples=900, error_rate=0.0, requests=900),
    )
    assert few.action == "hold" and few.starved
    assert "error rate guard: canary 5/100 requests" in few.reason
    assert "latency guard: canary 44/100" in few.reason
    # Enough latencies, but the intervals overlap the ratio: noise, not a verdict.
    n = {"requests": 400, "latency_samples": 400, "error_rate": 0.0}
    noisy = compare(
        POLICY,
        arm(2, 0.4, latency_p99_ms=191.0, latency_p99_low_ms=120.0, **n),
        arm(1, 0.5, latency_p99_ms=109.0, latency_p99_high_ms=150.0, **n),
    )
    assert noisy.action == "advance", noisy.reason
    # An error rate above the limit on few failures is not yet above it at 95%.
    unsure = compare(POLICY, arm(2, 0.4, **{**n, "error_rate": 0.07, "requests": 100}), arm(1, 0.5))
    assert unsure.action == "advance", unsure.reason
    sure = compare(POLICY, arm(2, 0.4, **{**n, "error_rate": 0.2, "requests": 400}), arm(1, 0.5))
    assert sure.action == "rollback" and "bound >=" in sure.reason
    # A worse metric still rolls back while the guards wait: quality evidence is evidence.
    worse = compare(POLICY, arm(2, 0.9, error_rate=0.0, requests=3), arm(1, 0.5))
    assert worse.action == "rollback"


def test_the_gateways_p99_interval_brackets_the_quantile() -> None:
    from loopmesh.inference.operational import quantile_bounds

    rng = np.random.default_rng(3)
    hits, trials = 0, 400
    for _ in range(trials):
        values = rng.exponential(10.0, size=1000).tolist()
        low, high = quantile_bounds(values, 0.99)
        true_p99 = -10.0 * np.log(0.01)
        assert high is not None and low <= high
        hits += low <= true_p99 <= high
    assert hits / trials >= 0.93  # a 95% interval, checked by simulation
    assert quantile_bounds([5.0, 6.0, 7.0], 0.99)[1] is None  # too few to bound from above


def test_auc_needs_label_rate_and_log_loss_falls_back_to_assumed_std() -> None:
    from loopmesh.rollout.analysis import arm_from_metrics

    auc_policy = POLICY.merged({"metric": "auc"})
    no_rate = VersionMetrics(model_name="m", model_version=2, window_seconds=60, count=500, auc=0.7)
    made = arm_from_metrics(auc_policy, 2, no_rate)
    assert made.variance is None
    assert "label_rate" in compare(auc_policy, made, made).reason
    with_rate = no_rate.model_copy(update={"label_rate": 0.3})
    assert arm_from_metrics(auc_policy, 2, with_rate).variance is not None
    loss = VersionMetrics(model_name="m", model_version=2, window_seconds=60, count=5, log_loss=0.5)
    assert arm_from_metrics(POLICY, 2, loss).variance == POLICY.assumed_loss_std**2
    given = loss.model_copy(update={"log_loss_var": 0.2})
    assert arm_from_metrics(POLICY, 2, given).variance == 0.2


def test_the_canary_compares_each_tasks_loss_with_its_variance() -> None:
    # Issue 18: the bound read log loss only, which multiclass and regression models lack.
    from loopmesh.rollout.analysis import arm_from_metrics

    assert POLICY.metric == "loss" and not POLICY.higher_is_better
    regression = VersionMetrics(
        model_name="m",
        model_version=2,
        window_seconds=60,
        count=500,
        task="regression",
        loss=2.5,
        loss_var=4.0,
        mae=1.2,
    )
    arm = arm_from_metrics(POLICY, 2, regression)
    assert (arm.value, arm.variance) == (2.5, 4.0)
    worse = arm_from_metrics(POLICY, 3, regression.model_copy(update={"loss": 3.5}))
    assert compare(POLICY, worse, arm).action == "rollback"
    multiclass = regression.model_copy(
        update={"task": "multiclass", "loss": 0.9, "loss_var": None, "log_loss_var": 0.1}
    )
    # No variance of its own: the conservative assumption, not a binary figure.
    assert arm_from_metrics(POLICY, 2, multiclass).variance == POLICY.assumed_loss_std**2


def test_confidence_sequence_stays_valid_under_continuous_monitoring() -> None:
    """Looking after every sample: the sequence keeps its error rate; a fixed interval does not."""
    rng = np.random.default_rng(7)
    alpha, streams, length = 0.05, 400, 2000
    sums = np.cumsum(rng.normal(size=(streams, length)), axis=1)
    n = np.arange(1, length + 1)
    means = np.abs(sums / n)
    cs = np.array([sequence_radius(1.0, int(k), alpha, 50) for k in n])
    z = np.array([fixed_radius(1.0, int(k), 0.0, int(k), 1 - alpha) for k in n])
    cs_miss = float(np.mean((means[:, 49:] > cs[49:]).any(axis=1)))
    fixed_miss = float(np.mean((means[:, 49:] > z[49:]).any(axis=1)))
    assert cs_miss <= alpha
    assert fixed_miss > 2 * alpha  # why the default is sequential


def test_served_estimate_never_counts_overlapping_windows_twice() -> None:
    # Cumulative within one long window: the newest count is the answer.
    one = [Snapshot(at(t), 3600.0, c) for t, c in ((1, 50), (2, 100), (3, 150))]
    assert estimate_served(one) == 150
    # Ten-second sliding windows every 5 s: only windows that do not overlap are added.
    sliding = [Snapshot(at(5 * i), 10.0, 10) for i in range(1, 7)]  # t=5..30
    assert estimate_served(sliding) == 10 * 3  # windows ending at 30, 20, 10
    assert estimate_served([]) == 0


# -- metrics book ---------------------------------------------------------------------------


def test_book_keeps_quality_and_gateway_figures_apart() -> None:
    book = MetricsBook()

    def metrics(t: float, **kw: object) -> VersionMetrics:
        fields: dict[str, object] = {"count": 0, "window_seconds": 600.0, **kw}
        return VersionMetrics(model_name="m", model_version=2, event_time=at(t), **fields)  # type: ignore[arg-type]

    joined = metrics(10, count=80, log_loss=0.4)
    assert book.record(joined) and not book.record(joined)  # same event id twice
    assert book.record(metrics(11, count=900, error_rate=0.01, latency_p99_ms=12.0))
    assert not book.record(metrics(5, count=10, log_loss=0.9))  # older than what is known
    quality = book.quality("m", 2, since=at(0))
    assert quality is not None and quality.count == 80  # the gateway's count is not joined
    ops = book.operational("m", 2, since=at(0))
    assert (ops.error_rate, ops.requests, ops.latency_p99_ms) == (0.01, 900, 12.0)
    assert ops.latency_samples == 900  # not said: as many as the requests
    assert book.quality("m", 2, since=at(10.5)) is None
    assert book.operational("m", 2, since=at(12)) == Operational()
    assert book.served("m", 2) == 80 and book.served("m", 9) == 0


# -- state machine ------------------------------------------------------------------------------


def advance_verdict() -> Verdict:
    return Verdict("advance", "canary is no worse", {"upper": -0.1})


def test_first_version_is_stable_then_candidates_queue_behind_a_rollout() -> None:
    first = machine.on_published(None, "m", 1, at(0))
    assert first is not None and first.record.state == "stable" and first.needs_loaded == {1}
    stable = first.record
    assert machine.on_published(stable, "m", 1, at(1)) is None  # a replay
    candidate = machine.on_published(stable, "m", 2, at(1))
    assert candidate is not None and candidate.record.state == "candidate"
    assert candidate.record.canary_version == 2 and candidate.record.canary_weight == 0.0
    assert machine.on_published(candidate.record, "m", 3, at(2)) is None  # waits as pending


def test_canary_walks_every_step_respecting_the_minimum_time() -> None:
    rec = Record("m", "candidate", at(0), stable_version=1, canary_version=2)
    begin = machine.begin_canary(rec, POLICY, at(1))
    assert begin.needs_loaded == {1, 2} and begin.record.canary_weight == 0.05
    rec = begin.record
    seen = []
    clock = 1.0
    while rec.state == "canary":
        early = machine.evaluate(rec, POLICY, advance_verdict(), at(clock + 59), served=10)
        assert early is None  # no worse, but the step is not old enough
        clock += 60
        change = machine.evaluate(rec, POLICY, advance_verdict(), at(clock), served=10)
        assert change is not None
        rec = change.record
        seen.append((rec.state, rec.canary_weight, rec.step))
    assert seen == [("canary", 0.25, 2), ("canary", 0.5, 3), ("stable", 0.0, 0)]
    assert rec.stable_version == 2 and rec.canary_version is None
    assert "promoted to stable (was v1)" in rec.reason


def test_rollback_reports_what_the_canary_served() -> None:
    rec = Record(
        "m", "canary", at(0), stable_version=1, canary_version=2, canary_weight=0.25, step=2
    )
    verdict = Verdict("rollback", "canary log_loss is higher", {"lower": 0.2})
    change = machine.evaluate(rec, POLICY, verdict, at(5), served=321)
    assert change is not None and change.record.state == "rolled_back"
    assert change.record.canary_weight == 0.0 and change.record.step == 2
    assert "served ~321 requests" in change.record.reason
    assert change.figures["canary_requests_estimate"] == 321 and change.figures["lower"] == 0.2


@pytest.mark.parametrize(
    ("starved", "kind"), [(True, "too little traffic"), (False, "no decision")]
)
def test_a_step_without_decision_is_aborted_at_the_timeout(starved: bool, kind: str) -> None:
    rec = Record(
        "m", "canary", at(0), stable_version=1, canary_version=2, canary_weight=0.05, step=1
    )
    hold = Verdict("hold", "canary 3/100", starved=starved)
    assert machine.evaluate(rec, POLICY, hold, at(599), served=3) is None
    assert "aborting in 1s" in machine.hold_reason(rec, POLICY, hold, at(599))
    change = machine.evaluate(rec, POLICY, hold, at(600), served=3)
    assert change is not None and change.record.state == "aborted"
    assert kind in change.record.reason and change.record.canary_weight == 0.0


def test_restored_record_continues_the_step_timer_from_the_event_time() -> None:
    rec = Record(
        "m", "canary", at(0), stable_version=1, canary_version=2, canary_weight=0.25, step=2
    )
    restored = Record.from_event(rec.to_event())
    assert restored == rec
    assert machine.evaluate(restored, POLICY, advance_verdict(), at(59), served=0) is None
    change = machine.evaluate(restored, POLICY, advance_verdict(), at(60), served=0)
    assert change is not None and change.record.step == 3


def test_manual_commands_and_their_refusals() -> None:
    canary = Record(
        "m", "canary", at(0), stable_version=1, canary_version=2, canary_weight=0.05, step=1
    )
    one_up = machine.promote(canary, POLICY, at(1), to_stable=False, why="looks good")
    assert one_up.record.step == 2 and "manual promote: looks good" in one_up.record.reason
    straight = machine.promote(canary, POLICY, at(1), to_stable=True, why="")
    assert straight.record.state == "stable" and straight.record.stable_version == 2
    paused = machine.pause(canary, at(2), why="investigating").record
    assert paused.state == "paused" and paused.canary_weight == 0.05
    assert machine.evaluate(paused, POLICY, advance_verdict(), at(999), served=0) is None
    resumed = machine.resume(paused, at(3), why="").record
    assert (resumed.state, resumed.step, resumed.changed_at) == ("canary", 1, at(3))
    rolled = machine.rollback(paused, POLICY, at(4), why="bad", served=5).record
    assert rolled.state == "rolled_back" and "manual rollback: bad" in rolled.reason
    stable = Record("m", "stable", at(0), stable_version=1)
    candidate = Record("m", "candidate", at(0), stable_version=1, canary_version=2)
    for refused in (
        lambda: machine.promote(stable, POLICY, at(1), to_stable=False, why=""),
        lambda: machine.promote(candidate, POLICY, at(1), to_stable=False, why=""),
        lambda: machine.rollback(rolled, POLICY, at(5), why="", served=0),
        lambda: machine.pause(stable, at(1), why=""),
        lambda: machine.pause(paused, at(1), why=""),
        lambda: machine.resume(canary, at(1), why=""),
    ):
        with pytest.raises(Refused):
            refused()


def test_failed_load_aborts_the_version_and_keeps_stable() -> None:
    stable = Record("m", "stable", at(0), stable_version=1)
    candidate = machine.on_published(stable, "m", 2, at(1))
    assert candidate is not None
    begin = machine.begin_canary(candidate.record, POLICY, at(2))
    failed = machine.load_failed(candidate.record, begin, "sha256 mismatch", at(3)).record
    assert (failed.state, failed.stable_version, failed.canary_version) == ("aborted", 1, 2)
    assert "sha256 mismatch" in failed.reason and failed.high_water == 2
    first = machine.on_published(None, "m", 1, at(0))
    assert first is not None
    base = Record("m", "aborted", at(0))
    boot = machine.load_failed(base, first, "boom", at(1)).record
    assert (boot.stable_version, boot.canary_version) == (None, None)  # nothing to route
    assert "loading v1 failed: boom" in boot.reason
    retry = machine.on_published(boot, "m", 2, at(2))
    assert retry is not None and retry.record.state == "stable" and retry.needs_loaded == {2}


def test_retired_versions_stay_loaded_for_the_drain_only() -> None:
    promoted = Record("m", "stable", at(0), stable_version=2)
    assert machine.wanted_loaded(promoted, {1, 2}, at(10), 30.0) == {1, 2}
    assert machine.wanted_loaded(promoted, {1, 2}, at(30), 30.0) == {2}
    canary = Record(
        "m", "canary", at(0), stable_version=1, canary_version=2, canary_weight=0.05, step=1
    )
    assert machine.wanted_loaded(canary, set(), at(99), 30.0) == {1, 2}
    candidate = Record("m", "candidate", at(0), stable_version=1, canary_version=2)
    assert machine.wanted_loaded(candidate, {1, 2}, at(99), 30.0) == {1, 2}
    assert machine.wanted_loaded(candidate, {1}, at(99), 30.0) == {1}


def test_a_specs_rollout_section_is_its_policy_and_must_suit_its_task(tmp_path: Path) -> None:
    from loopmesh.mesh.model_spec import SpecError
    from loopmesh.rollout.policy import spec_policies

    models = tmp_path / "models"
    models.mkdir()
    base = "inputs: {context: [{name: x}]}\nlabel: {source: value}\n"
    (models / "a.yaml").write_text(
        "name: a\ntask: regression\n" + base + "rollout: {weights: [0.1, 0.5], min_samples: 50}\n"
    )
    (models / "b.yaml").write_text("name: b\ntask: regression\n" + base)
    policies = spec_policies(tmp_path, POLICY)
    assert set(policies) == {"a"}  # b has no overrides: the default applies
    assert policies["a"].weights == (0.1, 0.5) and policies["a"].min_samples == 50
    assert policies["a"].confidence == POLICY.confidence  # the rest from the default
    (models / "b.yaml").write_text(
        "name: b\ntask: regression\n" + base + "rollout: {metric: auc}\n"
    )
    with pytest.raises(SpecError, match="not reported for a regression model") as caught:
        spec_policies(tmp_path, POLICY)
    assert caught.value.field == "models/b.yaml: rollout.metric"
    (models / "b.yaml").write_text(
        "name: b\ntask: regression\n" + base + "rollout: {weights: []}\n"
    )
    with pytest.raises(SpecError) as caught:
        spec_policies(tmp_path, POLICY)
    assert caught.value.field == "models/b.yaml: rollout.weights"
