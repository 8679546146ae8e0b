"""The joiner's state stays bounded (issue 20): the join table on disk, unmatched feedback with
its own short wait and a cap (drops counted), erased entities never joined. Real Kafka."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from loopmesh.joiner.agents import Joiner
from loopmesh.joiner.core import JoinEntry, on_feedback, on_prediction
from loopmesh.joiner.settings import JoinerScope, JoinerTopics
from loopmesh.joiner.state import ErasureLog, UnmatchedFeedback, Waiting, created_of
from loopmesh.mesh.bus import EventProducer, declare_topics
from loopmesh.mesh.events import EntityErased, FeedbackEvent, LabelledExample, PredictionLogged
from loopmesh.mesh.settings import KafkaSettings
from tests.helpers import eventually, read_topic
from tests.test_joiner import Clock, unique_topics

TTL = 3600.0
WAIT = 60.0
DROPPED = "loopmesh.joiner.unmatched_feedback_dropped"
HANDLED = ("stored", "joined", "duplicate", "too_late", "replayed", "erased")


@pytest.fixture(scope="module")
def metric_reader() -> InMemoryMetricReader:
    """Every metric this process records from now on (the joiner's instruments are proxies
    that bind to the provider installed here)."""
    if isinstance(metrics.get_meter_provider(), MeterProvider):
        raise pytest.UsageError("a meter provider is already installed in this process")
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return reader


def counter_total(reader: InMemoryMetricReader, name: str) -> float:
    data = reader.get_metrics_data()
    total = 0.0
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    total += sum(point.value for point in metric.data.data_points)  # type: ignore[union-attr]
    return total


def scope(topics: JoinerTopics, data_dir: Path, app_id: str, **fields: Any) -> JoinerScope:
    return JoinerScope(
        app_id=app_id,
        topics=topics,
        data_dir=data_dir,
        ttl_seconds=TTL,
        unmatched_feedback_wait_seconds=WAIT,
        session_timeout_seconds=6,
        heartbeat_interval_seconds=1,
        metrics_publish_interval_seconds=3600,
        sweep_interval_seconds=3600,  # swept explicitly below
        **fields,
    )


def prediction(entity: str, at: datetime) -> PredictionLogged:
    return PredictionLogged(
        prediction_id=f"p-{uuid.uuid4().hex[:10]}",
        model_name="jb",
        model_version=1,
        entity_id=entity,
        features={"x": 1.0},
        score=0.7,
        event_time=at,
    )


def feedback(pid: str, at: datetime) -> FeedbackEvent:
    return FeedbackEvent(prediction_id=pid, label=1, event_time=at)


def handled(joiner: Joiner) -> int:
    return sum(joiner.stats[k] for k in HANDLED)


async def _true(value: bool) -> bool:
    return value


async def started(kafka: KafkaSettings, s: JoinerScope, clock: Clock) -> Joiner:
    joiner = Joiner(kafka, s, clock=clock)
    await joiner.start()
    return joiner


# ------------------------------------------------------------------------------- pure parts


def test_unmatched_index_keeps_the_newest_up_to_the_cap() -> None:
    index = UnmatchedFeedback(cap=3)
    dropped = [w for i in range(5) for w in index.add(Waiting(b"k%d" % i, float(i), i % 2))]
    assert [w.key for w in dropped] == [b"k0", b"k1"] and len(index) == 3
    index.discard(b"k3")  # joined: no longer waiting
    assert [w.key for w in index.expired(now=10.0, wait=7.5)] == [b"k2"]
    # Found on disk after a restart: merged in age order, the oldest over the cap dropped.
    over = index.merge([Waiting(b"old", -1.0, 0), Waiting(b"k4", 4.0, 0), Waiting(b"x", 9.0, 1)])
    assert [w.key for w in over] == [] and len(index) == 3
    assert [w.key for w in index.add(Waiting(b"y", 11.0, 1))] == [b"old"]
    index.forget_partitions({1})
    assert b"x" not in index and b"y" not in index and b"k4" in index


def test_short_wait_for_unmatched_feedback_is_applied_before_any_sweep() -> None:
    at = datetime(2025, 1, 1, tzinfo=UTC)
    p = prediction("e", at)
    waiting, _, _ = on_feedback(None, feedback(p.prediction_id, at), now=0.0, ttl=TTL)
    assert waiting.unmatched_feedback and created_of(waiting.encode()) == 0.0
    joined = on_prediction(waiting, p, now=WAIT - 1, ttl=TTL, feedback_wait=WAIT)
    assert joined[2] is not None
    late = on_prediction(waiting, p, now=WAIT + 1, ttl=TTL, feedback_wait=WAIT)
    assert late[2] is None and late[0].feedback is None  # a fresh wait for feedback


@pytest.mark.parametrize("on_disk", [True, False])
def test_erasure_log(tmp_path: Path, on_disk: bool) -> None:
    log = ErasureLog(tmp_path / "erased" if on_disk else None)
    assert log.record("e", 100.0) and not log.record("e", 50.0) and log.record("e", 200.0)
    assert log.covers("e", 200.0) and not log.covers("e", 200.5) and not log.covers("f", 0.0)
    log.close()
    if on_disk:  # kept across a restart; re-reading the topic changes nothing
        again = ErasureLog(tmp_path / "erased")
        assert again.erased_at("e") == 200.0 and not again.record("e", 200.0)
        again.close()


# ------------------------------------------------------------------------------ on Kafka


async def test_unmatched_feedback_is_capped_and_every_drop_counted(
    kafka_settings: KafkaSettings,
    producer: EventProducer,
    tmp_path: Path,
    metric_reader: InMemoryMetricReader,
) -> None:
    topics = unique_topics()
    await declare_topics(kafka_settings, topics.all())
    app_id = f"joiner-{uuid.uuid4().hex[:8]}"
    cap, sent = 40, 300
    s = scope(topics, tmp_path, app_id, max_unmatched_feedback=cap)
    clock = Clock()
    dropped_before = counter_total(metric_reader, DROPPED)
    t0 = datetime.now(UTC)
    joiner = await started(kafka_settings, s, clock)
    try:
        # Feedback for prediction ids that never existed (a client sending random ids).
        bogus = [feedback(f"nope-{uuid.uuid4().hex}", t0) for _ in range(sent)]
        await producer.publish_many(topics.topic("feedback"), bogus)
        await eventually(lambda: _true(joiner.stats["stored"] == sent))
        assert len(joiner.unmatched) == cap and len(joiner.table) == cap
        assert joiner.stats["unmatched_dropped"] == sent - cap
        assert counter_total(metric_reader, DROPPED) - dropped_before == sent - cap
        # Feedback outwaits its short wait long before the prediction TTL.
        clock.now += WAIT + 1
        assert await joiner.sweep() == cap
        assert len(joiner.table) == 0 and len(joiner.unmatched) == 0
        early = prediction("e1", t0)
        await producer.publish(topics.topic("feedback"), feedback(early.prediction_id, t0))
        await eventually(lambda: _true(joiner.stats["stored"] == sent + 1))
    finally:
        await joiner.stop()

    # A restart finds the waiting entry on disk and indexes it again (cap and wait apply).
    again = await started(kafka_settings, s, clock)
    try:

        async def indexed() -> bool:
            await again.sweep()  # nothing is due: it only indexes what it finds
            return early.prediction_id.encode() in again.unmatched

        await eventually(indexed)
        clock.now += WAIT + 1  # its prediction comes too late: no join, a fresh entry
        await producer.publish(topics.topic("predictions"), early)
        await eventually(lambda: _true(again.stats["stored"] == 1))
        assert again.stats["joined"] == 0 and len(again.unmatched) == 0
    finally:
        await again.stop()


async def test_default_store_is_on_disk_and_survives_a_restart(
    kafka_settings: KafkaSettings, producer: EventProducer, tmp_path: Path
) -> None:
    assert JoinerScope().store.startswith("rocksdb://")
    topics = unique_topics()
    await declare_topics(kafka_settings, topics.all())
    app_id = f"joiner-{uuid.uuid4().hex[:8]}"
    s = scope(topics, tmp_path, app_id)
    clock = Clock()
    t0 = datetime.now(UTC)
    preds = [prediction(f"e{i}", t0) for i in range(20)]
    joiner = await started(kafka_settings, s, clock)
    try:
        assert type(joiner.table.data).__module__ == "faust.stores.rocksdb"
        await producer.publish_many(topics.topic("predictions"), preds)
        await eventually(lambda: _true(joiner.stats["stored"] == len(preds)))
    finally:
        await joiner.stop()
    files = [p for p in tmp_path.rglob("CURRENT") if p.parent.name.startswith("joins-")]
    assert files, f"no RocksDB database under {tmp_path}"

    again = await started(kafka_settings, s, clock)
    try:
        store: Any = again.table.data
        await eventually(lambda: _true(len(again.table) == len(preds)))
        # Recovery started from the offsets the database on disk had reached.
        assert any(store.persisted_offset(tp) is not None for tp in _changelog_tps(again))
        await producer.publish(topics.topic("feedback"), feedback(preds[3].prediction_id, t0))
        await eventually(lambda: _true(again.stats["joined"] == 1))
        [(_, value, _)] = await read_topic(kafka_settings, topics.examples, expect=1)
        assert LabelledExample.model_validate_json(value or b"").entity_id == "e3"
    finally:
        await again.stop()


def _changelog_tps(joiner: Joiner) -> Iterator[Any]:
    name = joiner.table.changelog_topic.get_topic_name()
    return (tp for tp in joiner.app.assignor.assigned_actives() if tp.topic == name)


async def test_erased_entities_are_never_joined_again(
    kafka_settings: KafkaSettings, producer: EventProducer, tmp_path: Path
) -> None:
    topics = unique_topics()
    await declare_topics(kafka_settings, topics.all())
    erased_topic = topics.topic("erased")
    t0 = datetime.now(UTC) - timedelta(hours=1)
    erased_at = t0 + timedelta(seconds=100)
    # Erased before the joiner starts: read at start, before the first prediction.
    await producer.publish(erased_topic, EntityErased(entity_id="g", event_time=erased_at))
    app_id = f"joiner-{uuid.uuid4().hex[:8]}"
    joiner = await started(kafka_settings, scope(topics, tmp_path, app_id), Clock())
    try:
        e1, e2 = prediction("e", t0 + timedelta(seconds=10)), prediction("e", t0)
        f = prediction("f", t0 + timedelta(seconds=10))
        g_before, g_after = prediction("g", t0), prediction("g", t0 + timedelta(seconds=200))
        await producer.publish_many(topics.topic("predictions"), [e1, e2, f, g_before, g_after])
        await eventually(lambda: _true(handled(joiner) == 5))
        assert joiner.stats["erased"] == 1 and joiner.stats["stored"] == 4  # g_before skipped

        # Erased while running: stored predictions of "e" up to the erasure never join.
        await producer.publish(erased_topic, EntityErased(entity_id="e", event_time=erased_at))
        await eventually(lambda: _true(joiner.stats["erasures"] == 2))
        e_late = prediction("e", t0 + timedelta(seconds=50))  # arrives late, from before
        e_new = prediction("e", t0 + timedelta(seconds=300))  # the entity is back afterwards
        await producer.publish_many(topics.topic("predictions"), [e_late, e_new])
        later = [e1, f, g_before, g_after, e_late, e_new]
        await producer.publish_many(
            topics.topic("feedback"),
            [feedback(p.prediction_id, p.event_time + timedelta(seconds=5)) for p in later],
        )
        await eventually(lambda: _true(handled(joiner) == 5 + 2 + len(later)))
        joined = {f.prediction_id, g_after.prediction_id, e_new.prediction_id}
        assert joiner.stats["examples"] == len(joined)
        messages = await read_topic(kafka_settings, topics.examples, expect=len(joined))
        got = {LabelledExample.model_validate_json(v or b"").prediction_id for _, v, _ in messages}
        assert got == joined

        # e2 waited for feedback when "e" was erased: the sweep deletes it.
        await joiner.sweep()
        left = [JoinEntry.decode(raw) for raw in joiner.table.data.values()]
        kept = [x.prediction for x in left if x.prediction is not None]
        assert {p.prediction_id for p in kept} == joined
    finally:
        await joiner.stop()
