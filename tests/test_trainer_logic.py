"""Pure logic of the trainer: metrics, pairing, live windows, triggers, gate, preparation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from loopmesh.devstack.synthetic import SyntheticConfig, SyntheticWorld
from loopmesh.joiner.core import (
    JoinEntry,
    LabelRule,
    LabelRules,
    Outcome,
    example_id,
    on_feedback,
    on_prediction,
)
from loopmesh.joiner.live import LiveMetrics
from loopmesh.joiner.settings import JoinerSettings
from loopmesh.mesh import quality
from loopmesh.mesh.errors import InvalidArgument, UnknownModel
from loopmesh.mesh.events import FeedbackEvent, LabelledExample, PredictionLogged
from loopmesh.trainer.api import TriggerRequest, check_model, parse
from loopmesh.trainer.gate import decide
from loopmesh.trainer.prepare import Standardisation, split_by_time
from loopmesh.trainer.settings import GateSettings, TrainerSettings, TriggerSettings
from loopmesh.trainer.triggers import DriftReport, TriggerInputs, TriggerPolicy

T0 = datetime(2025, 1, 1, tzinfo=UTC)
TTL = 600.0


# -- metrics ---------------------------------------------------------------------------------


def test_auc_matches_definition_with_ties() -> None:
    assert quality.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert quality.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert quality.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # Pairs (pos, neg): (0.4>0.1)=1, (0.4 vs 0.4)=0.5, (0.9>0.1)=1, (0.9>0.4)=1 -> 3.5/4
    assert quality.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.4, 0.9]) == pytest.approx(0.875)
    assert quality.roc_auc([1, 1], [0.2, 0.3]) is None
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.random(500)
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]]
    assert quality.roc_auc(y, s) == pytest.approx(np.mean(pairs))


def test_log_loss_accuracy_and_scores() -> None:
    assert quality.log_loss([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))
    assert quality.log_loss([1], [0.0]) == pytest.approx(-np.log(quality.EPS))  # clipped
    assert quality.accuracy([1, 0, 1], [0.7, 0.2, 0.4]) == pytest.approx(2 / 3)
    s = quality.score([1, 0, 1, 0], [0.9, 0.1, 0.6, 0.4])
    assert (s.count, s.auc, s.accuracy, s.label_rate) == (4, 1.0, 1.0, 0.5)
    assert quality.score([], []).as_dict() == {"count": 0.0}
    y, p = np.array([1, 0, 1, 0]), np.array([0.9, 0.2, 0.4, 0.5])
    losses = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert quality.log_loss_variance(y, p) == pytest.approx(losses.var(ddof=1))


# -- pairing ---------------------------------------------------------------------------------


def prediction(pid: str = "p1", at: datetime = T0) -> PredictionLogged:
    return PredictionLogged(
        prediction_id=pid,
        model_name="m",
        model_version=3,
        entity_id="e1",
        features={"a": 1.0},
        score=0.7,
        event_time=at,
    )


def feedback(
    pid: str = "p1", label: int | None = 1, at: datetime = T0, **kw: float
) -> FeedbackEvent:
    return FeedbackEvent(prediction_id=pid, label=label, event_time=at, **kw)  # type: ignore[arg-type]


def test_prediction_then_feedback_joins_once() -> None:
    p, f = prediction(), feedback(at=T0 + timedelta(seconds=30))
    entry, outcome, ex = on_prediction(None, p, now=0.0, ttl=TTL)
    assert outcome is Outcome.STORED and ex is None
    entry, outcome, ex = on_feedback(entry, f, now=1.0, ttl=TTL)
    assert outcome is Outcome.JOINED and ex is not None
    assert (ex.target, ex.score, ex.model_version, ex.features) == (1, 0.7, 3, {"a": 1.0})
    assert ex.predicted_at == T0 and ex.feedback_at == f.event_time
    assert ex.event_id == example_id("p1")
    # Another feedback for the same prediction, and the same prediction again: duplicates.
    again, outcome, ex2 = on_feedback(entry, feedback(label=0), now=2.0, ttl=TTL)
    assert outcome is Outcome.DUPLICATE and ex2 is None and again == entry
    assert on_prediction(entry, prediction(), now=2.0, ttl=TTL)[1] is Outcome.DUPLICATE


def test_feedback_first_and_replay_of_the_joining_event() -> None:
    f = feedback(label=0)
    entry, outcome, _ = on_feedback(None, f, now=0.0, ttl=TTL)
    assert outcome is Outcome.STORED
    p = prediction()
    entry, outcome, ex = on_prediction(entry, p, now=1.0, ttl=TTL, offset=7)
    assert outcome is Outcome.JOINED and ex is not None and ex.target == 0
    # Redelivery of the message that completed the pair (after a crash) re-emits the example.
    _, outcome, replay = on_prediction(entry, p, now=2.0, ttl=TTL, offset=7)
    assert outcome is Outcome.REPLAYED and replay == ex
    # The same event produced twice (another offset) is a plain duplicate.
    assert on_prediction(entry, p, now=2.0, ttl=TTL, offset=8)[1] is Outcome.DUPLICATE
    # The entry survives its JSON round trip (it lives in the changelog as bytes).
    assert JoinEntry.decode(entry.encode()) == entry


def test_ttl_in_event_time_and_expiry_in_wall_time() -> None:
    entry, _, _ = on_prediction(None, prediction(), now=0.0, ttl=TTL)
    late = feedback(at=T0 + timedelta(seconds=TTL - 1))
    assert on_feedback(entry, late, now=1.0, ttl=TTL)[1] is Outcome.JOINED
    too_late = feedback(at=T0 + timedelta(seconds=TTL + 1))
    assert on_feedback(entry, too_late, now=1.0, ttl=TTL)[1] is Outcome.TOO_LATE
    # After the TTL (wall clock) the entry is gone: the feedback starts a new one.
    assert on_feedback(entry, late, now=TTL + 1, ttl=TTL)[1] is Outcome.STORED
    # Feedback waiting too long before its prediction in event time does not join either.
    waiting, _, _ = on_feedback(None, feedback(at=T0), now=0.0, ttl=TTL)
    far = prediction(at=T0 + timedelta(seconds=2 * TTL))
    assert on_prediction(waiting, far, now=1.0, ttl=TTL)[1] is Outcome.TOO_LATE


def test_reward_becomes_a_label_by_threshold() -> None:
    entry, _, _ = on_prediction(None, prediction(), now=0.0, ttl=TTL)
    _, _, ex = on_feedback(
        entry,
        feedback(label=None, reward=2.0),
        now=0,
        ttl=TTL,
        rules=LabelRules(reward_threshold=1),
    )
    assert ex is not None and ex.target == 1
    _, _, ex = on_feedback(
        entry,
        feedback(label=None, reward=0.5),
        now=0,
        ttl=TTL,
        rules=LabelRules(reward_threshold=1),
    )
    assert ex is not None and ex.target == 0


def test_each_models_label_rule_makes_its_target() -> None:
    # Issue 18: the joiner made every target a binary label.
    rules = LabelRules(
        {
            "kinds": LabelRule("multiclass", classes=3),
            "minutes": LabelRule("regression", "value"),
            "watched": LabelRule("binary", "value", threshold=5.0),
        }
    )

    def joined(model: str, **outcome: float) -> tuple[Outcome, LabelledExample | None]:
        p = prediction().model_copy(update={"model_name": model})
        entry, _, _ = on_prediction(None, p, now=0.0, ttl=TTL)
        label = outcome.pop("label", None)
        f = feedback(label=None if label is None else int(label), **outcome)
        _, outcome_, ex = on_feedback(entry, f, now=1.0, ttl=TTL, rules=rules)
        return outcome_, ex

    outcome, ex = joined("kinds", label=2)
    assert outcome is Outcome.JOINED and ex is not None
    assert (ex.task, ex.target) == ("multiclass", 2.0)
    # A class the model does not have, or no label at all: joined, but no example.
    assert joined("kinds", label=3) == (Outcome.NO_TARGET, None)
    assert joined("kinds", value=1.0) == (Outcome.NO_TARGET, None)
    outcome, ex = joined("minutes", value=12.5)
    assert ex is not None and (ex.task, ex.target) == ("regression", 12.5)
    assert joined("minutes", label=1) == (Outcome.NO_TARGET, None)
    assert joined("watched", value=6.0)[1].target == 1.0  # type: ignore[union-attr]
    assert joined("watched", value=4.0)[1].target == 0.0  # type: ignore[union-attr]
    # A model without a spec: today's binary rule (0/1 labels only).
    assert joined("other", label=1)[1].target == 1.0  # type: ignore[union-attr]
    assert joined("other", label=2) == (Outcome.NO_TARGET, None)


def test_live_windows_score_each_task_with_its_loss() -> None:
    live = LiveMetrics(window_seconds=100, max_points=1000)
    probs = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2]]
    targets = [0, 1, 1, 2]
    values = [(1.0, 1.5), (2.0, 1.0), (3.0, 3.0)]
    for i, (out, target) in enumerate(zip(probs, targets, strict=True)):
        ex = example(1, i, max(out), target).model_copy(
            update={"task": "multiclass", "outputs": out, "model_name": "kinds"}
        )
        live.add(ex)
    for i, (predicted, target_) in enumerate(values):
        live.add(
            example(1, i, predicted, 0).model_copy(
                update={"task": "regression", "target": target_, "model_name": "minutes"}
            )
        )
    by_model = {m.model_name: m for m in live.drain()}
    kinds, minutes = by_model["kinds"], by_model["minutes"]
    chosen = np.array([0.7, 0.8, 0.2, 0.2])
    assert (kinds.task, kinds.count) == ("multiclass", 4)
    assert kinds.accuracy == pytest.approx(0.5)
    assert kinds.loss == pytest.approx(float(np.mean(-np.log(chosen))))
    assert kinds.loss_var == pytest.approx(float(np.var(-np.log(chosen), ddof=1)))
    assert kinds.log_loss is None and kinds.auc is None
    errors = np.array([0.5, -1.0, 0.0])
    assert minutes.task == "regression"
    assert minutes.loss == pytest.approx(float(np.mean(errors**2)))
    assert minutes.loss_var == pytest.approx(float(np.var(errors**2, ddof=1)))
    assert minutes.mae == pytest.approx(0.5)


# -- live windows ----------------------------------------------------------------------------


def example(version: int, at: float, score: float, label: int) -> LabelledExample:
    t = T0 + timedelta(seconds=at)
    return LabelledExample(
        prediction_id=f"p{version}-{at}",
        entity_id="e",
        model_name="m",
        model_version=version,
        features={},
        target=label,
        score=score,
        predicted_at=t,
        feedback_at=t,
    )


def test_live_window_slides_in_event_time_and_drains_idle_versions() -> None:
    live = LiveMetrics(window_seconds=100, max_points=1000)
    for i in range(10):
        live.add(example(1, i, 0.9 if i % 2 else 0.1, i % 2))
    live.add(example(1, 9, 0.9, 1))  # the same example re-emitted counts once
    [m1] = live.drain()
    assert (m1.model_version, m1.count, m1.auc, m1.accuracy, m1.label_rate) == (
        1,
        10,
        1.0,
        1.0,
        0.5,
    )
    assert m1.log_loss_var == pytest.approx(0.0, abs=1e-12)  # every loss is -log(0.9)
    assert live.drain() == []  # nothing moved
    # Version 2 takes over; 150 s later version 1's examples are out of the window.
    live.add(example(2, 150, 0.8, 1))
    by_version = {m.model_version: m for m in live.drain()}
    assert by_version[1].count == 0 and by_version[1].auc is None
    assert by_version[2].count == 1
    live.add(example(2, 151, 0.2, 0))
    assert [m.model_version for m in live.drain()] == [2]  # version 1 reported once, forgotten


# -- triggers, drift, gate -------------------------------------------------------------------


def inputs(**kw: object) -> TriggerInputs:
    base: dict[str, object] = dict(
        new_examples=0,
        total_examples=1000,
        drift=None,
        newest_version_age=10.0,
        since_last_run=None,
    )
    base.update(kw)
    return TriggerInputs(**base)  # type: ignore[arg-type]


def test_trigger_policy_any_all_cooldown_and_minimum() -> None:
    s = TriggerSettings(
        min_new_examples=100, drift_detector="adwin", max_age_seconds=60, cooldown_seconds=5
    )
    drifted = DriftReport(
        detector="adwin",
        model_version=1,
        change_at=T0,
        detected_at=T0 + timedelta(seconds=30),
        delay_examples=64,
        delay_seconds=30.0,
        examples_seen=500,
        loss_before=0.3,
        loss_after=0.6,
    )
    policy = TriggerPolicy(s, min_rows=50)
    assert policy.due(inputs()) == []
    assert policy.due(inputs(new_examples=100)) == ["100 new examples >= 100"]
    assert policy.due(inputs(drift=drifted)) == [drifted.reason()]
    assert "adwin" in drifted.reason() and "64 examples / 30.0s" in drifted.reason()
    assert policy.due(inputs(new_examples=100, since_last_run=1.0)) == []  # cooldown
    assert policy.due(inputs(new_examples=100, total_examples=10)) == []  # too little data
    # Age fires only with something new to learn from.
    assert policy.due(inputs(newest_version_age=61.0)) == []
    assert len(policy.due(inputs(newest_version_age=61.0, new_examples=1))) == 1
    every = TriggerPolicy(s.model_copy(update={"mode": "all"}), min_rows=50)
    assert every.due(inputs(new_examples=100, drift=drifted)) == []
    assert len(every.due(inputs(new_examples=100, drift=drifted, newest_version_age=61.0))) == 3
    none = TriggerPolicy(TriggerSettings(min_new_examples=None, drift_detector=None), 50)
    assert none.due(inputs(new_examples=10**6, drift=drifted)) == []


def test_gate_needs_both_margins() -> None:
    gate = GateSettings(min_log_loss_improvement=0.01, min_auc_improvement=0.0)
    ref = quality.Scores(100, 0.50, 0.80, 0.7, 0.5)
    ok = decide(quality.Scores(100, 0.45, 0.82, 0.7, 0.5), ref, "stable", gate)
    assert ok.accepted and "beats stable" in ok.reason
    small = decide(quality.Scores(100, 0.495, 0.85, 0.7, 0.5), ref, "stable", gate)
    assert not small.accepted and "log_loss" in small.reason
    worse_auc = decide(quality.Scores(100, 0.40, 0.80, 0.7, 0.5), ref, "stable", gate)
    assert not worse_auc.accepted and "auc" in worse_auc.reason
    one_class = decide(quality.Scores(100, 0.1, None, 1.0, 1.0), ref, "baseline", gate)
    assert not one_class.accepted


# -- preparation -----------------------------------------------------------------------------


def test_standardisation_clips_imputes_and_round_trips() -> None:
    rng = np.random.default_rng(1)
    x = np.column_stack([rng.normal(10, 2, 1000), np.full(1000, 3.0), rng.normal(0, 1, 1000)])
    x[0, 0] = 1e6  # outlier
    x[1, 2] = np.nan  # missing
    st = Standardisation.fit(x, ["a", "b", "c"], clip_quantile=0.01)
    assert st.high[0] < 100 and st.std[1] == 1.0  # clipped; constant column keeps scale 1
    z = st.transform(x)
    assert np.isfinite(z).all() and abs(z[0, 0]) < 5 and z[1, 2] == 0.0
    assert np.allclose(z[:, 0].mean(), 0, atol=0.05)
    again = Standardisation.from_metadata(st.to_metadata())
    assert again.feature_names == ("a", "b", "c") and np.array_equal(again.mean, st.mean)


def test_time_split_holds_out_the_newest_rows() -> None:
    train, holdout = split_by_time(10, 0.2)
    assert train.tolist() == list(range(8)) and holdout.tolist() == [8, 9]
    with pytest.raises(ValueError):
        split_by_time(1, 0.5)


# -- synthetic world, settings, requests -----------------------------------------------------


def test_synthetic_world_is_seeded_and_drift_changes_the_rule() -> None:
    a, b = SyntheticWorld(SyntheticConfig(seed=4)), SyntheticWorld(SyntheticConfig(seed=4))
    ba, bb = a.sample(200), b.sample(200)
    assert ba.entity_ids == bb.entity_ids and np.array_equal(ba.features, bb.features)
    y = a.draw_labels(ba)
    assert quality.roc_auc(y, ba.p_true) > 0.8  # the truth is learnable
    assert quality.roc_auc(y, a.probability(ba.features, rule=1)) < 0.4  # the other rule is not
    a.set_rule(1)
    assert a.sample(5).rule == 1
    with pytest.raises(ValueError):
        a.set_rule(7)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPMESH_TRAINER__TRIGGERS__MIN_NEW_EXAMPLES", "42")
    monkeypatch.setenv("LOOPMESH_TRAINER__TRAINING__HIDDEN", "[8]")
    monkeypatch.setenv("LOOPMESH_TRAINER__TOPICS__ROLLOUTS", "ro.x")
    monkeypatch.setenv("LOOPMESH_JOINER__TOPICS__FEEDBACK", "fb.x")
    s = TrainerSettings()
    assert s.trainer.triggers.min_new_examples == 42 and s.trainer.training.hidden == [8]
    assert s.trainer.server.port == 50055
    assert s.trainer.topics.topic("rollouts").name == "ro.x"
    assert s.trainer.topics.topic("rollouts").key_field == "model_name"
    joining = JoinerSettings()
    assert joining.joiner.server.port == 50057
    assert joining.joiner.topics.topic("feedback").name == "fb.x"
    assert joining.joiner.topics.topic("feedback").key_field == "prediction_id"
    monkeypatch.setenv("LOOPMESH_TRAINER__MODEL_NAME", "../evil")
    with pytest.raises(ValueError):
        TrainerSettings()


def test_requests_name_the_field_at_fault() -> None:
    with pytest.raises(InvalidArgument, match=r"^reason: "):
        parse(TriggerRequest, reason="x" * 300)
    with pytest.raises(InvalidArgument, match=r"^model_name: "):
        check_model("../x", "ctr")
    with pytest.raises(UnknownModel, match=r"^model_name: "):
        check_model("other", "ctr")
    assert check_model("", "ctr") == "ctr"
