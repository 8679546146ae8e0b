"""The faust joiner on the real broker: join counts, late and duplicate feedback, dead letters,
live metrics, recovery of the join table from its changelog, and TTL sweeping."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from loopmesh.joiner.agents import Joiner
from loopmesh.joiner.settings import JoinerScope, JoinerTopics
from loopmesh.mesh.bus import EventProducer, declare_topics
from loopmesh.mesh.events import (
    DeadLetter,
    FeedbackEvent,
    LabelledExample,
    PredictionLogged,
    VersionMetrics,
)
from loopmesh.mesh.settings import KafkaSettings
from tests.helpers import eventually, read_topic

TTL = 600.0


def unique_topics() -> JoinerTopics:
    suffix = uuid.uuid4().hex[:8]
    return JoinerTopics(
        **{name: f"{default}.{suffix}" for name, default in JoinerTopics().model_dump().items()}
    )


def joiner_scope(app_id: str, topics: JoinerTopics, data_dir: Path) -> JoinerScope:
    return JoinerScope(
        app_id=app_id,
        topics=topics,
        data_dir=data_dir,
        ttl_seconds=TTL,
        session_timeout_seconds=6,
        heartbeat_interval_seconds=1,
        metrics_publish_interval_seconds=0.2,
        metrics_window_seconds=3600,
        sweep_interval_seconds=3600,  # swept explicitly below
    )


class Clock:
    """Wall time the joiner sees; the test moves it past the TTL instead of waiting."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def prediction(i: int, at: datetime) -> PredictionLogged:
    return PredictionLogged(
        prediction_id=f"p{i}-{uuid.uuid4().hex[:6]}",
        model_name="jm",
        model_version=7,
        entity_id=f"e{i}",
        features={"x": float(i)},
        score=0.9 if i % 2 else 0.1,
        event_time=at,
    )


def fb(p: PredictionLogged, *, label: int | None = None, delay: float = 5.0) -> FeedbackEvent:
    return FeedbackEvent(
        prediction_id=p.prediction_id,
        label=(int(p.features["x"]) % 2) if label is None else label,  # type: ignore[arg-type]
        event_time=p.event_time + timedelta(seconds=delay),
    )


async def test_join_counts_late_and_duplicate_feedback_once(
    kafka_settings: KafkaSettings, producer: EventProducer, tmp_path: Path
) -> None:
    topics = unique_topics()
    await declare_topics(kafka_settings, topics.all())
    clock = Clock()
    app_id = f"joiner-{uuid.uuid4().hex[:8]}"
    joiner = Joiner(kafka_settings, joiner_scope(app_id, topics, tmp_path), clock=clock)
    await joiner.start()
    t0 = datetime.now(UTC)
    preds = [prediction(i, t0 + timedelta(seconds=i)) for i in range(40)]
    normal, early, late, too_late, dup, _unanswered = (
        preds[0:10],
        preds[10:20],
        preds[20:25],
        preds[25:30],
        preds[30:35],
        preds[35:40],
    )
    orphans = [fb(prediction(100 + i, t0)) for i in range(5)]
    try:
        # Feedback that arrives before its prediction waits in the table.
        await producer.publish_many(topics.topic("feedback"), [fb(p) for p in early] + orphans)
        await eventually(lambda: _ready(joiner.stats["stored"] == 15))
        await producer.publish_many(topics.topic("predictions"), preds)
        first_dups = [fb(p) for p in dup]
        feedback = (
            [fb(p) for p in normal]
            + [fb(p, delay=TTL * 0.5) for p in late]  # late, within the TTL
            + [fb(p, delay=TTL * 2) for p in too_late]  # beyond the TTL: never joined
            + first_dups
            + first_dups  # the same events redelivered
            + [fb(p, label=1 - fb(p).label) for p in dup]  # a second, conflicting feedback
        )
        await producer.publish_many(topics.topic("feedback"), feedback)
        raw = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers)
        await raw.start()
        try:
            await raw.send_and_wait(topics.feedback, b'{"prediction_id": ""}', key=b"bad")
        finally:
            await raw.stop()
        handled = ("stored", "joined", "duplicate", "too_late", "dead_lettered")
        total = 15 + 40 + len(feedback) + 1
        try:
            await eventually(lambda: _ready(sum(joiner.stats[k] for k in handled) == total))
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; joiner stats {dict(joiner.stats)}, want {total}"
            ) from None

        joined_ids = {p.prediction_id for p in normal + early + late + dup}
        assert joiner.stats["examples"] == len(joined_ids) == 30
        assert joiner.stats["duplicate"] == 10 and joiner.stats["too_late"] == 5
        messages = await read_topic(kafka_settings, topics.examples, expect=30)
        got = [LabelledExample.model_validate_json(v or b"") for _, v, _ in messages]
        assert len(got) == 30 and {e.prediction_id for e in got} == joined_ids
        by_id = {e.prediction_id: e for e in got}
        for p in dup:  # the first feedback's label counts
            assert by_id[p.prediction_id].target == int(p.features["x"]) % 2
        for p in late:
            assert by_id[p.prediction_id].feedback_at - p.event_time == timedelta(seconds=TTL / 2)
        assert all(k == e.entity_id.encode() for (k, _, _), e in zip(messages, got, strict=True))

        [letter] = [
            DeadLetter.model_validate_json(v or b"")
            for _, v, _ in await read_topic(kafka_settings, f"{topics.feedback}.dlq", expect=1)
        ]
        assert letter.topic == topics.feedback and "prediction_id" in letter.reason

        async def window() -> VersionMetrics | None:
            seen = [
                VersionMetrics.model_validate_json(v or b"")
                for _, v, _ in await read_topic(kafka_settings, topics.metrics, expect=1)
            ]
            full = [m for m in seen if m.model_version == 7 and m.count == 30]
            return full[-1] if full else None

        metrics = await eventually(window)
        labels = [e.target for e in got]
        assert metrics.label_rate == pytest.approx(sum(labels) / 30)
        assert metrics.auc is not None and metrics.log_loss is not None
    finally:
        await joiner.stop()

    # A new worker of the same app recovers the table: old duplicates are still recognised.
    again = Joiner(kafka_settings, joiner_scope(app_id, topics, tmp_path), clock=clock)
    await again.start()
    try:
        assert len(again.table) == 45  # 40 predictions + 5 orphan feedbacks
        await producer.publish_many(topics.topic("feedback"), [fb(p, label=0) for p in normal[:3]])
        await eventually(lambda: _ready(again.stats["duplicate"] == 3))
        assert again.stats["examples"] == 0
        # Past the TTL (wall clock) the sweeper deletes everything and writes tombstones.
        clock.now += TTL + 1
        assert await again.sweep() == 45
        assert len(again.table) == 0
        await producer.publish(topics.topic("feedback"), fb(normal[0]))
        await eventually(lambda: _ready(again.stats["stored"] == 1))  # a fresh wait, no join
    finally:
        await again.stop()
    third = Joiner(kafka_settings, joiner_scope(app_id, topics, tmp_path), clock=clock)
    await third.start()
    try:
        assert len(third.table) == 1  # tombstones replayed: only the newest entry is back
    finally:
        await third.stop()


async def _ready(value: bool) -> bool:
    return value
