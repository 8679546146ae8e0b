"""Hostile messages at every topic a service consumes: dead-lettered, never fatal, never lossy.

One module-wide mesh runs in this process on the session's Kafka broker, with topics of its
own: the features agents (with the session's Feast repo), the joiner, the trainer (dataset sink,
rollouts/erasure consumers), the rollout controller (with the session's Triton) and
the inference gateway's route follower. For each consumed topic, hypothesis draws a batch of
hostile messages (``tests.support.hostile``); they are produced raw, interleaved with valid
events, and the test waits once per batch until every hostile message sits in ``<topic>.dlq``
as a DeadLetter (reason, source partition and offset, the raw bytes) from every consumer of
the topic, and every valid event's effect is visible. The services must still be running.
``rollouts`` and ``rollout.policies`` are also the rollout controller's state, re-read at
start-up: a controller started on hostile state must start, dead-letter it and restore the
rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loopmesh.devstack.triton import TritonServer
from loopmesh.features.settings import FeaturesScope
from loopmesh.inference.settings import InferenceScope
from loopmesh.joiner.settings import JoinerTopics
from loopmesh.mesh.bus import Delivery, EventConsumer, EventProducer, declare_topics
from loopmesh.mesh.events import (
    EntityErased,
    Event,
    FeedbackEvent,
    InteractionEvent,
    LabelledExample,
    ModelPublished,
    PredictionLogged,
    RolloutChanged,
    VersionMetrics,
)
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import ALL_TOPICS, EVENTS_RAW
from loopmesh.rollout.app import RolloutApp
from loopmesh.rollout.policy import PolicySet, RolloutPolicy
from loopmesh.rollout.settings import RolloutTopics
from loopmesh.trainer.settings import TopicNames
from tests.helpers import eventually
from tests.support.bad_input_mesh import (
    CONSUMERS,
    TIMEOUT,
    Mesh,
    rollout_topics,
    running_mesh,
    tag,
    valid,
)
from tests.support.hostile import (
    MAX_HUGE,
    Bad,
    DeadLetters,
    Sent,
    as_json,
    extremes,
    hostile,
    send_all,
)

# aiokafka's and faust's background tasks draw from ``random`` while examples are generated.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning"
)
HYPOTHESIS = settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def consumed_topics() -> set[str]:
    """Default names of the topics each service reads, from its settings."""
    features, trainer, rollout = FeaturesScope(), TopicNames(), RolloutTopics()
    joiner = JoinerTopics()
    return {
        features.events_topic,
        features.erasures_topic,
        joiner.predictions,
        joiner.feedback,
        trainer.examples,
        trainer.erased,
        trainer.rollouts,
        rollout.models_published,
        rollout.metrics_live,
        rollout.rollouts,
        rollout.policies,
        InferenceScope().rollouts_topic,
    }


CASES = {
    "events.raw": "test_events_raw",
    "entities.erased": "test_entities_erased",
    "predictions": "test_predictions",
    "feedback": "test_feedback",
    "training.examples": "test_training_examples",
    "metrics.live": "test_metrics_live",
    "models.published": "test_models_published",
    "rollouts": "test_rollouts",
    "rollout.policies": "test_rollout_state_replayed_at_start",
}
"""The test that throws hostile messages at each consumed topic."""


def test_every_consumed_topic_has_a_case() -> None:
    consumed = consumed_topics()
    assert {t.name for t in ALL_TOPICS} <= consumed, "a mesh topic nobody reads?"
    assert consumed == set(CONSUMERS) == set(CASES), consumed ^ set(CASES)
    assert all(callable(globals().get(name)) for name in CASES.values())


@pytest.fixture(scope="module")
async def mesh(
    kafka_settings: KafkaSettings,
    feast_repo: Path,
    triton: TritonServer,
    model_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Mesh]:
    tmp = tmp_path_factory.mktemp("bad-input")
    async with running_mesh(
        kafka_settings, feast_repo, triton.grpc_url, model_repository, tmp
    ) as m:
        yield m


@dataclass(frozen=True)
class Case:
    """Hostile batches for one topic: drawn ones, and one pinned batch of every extreme."""

    batch: Any
    pinned: list[Bad]


def case(model: type[Event], example: Event, *, compacted: bool) -> Case:
    base = as_json(example)
    return Case(
        st.lists(hostile(model, base, compacted=compacted), min_size=1, max_size=8),
        extremes(model, base, compacted=compacted),
    )


NOW = datetime.now(UTC)
INTERACTION = InteractionEvent(entity_id="e", event_type="view", numeric={"v": 1.0})
PREDICTION = PredictionLogged(
    prediction_id="p",
    model_name="m",
    model_version=1,
    entity_id="e",
    features={"x": 1.0},
    score=0.5,
)
FEEDBACK = FeedbackEvent(prediction_id="p", label=1)
EXAMPLE = LabelledExample(
    prediction_id="p",
    entity_id="e",
    model_name="m",
    model_version=1,
    features={"x": 1.0},
    target=1.0,
    score=0.5,
    predicted_at=NOW,
    feedback_at=NOW,
)
METRICS = VersionMetrics(model_name="m", model_version=1, window_seconds=60, count=5, log_loss=0.5)
PUBLISHED = ModelPublished(model_name="m", model_version=1, sha256="0" * 64, feature_names=["x"])
ROLLOUT = RolloutChanged(model_name="m", stable_version=1, state="stable")
ERASED = EntityErased(entity_id="e")
POLICY = PolicySet(model_name="m", policy=RolloutPolicy(min_samples=7))
INTERACTION_CASE = case(InteractionEvent, INTERACTION, compacted=False)
ERASED_CASE = case(EntityErased, ERASED, compacted=True)
PREDICTION_CASE = case(PredictionLogged, PREDICTION, compacted=False)
FEEDBACK_CASE = case(FeedbackEvent, FEEDBACK, compacted=False)
EXAMPLE_CASE = case(LabelledExample, EXAMPLE, compacted=False)
METRICS_CASE = case(VersionMetrics, METRICS, compacted=False)
PUBLISHED_CASE = case(ModelPublished, PUBLISHED, compacted=False)
ROLLOUT_CASE = case(RolloutChanged, ROLLOUT, compacted=True)
POLICY_CASE = case(PolicySet, POLICY, compacted=True)


# ------------------------------------------------------------------------------ features


@HYPOTHESIS
@example(bad=INTERACTION_CASE.pinned)
@given(bad=INTERACTION_CASE.batch)
async def test_events_raw(mesh: Mesh, bad: list[Bad]) -> None:
    entities = [f"ent-{tag()}" for _ in range(2)]
    events = [
        (InteractionEvent(entity_id=e, event_type="view", numeric={"v": 2.0}), e) for e in entities
    ]

    async def effect() -> bool:
        return all([await mesh.store.exists(e) for e in entities])

    await mesh.round("events.raw", bad, events, effect)


@HYPOTHESIS
@example(bad=ERASED_CASE.pinned)
@given(bad=ERASED_CASE.batch)
async def test_entities_erased(mesh: Mesh, bad: list[Bad]) -> None:
    entity = f"ent-{tag()}"
    await send_all(
        mesh.producer,
        mesh.topic("events.raw"),
        [
            (
                InteractionEvent(entity_id=entity, event_type="view").model_dump_json().encode(),
                entity.encode(),
                (),
            )
        ],
    )
    await eventually(lambda: mesh.store.exists(entity), timeout=TIMEOUT)
    core = mesh.trainer.core
    assert core is not None

    async def effect() -> bool:
        return entity in core.dataset.erased() and not await mesh.store.exists(entity)

    await mesh.round("entities.erased", bad, [(EntityErased(entity_id=entity), entity)], effect)


# ------------------------------------------------------------------------------- trainer


def _pair(mesh: Mesh) -> tuple[PredictionLogged, FeedbackEvent]:
    at = datetime.now(UTC) - timedelta(minutes=1)
    p = PredictionLogged(
        prediction_id=f"pred-{tag()}",
        model_name=mesh.model,
        model_version=1,
        entity_id=f"ent-{tag()}",
        features={"x": 1.0},
        score=0.7,
        event_time=at,
    )
    return p, FeedbackEvent(prediction_id=p.prediction_id, label=1, event_time=at)


async def _stored(mesh: Mesh, entity: str) -> bool:
    core = mesh.trainer.core
    assert core is not None
    return entity in set(core.dataset.load(mesh.model).entity_ids.tolist())


@HYPOTHESIS
@example(bad=PREDICTION_CASE.pinned)
@given(bad=PREDICTION_CASE.batch)
async def test_predictions(mesh: Mesh, bad: list[Bad]) -> None:
    p, f = _pair(mesh)
    fb = f.model_dump_json(by_alias=True).encode()
    await send_all(mesh.producer, mesh.topic("feedback"), [(fb, p.prediction_id.encode(), ())])
    await mesh.round("predictions", bad, [(p, p.prediction_id)], lambda: _stored(mesh, p.entity_id))


@HYPOTHESIS
@example(bad=FEEDBACK_CASE.pinned)
@given(bad=FEEDBACK_CASE.batch)
async def test_feedback(mesh: Mesh, bad: list[Bad]) -> None:
    p, f = _pair(mesh)
    pred = p.model_dump_json(by_alias=True).encode()
    await send_all(mesh.producer, mesh.topic("predictions"), [(pred, p.prediction_id.encode(), ())])
    await mesh.round("feedback", bad, [(f, p.prediction_id)], lambda: _stored(mesh, p.entity_id))


@HYPOTHESIS
@example(bad=EXAMPLE_CASE.pinned)
@given(bad=EXAMPLE_CASE.batch)
async def test_training_examples(mesh: Mesh, bad: list[Bad]) -> None:
    now = datetime.now(UTC)
    example = EXAMPLE.model_copy(
        update={
            "event_id": tag(),
            "prediction_id": f"pred-{tag()}",  # the dataset keeps one example per prediction
            "entity_id": f"ent-{tag()}",
            "model_name": mesh.model,
            "predicted_at": now,
            "feedback_at": now,
        }
    )
    await mesh.round(
        "training.examples",
        bad,
        [(example, example.entity_id)],
        lambda: _stored(mesh, example.entity_id),
    )


# ------------------------------------------------------------------ rollout and inference


@HYPOTHESIS
@example(bad=METRICS_CASE.pinned)
@given(bad=METRICS_CASE.batch)
async def test_metrics_live(mesh: Mesh, bad: list[Bad]) -> None:
    model = f"m{tag()}"
    metrics = VersionMetrics(
        model_name=model, model_version=2, window_seconds=60, count=9, log_loss=0.4
    )
    controller = mesh.rollout.controller
    assert controller is not None

    async def effect() -> bool:
        seen = controller.book.quality(model, 2, since=NOW - timedelta(days=1))
        return seen is not None and seen.event_id == metrics.event_id

    await mesh.round("metrics.live", bad, [(metrics, model)], effect)


@HYPOTHESIS
@example(bad=PUBLISHED_CASE.pinned)
@given(bad=PUBLISHED_CASE.batch)
async def test_models_published(mesh: Mesh, bad: list[Bad]) -> None:
    model = f"m{tag()}"
    published = ModelPublished(
        model_name=model, model_version=1, sha256="0" * 64, feature_names=["x"]
    )
    controller = mesh.rollout.controller
    assert controller is not None

    async def effect() -> bool:
        return model in controller.records

    await mesh.round("models.published", bad, [(published, model)], effect)


@HYPOTHESIS
@example(bad=ROLLOUT_CASE.pinned)
@given(bad=ROLLOUT_CASE.batch)
async def test_rollouts(mesh: Mesh, bad: list[Bad]) -> None:
    model = f"m{tag()}"
    change = RolloutChanged(model_name=model, stable_version=3, state="stable")

    async def effect() -> bool:
        route = mesh.gateway.routes.get(model)
        return route is not None and route.stable_version == 3

    await mesh.round("rollouts", bad, [(change, model)], effect)
    await _trainer_committed(mesh, "rollouts", "rollouts")


async def _trainer_committed(mesh: Mesh, which: str, base: str) -> None:
    """The trainer's consumer of ``base`` handled a valid event produced after the batch."""
    marker = {"rollouts": RolloutChanged(model_name="z", state="stable")}[which]
    [sent] = await send_all(
        mesh.producer,
        mesh.topic(base),
        [(marker.model_dump_json(by_alias=True).encode(), b"z", ())],
    )
    group = f"trainer-{mesh.model}-{which}"
    await eventually(lambda: mesh.committed_past(group, sent), timeout=TIMEOUT, interval=0.3)


