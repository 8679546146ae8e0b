"""Shadow evaluation as pure logic: the state machine, the paired analysis, the joiner's paired
windows and the gateway's mirroring (in-memory doubles for Triton and the log)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from loopmesh.inference.catalog import ModelCatalog
from loopmesh.inference.core import BackendError, PredictInput, Predictor
from loopmesh.inference.routing import Route, RouteTable
from loopmesh.joiner.live import LiveMetrics
from loopmesh.mesh.events import LabelledExample, ShadowScore, VersionMetrics
from loopmesh.rollout import machine
from loopmesh.rollout.analysis import Arm, Operational, Verdict, compare, compare_shadow
from loopmesh.rollout.machine import Record
from loopmesh.rollout.metrics import MetricsBook
from loopmesh.rollout.policy import RolloutPolicy
from tests.helpers import eventually
from tests.test_inference_core import _NoFeatures, _Sink

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SHADOW = RolloutPolicy(shadow_share=1.0, min_samples=100, max_regression=0.0)


def _stable(version: int = 1) -> Record:
    return Record("m", "stable", T0, stable_version=version)


def _advance(difference: float, upper: float) -> Verdict:
    return Verdict("advance", "no worse", {"difference": difference, "upper": upper})


HOLD = Verdict("hold", "too little traffic", {}, starved=True)


# -- the state machine ------------------------------------------------------------------------


def test_a_published_version_goes_to_shadow_loaded_next_to_stable() -> None:
    change = machine.on_published(_stable(), "m", 2, T0, SHADOW)
    assert change is not None
    record = change.record
    assert (record.state, record.shadows, record.canary_version, record.canary_weight) == (
        "shadow",
        (2,),
        None,
        0.0,
    )
    assert change.needs_loaded == {1, 2}
    # Nobody is answered by a shadow; the gateway reads the share from the event.
    assert record.serving() == {1}
    event = record.to_event()
    assert (event.shadow_versions, event.shadow_share) == ([2], 1.0)
    assert Record.from_event(event) == record
    # Without a shadow share the old path: a candidate for canary.
    plain = machine.on_published(_stable(), "m", 2, T0, RolloutPolicy())
    assert plain is not None and plain.record.state == "candidate"


def test_shadows_fill_up_to_the_policy_and_the_rest_wait() -> None:
    first = machine.on_published(_stable(), "m", 2, T0, SHADOW)
    assert first is not None
    second = machine.on_published(first.record, "m", 3, T0, SHADOW)
    assert second is not None and second.record.shadows == (2, 3)
    assert machine.on_published(second.record, "m", 4, T0, SHADOW) is None  # max_shadows=2
    assert machine.on_published(second.record, "m", 3, T0, SHADOW) is None  # not newer


def test_a_worse_shadow_is_dropped_and_never_served() -> None:
    record = machine.on_published(_stable(), "m", 2, T0, SHADOW)
    assert record is not None
    worse = Verdict("rollback", "shadow is worse", {"difference": 0.3})
    change = machine.evaluate_shadow(record.record, SHADOW, {2: worse}, T0)
    assert change is not None
    dropped = change.record
    assert dropped.state == "dropped" and dropped.stable_version == 1
    assert dropped.shadows == () and dropped.canary_weight == 0.0
    assert "dropped in shadow, having answered no user" in dropped.reason
    assert dropped.high_water == 2  # never rolled out again
    assert machine.on_published(dropped, "m", 2, T0, SHADOW) is None


def test_one_of_two_shadows_dropped_is_remembered() -> None:
    one = machine.on_published(_stable(), "m", 2, T0, SHADOW)
    assert one is not None
    two = machine.on_published(one.record, "m", 3, T0, SHADOW)
    assert two is not None
    worse = Verdict("rollback", "worse", {})
    change = machine.evaluate_shadow(two.record, SHADOW, {2: HOLD, 3: worse}, T0)
    assert change is not None
    record = change.record
    assert (record.state, record.shadows, record.high_water) == ("shadow", (2,), 3)
    # The event remembers v3 even though no field names it any more.
    assert Record.from_event(record.to_event()).high_water == 3


def test_the_best_ready_shadow_advances_to_canary_and_the_others_are_dropped() -> None:
    one = machine.on_published(_stable(), "m", 2, T0, SHADOW)
    assert one is not None
    two = machine.on_published(one.record, "m", 3, T0, SHADOW)
    assert two is not None
    verdicts = {2: _advance(-0.01, 0.0), 3: _advance(-0.02, 0.0)}
    change = machine.evaluate_shadow(two.record, SHADOW, verdicts, T0)
    assert change is not None
    record = change.record
    assert (record.state, record.canary_version, record.step) == ("canary", 3, 1)
    assert record.canary_weight == SHADOW.weights[0]
    assert record.shadows == () and "v2 dropped (v3 did better)" in record.reason


def test_a_shadow_confidently_better_goes_straight_to_stable() -> None:
    one = machine.on_published(_stable(), "m", 2, T0, SHADOW)
    assert one is not None
    change = machine.evaluate_shadow(one.record, SHADOW, {2: _advance(-0.2, -0.1)}, T0)
    assert change is not None
    record = change.record
    assert (record.state, record.stable_version, record.canary_version) == ("stable", 2, None)
    assert "promoted to stable from shadow" in record.reason
    # With no margin allowed, the same evidence only earns a canary.
    cautious = SHADOW.merged({"shadow_promote_margin": None})
    again = machine.evaluate_shadow(one.record, cautious, {2: _advance(-0.2, -0.1)}, T0)
    assert again is not None and again.record.state == "canary"


def test_an_undecided_shadow_is_dropped_at_the_timeout() -> None:
    one = machine.on_published(_stable(), "m", 2, T0, SHADOW)
    assert one is not None
    early = T0 + timedelta(seconds=SHADOW.shadow_timeout_seconds - 1)
    assert machine.evaluate_shadow(one.record, SHADOW, {2: HOLD}, early) is None
    late = T0 + timedelta(seconds=SHADOW.shadow_timeout_seconds)
    change = machine.evaluate_shadow(one.record, SHADOW, {2: HOLD}, late)
    assert change is not None and change.record.state == "dropped"
    assert "without a decision" in change.record.reason


def test_a_newer_version_preempts_the_shadow_it_beat() -> None:
    one = machine.on_published(_stable(), "m", 2, T0, SHADOW)
    assert one is not None
    change = machine.preempt_shadow(one.record, 2, 3, SHADOW, T0, why="holdout loss lower")
    assert change is not None
    record = change.record
    assert (record.state, record.shadows, record.high_water) == ("shadow", (3,), 3)
    assert "v2 preempted in shadow by v3: holdout loss lower" in record.reason
    assert change.needs_loaded == {1, 3}


def test_a_failed_shadow_load_leaves_the_others_running() -> None:
    one = machine.on_published(_stable(), "m", 2, T0, SHADOW)
    assert one is not None
    two = machine.on_published(one.record, "m", 3, T0, SHADOW)
    assert two is not None
    change = machine.load_failed(one.record, two, "no such file", T0)
    assert (change.record.state, change.record.shadows) == ("shadow", (2,))
    assert change.record.high_water == 3 and "v3 not shadowed" in change.record.reason


# -- the paired analysis ----------------------------------------------------------------------


def _paired(n: int, diff: float, var: float) -> VersionMetrics:
    return VersionMetrics(
        model_name="m",
        model_version=2,
        window_seconds=600,
        count=n,
        loss=0.5 + diff,
        shadow_of=1,
        paired_loss_diff=diff,
        paired_loss_diff_var=var,
    )


STABLE_ARM = Arm(version=1, count=0)


def test_paired_evidence_decides_where_two_unpaired_arms_cannot() -> None:
    # Per-example losses vary a lot (variance 0.5) but the two versions' losses move together:
    # their difference varies little (0.01). 300 requests: the paired bound is decisive.
    paired = compare_shadow(SHADOW, _paired(300, -0.05, 0.01), Operational(), STABLE_ARM)
    assert paired.action == "advance", paired.reason
    assert paired.figures["upper"] < 0
    unpaired = compare(
        SHADOW,
        Arm(2, 300, 0.45, 0.5, measured=True),
        Arm(1, 300, 0.50, 0.5, measured=True),
    )
    assert unpaired.action == "hold", unpaired.reason


def test_a_worse_shadow_is_judged_worse_and_a_short_window_holds() -> None:
    worse = compare_shadow(SHADOW, _paired(300, 0.2, 0.05), Operational(), STABLE_ARM)
    assert worse.action == "rollback" and "shadow is worse" in worse.reason
    few = compare_shadow(SHADOW, _paired(50, 0.2, 0.05), Operational(), STABLE_ARM)
    assert few.action == "hold" and few.starved and "50/100 paired samples" in few.reason
    missing = compare_shadow(SHADOW, None, Operational(), STABLE_ARM)
    assert missing.action == "hold" and missing.starved


def test_a_shadow_guard_with_too_few_calls_holds_then_fails_on_evidence() -> None:
    good = _paired(300, -0.05, 0.01)
    waiting = compare_shadow(SHADOW, good, Operational(error_rate=0.5, requests=10), STABLE_ARM)
    assert waiting.action == "hold" and "error rate guard: canary 10/100" in waiting.reason
    failing = compare_shadow(SHADOW, good, Operational(error_rate=0.5, requests=400), STABLE_ARM)
    assert failing.action == "rollback" and "guard failed" in failing.reason


def test_a_slow_shadow_is_not_dropped_but_goes_to_canary_not_straight_to_stable() -> None:
    """Shadow calls run beside the answer on a just-loaded version: their p99 says little
    about serving, so a failed latency guard sends the shadow to canary, where it counts."""
    better = _paired(300, -0.2, 0.01)
    slow = Operational(latency_p99_ms=260.0, latency_samples=400, latency_p99_low_ms=250.0)
    stable = Arm(
        version=1,
        latency_p99_ms=100.0,
        latency_samples=400,
        latency_p99_low_ms=95.0,
        latency_p99_high_ms=110.0,
    )
    verdict = compare_shadow(SHADOW, better, slow, stable)
    assert verdict.action == "advance" and verdict.canary_only, verdict
    assert "to canary only: p99 latency" in verdict.reason
    record = machine.on_published(_stable(), "m", 2, T0, SHADOW)
    assert record is not None
    change = machine.evaluate_shadow(record.record, SHADOW, {2: verdict}, T0)
    assert change is not None and change.record.state == "canary"
    quick = Operational(latency_p99_ms=100.0, latency_samples=400, latency_p99_low_ms=95.0)
    fast = compare_shadow(SHADOW, better, quick, stable)
    assert fast.action == "advance" and not fast.canary_only
    # The gateway reports stable's latency but not yet the shadow's: wait for it.
    unreported = compare_shadow(SHADOW, better, Operational(), stable)
    assert unreported.action == "hold" and "no gateway report" in unreported.reason
    # On a canary the same latency is a rollback.
    canary = compare(
        SHADOW,
        Arm(
            2,
            300,
            0.3,
            0.01,
            measured=True,
            latency_p99_ms=260.0,
            latency_samples=400,
            latency_p99_low_ms=250.0,
        ),
        stable,
    )
    assert canary.action == "rollback" and "p99 latency" in canary.reason


def test_the_metrics_book_keeps_paired_figures_apart_from_live_ones() -> None:
    book = MetricsBook()
    live = VersionMetrics(model_name="m", model_version=2, window_seconds=60, count=5, loss=0.9)
    assert book.record(live)
    assert book.record(_paired(300, -0.05, 0.01))
    quality = book.quality("m", 2, since=T0)
    assert quality is not None and quality.count == 5
    shadow = book.shadow("m", 2, 1, since=T0)
    assert shadow is not None and shadow.count == 300
    assert book.shadow("m", 2, 7, since=T0) is None


# -- the joiner's paired window ---------------------------------------------------------------


def _example(i: int, label: int, served: float, shadow: float) -> LabelledExample:
    at = T0 + timedelta(seconds=i)
    return LabelledExample(
        prediction_id=f"p{i}",
        entity_id="e",
        model_name="m",
        model_version=1,
        features={"a": 1.0},
        target=float(label),
        score=served,
        predicted_at=at,
        feedback_at=at,
        shadow=[ShadowScore(model_version=2, score=shadow)],
    )


def test_live_metrics_pair_a_shadows_answers_with_the_served_ones() -> None:
    live = LiveMetrics(window_seconds=3600, max_points=1000)
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, size=400)
    served = np.where(labels == 1, 0.7, 0.3)
    shadow = np.where(labels == 1, 0.4, 0.6)  # wrong side of 0.5 every time
    for i, (y, s, h) in enumerate(zip(labels, served, shadow, strict=True)):
        live.add(_example(i, int(y), float(s), float(h)))
    live.add(_example(0, int(labels[0]), 0.7, 0.4))  # a re-emitted example counts once
    out = {(m.model_version, m.shadow_of): m for m in live.drain()}
    assert set(out) == {(1, None), (2, 1)}
    paired = out[(2, 1)]
    assert paired.count == 400
    expected = np.mean(-np.log(np.where(labels == 1, 0.4, 0.4)) + np.log(0.7))
    assert paired.paired_loss_diff == pytest.approx(expected)
    assert paired.paired_accuracy_diff == pytest.approx(-1.0)
    assert paired.accuracy == pytest.approx(0.0)
    assert out[(1, None)].accuracy == pytest.approx(1.0)


# -- the gateway's mirroring ------------------------------------------------------------------


def _version(repo: Path, version: int) -> None:
    folder = repo / "m" / str(version)
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps({"feature_names": ["a"]}))


class _Backend:
    """Version v answers v/10, after ``delay`` seconds for the versions in ``slow``."""

    def __init__(self, *, broken: int | None = None, slow: float = 0.0) -> None:
        self.broken = broken
        self.slow = slow
        self.calls: list[int] = []

    async def score_rows(
        self, model_name: str, version: int, rows: Sequence[Sequence[float]]
    ) -> list[list[float]]:
        self.calls.append(version)
        if version != 1 and self.slow:
            await asyncio.sleep(self.slow)
        if version == self.broken:
            raise BackendError("shadow down", unavailable=True)
        return [[version / 10] for _ in rows]

    async def ready_versions(self, model_name: str) -> list[int]:
        return []


def _gateway(repo: Path, backend: _Backend, sink: _Sink, **kwargs: float) -> Predictor:
    for version in (1, 2, 3):
        _version(repo, version)
    routes = RouteTable()
    routes.set(Route("m", 1, None, 0.0, "rollouts", "shadow", shadows=(2, 3), shadow_share=1.0))
    return Predictor(
        catalog=ModelCatalog(repo),
        routes=routes,
        features=_NoFeatures(),
        backend=backend,
        sink=sink,
        default_model="m",
        batch_max_delay_s=0.0,
        **kwargs,  # type: ignore[arg-type]
    )


async def _logged(sink: _Sink, n: int) -> None:
    async def enough() -> bool:
        return len(sink.records) >= n

    await eventually(enough, timeout=10)


async def test_stable_answers_and_the_log_carries_each_shadows_answer(tmp_path: Path) -> None:
    backend, sink = _Backend(broken=3), _Sink()
    predictor = _gateway(tmp_path, backend, sink)
    out = await predictor.predict(PredictInput.parse(entity_id="e", context={"a": 1.0}))
    assert (out.model_version, out.score, out.arm) == (1, 0.1, "stable")
    await _logged(sink, 1)
    [record] = sink.records
    assert record.model_version == 1
    # v2 answered the mirrored request; v3 failed it and is left out.
    assert [(a.model_version, a.score) for a in record.shadow] == [(2, 0.2)]
    assert predictor.counters.for_model("m").keys() == {1}  # no answer counted for a shadow
    await predictor.close()


async def test_shadow_work_is_shed_first_and_every_prediction_is_still_logged(
    tmp_path: Path,
) -> None:
    backend, sink = _Backend(slow=0.3), _Sink()
    predictor = _gateway(tmp_path, backend, sink, shadow_max_inflight=2, shadow_timeout_s=0.05)
    answers = await asyncio.gather(
        *(
            predictor.predict(PredictInput.parse(entity_id=f"e{i}", context={"a": 1.0}))
            for i in range(6)
        )
    )
    assert {a.model_version for a in answers} == {1}
    assert predictor.shadow_inflight <= 2
    await _logged(sink, 6)
    # Two got shadow slots (and timed out: logged without answers), four were shed at once.
    assert all(r.shadow == () for r in sink.records)
    assert len({r.prediction_id for r in sink.records}) == 6
    await predictor.close()


def test_the_rollout_api_shows_shadows_and_sets_the_shadow_policy() -> None:
    from loopmesh.gen.loopmesh.v1 import rollout_pb2
    from loopmesh.rollout.core import Status
    from loopmesh.rollout.server import policy_changes, policy_message, rollout_message

    change = machine.on_published(_stable(), "m", 2, T0, SHADOW)
    assert change is not None
    shown = rollout_message(Status(change.record, SHADOW, None, 0))
    assert (shown.state, list(shown.shadow_versions), shown.shadow_share) == ("shadow", [2], 1.0)
    message = policy_message(SHADOW.merged({"max_shadows": 3, "shadow_timeout_seconds": 60.0}))
    assert (message.shadow_share, message.max_shadows, message.shadow_timeout_seconds) == (
        1.0,
        3,
        60.0,
    )
    request = rollout_pb2.SetPolicyRequest(
        model_name="m", policy=rollout_pb2.RolloutPolicy(shadow_share=0.25, max_shadows=4)
    )
    assert RolloutPolicy().merged(policy_changes(request)).shadow_share == 0.25


def test_the_trainer_challenges_the_newest_shadow_or_the_canary() -> None:
    from loopmesh.mesh.events import RolloutChanged
    from loopmesh.trainer.core import challenged_version

    def event(state: str, **fields: object) -> RolloutChanged:
        return RolloutChanged(model_name="m", stable_version=1, state=state, **fields)  # type: ignore[arg-type]

    assert challenged_version(event("shadow", shadow_versions=[3, 5], shadow_share=1.0)) == 5
    assert challenged_version(event("canary", canary_version=4, canary_weight=0.1)) == 4
    assert challenged_version(event("dropped", canary_version=4)) is None
    assert challenged_version(event("stable")) is None


def test_a_canary_guard_waits_for_the_gateways_first_report() -> None:
    """Seen in compose-test: the controller advanced before the gateway's first report of the
    canary (every 10 s), saying the guards were skipped. Reported for stable, they wait."""
    policy = RolloutPolicy(min_samples=10, max_regression=0.1)
    canary = Arm(2, 500, 0.30, 0.01, measured=True)
    stable = Arm(1, 500, 0.31, 0.01, measured=True, error_rate=0.0, requests=500)
    waiting = compare(policy, canary, stable)
    assert waiting.action == "hold" and "no gateway report for the canary yet" in waiting.reason
    nobody = compare(policy, canary, Arm(1, 500, 0.31, 0.01, measured=True))
    assert nobody.action == "advance" and "skipped: not reported" in nobody.reason