@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@example(bad_rollouts=ROLLOUT_CASE.pinned, bad_policies=POLICY_CASE.pinned)
@given(
    bad_rollouts=ROLLOUT_CASE.batch,
    bad_policies=POLICY_CASE.batch,
)
async def test_rollout_state_replayed_at_start(
    mesh: Mesh, bad_rollouts: list[Bad], bad_policies: list[Bad]
) -> None:
    """A controller whose own state topics hold hostile messages starts and restores the rest."""
    suffix = tag()
    settings_ = mesh.rollout.settings.model_copy(deep=True)
    settings_.rollout.topics = rollout_topics(suffix)
    settings_.rollout.consumer_group = f"rollout-replay-{suffix}"
    topics = settings_.rollout.topics
    await declare_topics(mesh.kafka, list(topics.table()))
    replay = DeadLetters(mesh.kafka.bootstrap_servers, [topics.rollouts, topics.policies])
    await replay.start()
    model = f"m{tag()}"
    change = RolloutChanged(model_name=model, stable_version=4, state="stable")
    policy = PolicySet(model_name=model, policy=RolloutPolicy(min_samples=7))
    sent: dict[str, list[Sent]] = {}
    for topic, bad, event in (
        (topics.rollouts, bad_rollouts, change),
        (topics.policies, bad_policies, policy),
    ):
        messages = [(b.value, b.key, b.headers) for b in bad]
        messages.append((event.model_dump_json(by_alias=True).encode(), model.encode(), ()))
        sent[topic] = (await send_all(mesh.producer, topic, messages))[:-1]
    app = RolloutApp(settings_)
    try:
        await app.start()
        controller = app.controller
        assert controller is not None
        assert controller.records[model].stable_version == 4
        assert controller.policies.get(model).min_samples == 7

        async def all_dead_lettered() -> bool:
            return all(replay.groups_for(t, s) for t, ss in sent.items() for s in ss)

        await eventually(all_dead_lettered, timeout=TIMEOUT)
        assert not app.crashed.is_set()
    finally:
        await app.stop()
        await replay.stop()


# ------------------------------------------------------------------------ edges of valid


FAR, OLD = datetime.max.replace(tzinfo=UTC), datetime(1, 1, 2, tzinfo=UTC)


async def test_extreme_but_valid_events_do_not_stall_features(mesh: Mesh) -> None:
    """Events at the schema's edges are folded, or refused to the DLQ: never fatal."""
    far = InteractionEvent(entity_id=f"far-{tag()}", event_type="v", event_time=FAR)
    old = InteractionEvent(entity_id=f"old-{tag()}", event_type="v", event_time=OLD)
    odd = [
        InteractionEvent(entity_id=f"nul\x00{tag()}", event_type="v", numeric={"v": 1.7e308}),
        InteractionEvent(entity_id="\u2603" * 200 + tag(), event_type="v", categorical={"c": "-"}),
    ]
    entity = f"ent-{tag()}"
    after = InteractionEvent(entity_id=entity, event_type="view", numeric={"v": 3.0})
    topic = mesh.topic("events.raw")
    sent = await send_all(
        mesh.producer, topic, [valid(e, e.entity_id) for e in [far, old, *odd, after]]
    )
    await eventually(lambda: mesh.store.exists(entity), timeout=TIMEOUT)
    for e in odd:
        assert await mesh.store.exists(e.entity_id), e.entity_id
    await eventually(lambda: _ready(all(mesh.letters.groups_for(topic, s) for s in sent[:2])))
    mesh.assert_running()


async def test_extreme_but_valid_times_do_not_stall_the_trainer(mesh: Mesh) -> None:
    """Examples and predictions from the far past or future neither stall nor kill it."""
    now = datetime.now(UTC)
    examples = [
        EXAMPLE.model_copy(
            update={
                "event_id": tag(),
                "prediction_id": f"pred-{tag()}",
                "entity_id": f"ent-{tag()}",
                "model_name": mesh.model,
                "predicted_at": at,
                "feedback_at": at,
            }
        )
        for at in (FAR, OLD, now)
    ]
    p, f = _pair(mesh)
    p = p.model_copy(update={"event_time": FAR})
    f = f.model_copy(update={"event_time": FAR})
    await send_all(mesh.producer, mesh.topic("predictions"), [valid(p, p.prediction_id)])
    await send_all(mesh.producer, mesh.topic("feedback"), [valid(f, f.prediction_id)])
    await send_all(
        mesh.producer, mesh.topic("training.examples"), [valid(e, e.entity_id) for e in examples]
    )
    await eventually(lambda: _stored(mesh, examples[-1].entity_id), timeout=TIMEOUT)
    later, later_f = _pair(mesh)
    await send_all(mesh.producer, mesh.topic("predictions"), [valid(later, later.prediction_id)])
    await send_all(mesh.producer, mesh.topic("feedback"), [valid(later_f, later.prediction_id)])
    await eventually(lambda: _stored(mesh, later.entity_id), timeout=TIMEOUT)
    mesh.assert_running()


async def _ready(value: bool) -> bool:
    return value


async def test_a_dlq_topic_without_room_gets_the_letter_without_the_bytes(
    kafka_settings: KafkaSettings,
) -> None:
    """A DLQ topic created with the broker's default size limit (before DLQ_MAX_BYTES, or by
    hand) cannot take a letter of a huge message: the letter goes without its bytes, naming
    the source offset, and the consumer moves on instead of retrying forever."""
    topic = replace(EVENTS_RAW, name=f"events.raw.{tag()}")
    await declare_topics(kafka_settings, [topic], with_dlq=False)
    await declare_topics(kafka_settings, [replace(topic, name=topic.dlq)], with_dlq=False)
    handled: list[str] = []

    async def handler(event: InteractionEvent, _: Delivery) -> None:
        handled.append(event.entity_id)

    dlq = EventProducer(kafka_settings, "test")
    consumer = EventConsumer(kafka_settings, topic, f"g-{tag()}", handler, dlq=dlq, service="t")
    letters = DeadLetters(kafka_settings.bootstrap_servers, [topic.name])
    huge = json.dumps({**as_json(INTERACTION), "event_id": "x" * MAX_HUGE}).encode()
    after = InteractionEvent(entity_id="after", event_type="view")
    async with contextlib.AsyncExitStack() as stack:
        for part in (dlq, letters, consumer):
            await part.start()
            stack.push_async_callback(part.stop)
        task = asyncio.create_task(consumer.run())
        stack.callback(task.cancel)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers)
        await producer.start()
        stack.push_async_callback(producer.stop)
        sent = await send_all(producer, topic.name, [(huge, b"k", ()), valid(after, "k")])
        await eventually(lambda: _ready(handled == ["after"] and bool(letters.letters)))
    [letter] = letters.letters
    assert (letter.partition, letter.offset, letter.value) == (
        sent[0].partition,
        sent[0].offset,
        None,
    )
    assert "left out" in letter.reason and "event_id" in letter.reason
