"""Three KRaft brokers on loopback; one killed under load (issue 20).

A ``KafkaCluster`` (three combined broker+controller nodes) carries every topic with
replication factor 3 and ``min.insync.replicas=2``, declared by the services themselves
(``KafkaSettings.replication_factor`` and ``min_insync_replicas``).

1. A caller streams 100,000 events through ``python -m loopmesh.ingestion`` with the
   ``loopmesh.client`` SDK (retries on UNAVAILABLE, resending the same event ids) while
   predictions (produced as inference logs them) and their feedback (through ``python -m
   loopmesh.feedback``) flow to ``python -m loopmesh.joiner``. Mid-stream the node leading
   every partition of the events, predictions and feedback topics gets SIGKILL and is then
   restarted. Proved, each with a deadline: the caller saw nothing but retried UNAVAILABLE;
   every acknowledged event is in the events topic and counted exactly once by the features
   worker (``entity_activity:events_total`` per entity through GetOnlineFeatures); every pair
   is joined into one example (one event id per prediction id); the features and joiner
   groups' lag reaches 0; the killed node is back in every ISR.
2. Two features workers share the events partitions; one gets SIGKILL mid-stream. After the
   rebalance the survivor serves exact counts and the group's lag reaches 0.

Figures (events/s, retries, seconds to recover) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaError
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loopmesh.client import AsyncClient, BatchPolicy, ClientConfig, Feedback, RetryPolicy
from loopmesh.devstack.kafka import KafkaCluster, PartitionState
from loopmesh.gen.loopmesh.v1 import ingestion_pb2 as ipb
from loopmesh.joiner.core import example_id
from loopmesh.mesh.bus import EventProducer, declare_topics
from loopmesh.mesh.errors import SetupError
from loopmesh.mesh.events import InteractionEvent, LabelledExample, PredictionLogged
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import ENTITIES_ERASED, EVENTS_RAW, Topic
from tests.helpers import eventually, unique_topic
from tests.support.cluster import (
    ServiceProcess,
    events_totals,
    group_lag,
    group_members,
    kafka_env,
    log_tails,
    topic_overrides,
)
from tests.test_ingestion_support import event_ids, read_all
from tests.test_joiner import unique_topics

pytestmark = pytest.mark.e2e  # assembles the mesh: several services on a real cluster

PARTITIONS = 3
N_EVENTS = 100_000  # the number
ENTITIES = 100
WINDOW = 5_000  # events per IngestStream call: what a failed call resends at most
KILL_AT = 40_000  # events handed to the client when the leader is killed
# The doors' wait for Kafka's acknowledgement before they answer UNAVAILABLE (10 s by
# default): shorter than the failover, so callers do retry and resend.
ACK_TIMEOUT_S = 4.0
PAIR_CHUNK = 200  # predictions (then their feedback) per round
PAIR_PAUSE_S = 0.15
# C1 only, as in test_fault_broker_kill: a JVM starts in about half the time on a loaded
# machine, and three start here at once.
JVM_OPTIONS = ("-XX:TieredStopAtLevel=1",)
UNAVAILABLE = 14  # grpc.StatusCode.UNAVAILABLE.value[0], as the client spans record it


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[KafkaCluster]:
    kafka = KafkaCluster(tmp_path_factory.mktemp("cluster"), jvm_options=JVM_OPTIONS)
    kafka.start()
    yield kafka
    kafka.stop()
    if request.session.testsfailed:
        keep = Path(os.environ.get("LOOPMESH_TEST_LOGS", ".loopmesh/test-logs"))
        keep.mkdir(parents=True, exist_ok=True)
        for node in kafka.nodes.values():
            shutil.copy(node.log_path, keep / f"cluster-{node.node_id}.log")
        print(f"\ncluster logs kept in {keep}")


@pytest.fixture(scope="module")
def kafka(cluster: KafkaCluster) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=cluster.bootstrap_servers,
        default_partitions=PARTITIONS,
        replication_factor=3,
        min_insync_replicas=2,
    )


class Clock:
    """Seconds since the test began, per named moment."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> float:
        self.marks[name] = now = time.monotonic()
        return now

    def since(self, start: str, end: str) -> float:
        return round(self.marks[end] - self.marks[start], 1)

    def summary(self) -> dict[str, float]:
        return {k: round(v - self.t0, 1) for k, v in self.marks.items()}


@contextlib.asynccontextmanager
async def services(*processes: ServiceProcess) -> AsyncIterator[None]:
    """Start ``processes`` together; on leaving, stop those still running (clean exits)."""
    for process in processes:
        process.start()
    try:
        yield
    except BaseException:
        await asyncio.gather(*(p.stop() for p in processes), return_exceptions=True)
        raise
    codes = await asyncio.gather(*(p.stop() for p in processes), return_exceptions=True)
    bad = [c for c in codes if c not in (0, None)]
    assert not bad, f"unclean exits {codes}:\n{log_tails(processes)}"


def features_worker(
    kafka: KafkaSettings, repo: Path, app_id: str, topics: tuple[Topic, Topic], log: Path
) -> ServiceProcess:
    """``python -m loopmesh.features`` (fold and FeatureService) on ``(events, erasures)``."""
    events, erasures = topics
    env = {
        **kafka_env(kafka),
        "LOOPMESH_FEATURES__REPO_PATH": str(repo),
        "LOOPMESH_FEATURES__APP_ID": app_id,
        "LOOPMESH_FEATURES__EVENTS_TOPIC": events.name,
        "LOOPMESH_FEATURES__ERASURES_TOPIC": erasures.name,
        # Fewer, larger batches: each writes every touched entity's state to the changelog.
        "LOOPMESH_FEATURES__PUSH_BATCH_SIZE": "2000",
        "LOOPMESH_FEATURES__PUSH_BATCH_S": "0.5",
        "LOOPMESH_FEATURES__PUSH_RETRY_S": "0.5",
        # Short group timings: a rejoin takes seconds, not a minute.
        "LOOPMESH_FEATURES__STREAM__SESSION_TIMEOUT_S": "6",
        "LOOPMESH_FEATURES__STREAM__HEARTBEAT_INTERVAL_S": "1",
        "LOOPMESH_FEATURES__STREAM__REBALANCE_TIMEOUT_S": "10",
    }
    worker = ServiceProcess("features", env, log, health="loopmesh.v1.FeatureService")
    worker.env["LOOPMESH_FEATURES__SERVER__PORT"] = str(worker.port)
    return worker


def door(module: str, kafka: KafkaSettings, topic: str, log: Path) -> ServiceProcess:
    prefix = f"LOOPMESH_{module.upper()}__"
    process = ServiceProcess(module, {**kafka_env(kafka), f"{prefix}TOPIC": topic}, log)
    process.env[f"{prefix}SERVER__PORT"] = str(process.port)
    process.env[f"{prefix}SERVER__GRACE_SECONDS"] = "1"
    process.env[f"{prefix}ACK_TIMEOUT_SECONDS"] = str(ACK_TIMEOUT_S)
    return process


def client_config(ingestion: str, feedback: str) -> ClientConfig:
    return ClientConfig(
        ingestion_url=ingestion,
        feedback_url=feedback,
        # UNAVAILABLE only: a DEADLINE_EXCEEDED (or anything else) fails the test.
        retry=RetryPolicy(
            max_attempts=30,
            initial_backoff_s=0.2,
            max_backoff_s=2.0,
            total_timeout_s=180.0,
            retry_deadline_exceeded=False,
        ),
        batch=BatchPolicy(stream_window_items=WINDOW),
    )


def failed_calls(spans: InMemorySpanExporter, method: str, since_ns: int) -> list[int]:
    """Status codes of this process's client calls of ``method`` that failed, begun after
    ``since_ns`` (the exporter holds the whole session's spans; one span a call)."""
    codes = []
    for span in spans.get_finished_spans():
        if (span.start_time or 0) < since_ns:
            continue
        if span.name.endswith(f"/{method}") and span.kind.name == "CLIENT":
            code = (span.attributes or {}).get("rpc.grpc.status_code", 0)
            if code:
                codes.append(int(code))  # type: ignore[arg-type]
    return codes


async def _known_partitions(cluster: KafkaCluster, topic: str) -> dict[int, PartitionState] | None:
    """The topic's partitions, or None while the node asked does not know the topic yet."""
    try:
        return await asyncio.to_thread(cluster.partitions, topic)
    except SetupError:
        return None


async def test_leader_sigkill_under_100k_ingest_loses_nothing_and_counts_once(
    cluster: KafkaCluster,
    kafka: KafkaSettings,
    feast_repo: Path,
    tmp_path: Path,
    spans: InMemorySpanExporter,
) -> None:
    clock = Clock()
    began_ns = time.time_ns()
    run = uuid.uuid4().hex[:6]
    events, erasures = unique_topic(EVENTS_RAW), unique_topic(ENTITIES_ERASED)
    joiner_topics = unique_topics()
    predictions, feedback = joiner_topics.topic("predictions"), joiner_topics.topic("feedback")
    await declare_topics(kafka, [events, erasures, *joiner_topics.all()])

    # Declared with the kernel's settings: three replicas, two of them needed for a write.
    for topic in (events, predictions, feedback):
        overrides = await topic_overrides(kafka, topic.name)
        assert overrides["min.insync.replicas"] == "2", overrides
        # The controller has the topic once declare_topics returns; a broker's metadata may
        # learn of it a moment later (UNKNOWN_TOPIC_OR_PARTITION until then).
        partitions = await eventually(partial(_known_partitions, cluster, topic.name), timeout=30)
        assert all(len(p.replicas) == 3 for p in partitions.values())

    app_id = f"cl-features-{run}"
    joiner_app = f"cl-joiner-{run}"
    worker = features_worker(
        kafka, feast_repo, app_id, (events, erasures), tmp_path / "features.log"
    )
    ingestion = door("ingestion", kafka, events.name, tmp_path / "ingestion.log")
    feedback_door = door("feedback", kafka, feedback.name, tmp_path / "feedback.log")
    joiner = ServiceProcess(
        "joiner",
        {
            **kafka_env(kafka),
            "LOOPMESH_JOINER__APP_ID": joiner_app,
            "LOOPMESH_JOINER__DATA_DIR": str(tmp_path / "joiner"),
            "LOOPMESH_JOINER__SESSION_TIMEOUT_SECONDS": "6",
            "LOOPMESH_JOINER__HEARTBEAT_INTERVAL_SECONDS": "1",
            **{
                f"LOOPMESH_JOINER__TOPICS__{name.upper()}": value
                for name, value in joiner_topics.model_dump().items()
            },
        },
        tmp_path / "joiner.log",
    )
    joiner.env["LOOPMESH_JOINER__SERVER__PORT"] = str(joiner.port)
    processes = (ingestion, feedback_door, worker, joiner)

    entities = [f"cl-{run}-{i}" for i in range(ENTITIES)]
    sent = [
        ipb.InteractionEvent(
            event_id=uuid.uuid4().hex,
            entity_id=entities[i % ENTITIES],
            event_type="click",
            numeric={"value": float(i % 7)},
        )
        for i in range(N_EVENTS)
    ]
    want = Counter(e.entity_id for e in sent)
    producer = EventProducer(kafka, "cluster-test")
    await producer.start()
    client = AsyncClient(client_config(ingestion.address, feedback_door.address))
    victim = cluster.leaders(events.name)[0]
    state: dict[str, Any] = {"handed": 0, "window_acked": [], "killed": False}
    labels: dict[str, int] = {}  # prediction id -> the label sent
    publish_failures: list[str] = []

    def alive() -> None:
        for process in processes:
            process.check_alive()

    def stream() -> Iterator[ipb.InteractionEvent]:
        # Read lazily, a window at a time, each once the previous one was acknowledged.
        for i, event in enumerate(sent):
            if i and i % WINDOW == 0:
                state["window_acked"].append(time.monotonic())
            state["handed"] = i + 1
            yield event

    async def publish(topic: Topic, batch: Sequence[PredictionLogged]) -> None:
        # As inference logs predictions: acks=all, resent with the same ids until acknowledged.
        deadline = time.monotonic() + 120
        while True:
            try:
                await producer.publish_many(topic, batch)
                return
            except KafkaError as err:
                publish_failures.append(type(err).__name__)
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def pairs(ingesting: asyncio.Task[Any]) -> int:
        rounds_after_kill = 0
        for n in itertools.count():
            if ingesting.done() and rounds_after_kill >= 3:
                return n
            batch = [
                PredictionLogged(
                    prediction_id=f"{run}-p{n}-{j}",
                    model_name="cluster",
                    model_version=1,
                    entity_id=entities[(n * PAIR_CHUNK + j) % ENTITIES],
                    features={"x": float(j)},
                    score=0.5,
                )
                for j in range(PAIR_CHUNK)
            ]
            await publish(predictions, batch)
            answers = [Feedback(p.prediction_id, label=j % 2) for j, p in enumerate(batch)]
            result = await client.submit_many(answers)
            assert result.rejected == 0, result.refused[:3]
            assert result.accepted + result.duplicates == len(answers)
            labels.update((f.prediction_id, f.label or 0) for f in answers)
            if state["killed"]:
                rounds_after_kill += 1
            await asyncio.sleep(PAIR_PAUSE_S)
        raise AssertionError("unreachable")

    try:
        async with services(*processes):
            await asyncio.gather(*(p.wait_serving() for p in processes))
            clock.mark("serving")
            # Every consumer has joined and folded once before the load starts.
            warm = [ipb.InteractionEvent(entity_id=entities[0], event_type="warm")]
            await client.ingest(warm)
            want[entities[0]] += 1

            async def warmed() -> bool:
                alive()
                totals = await events_totals(worker.address, entities[:1])
                return totals[entities[0]] == 1

            await eventually(warmed, timeout=120, interval=0.5)
            led = [events.name, predictions.name, feedback.name]
            await asyncio.to_thread(cluster.move_leadership, led, victim)
            assert set(cluster.leaders(events.name).values()) == {victim}
            clock.mark("load")

            ingesting = asyncio.create_task(client.ingest_stream(stream()))
            pairing = asyncio.create_task(pairs(ingesting))

            async def far_enough() -> bool:
                for task in (ingesting, pairing):
                    if task.done():
                        raise AssertionError(f"ended before the kill: {task!r}")
                return bool(state["handed"] >= KILL_AT)

            await eventually(far_enough, timeout=300, interval=0.05)
            await asyncio.to_thread(cluster.kill, victim)
            state["killed"] = True
            clock.mark("killed")

            async def re_elected() -> bool:
                led = await asyncio.to_thread(cluster.leaders, events.name)
                return all(node not in (victim, -1) for node in led.values())

            await eventually(re_elected, timeout=60, interval=0.1)
            clock.mark("re-elected")
            await asyncio.to_thread(cluster.restart, victim)
            clock.mark("restarted")

            result = await asyncio.wait_for(ingesting, timeout=300)
            clock.mark("acked")
            n_rounds = await asyncio.wait_for(pairing, timeout=300)
            clock.mark("pairs acked")
            topics = [events.name, predictions.name, feedback.name]
            await eventually(
                lambda: asyncio.to_thread(cluster.in_sync, topics), timeout=120, interval=0.5
            )
            clock.mark("in sync")

            # The caller: every event acknowledged, nothing refused, only UNAVAILABLE retried.
            assert result.rejected == 0
            assert result.handled == N_EVENTS, result
            windows = -(-N_EVENTS // WINDOW)
            stream_failures = failed_calls(spans, "IngestStream", began_ns)
            feedback_failures = failed_calls(spans, "SubmitStream", began_ns)
            assert set(stream_failures + feedback_failures) <= {UNAVAILABLE}
            assert result.attempts - windows == len(stream_failures)

            # (a) Every acknowledged event is in Kafka; copies there are resends.
            records = await read_all(kafka, events.name, timeout=120)
            landed = Counter(event_ids(records))
            missing = {e.event_id for e in sent} - set(landed)
            assert not missing, f"{len(missing)} acknowledged events missing"
            assert len(landed) == N_EVENTS + 1  # and nothing else

            # ... counted exactly once by the features worker, and its group caught up.
            async def features_exact() -> bool:
                alive()
                lag = await group_lag(kafka, app_id, [events.name])
                totals = await events_totals(worker.address, entities)
                return lag[events.name] == 0 and totals == {e: float(c) for e, c in want.items()}

            try:
                await eventually(features_exact, timeout=180, interval=1.0)
            except AssertionError as err:
                totals = await events_totals(worker.address, entities)
                wrong = {e: (totals.get(e), c) for e, c in want.items() if totals.get(e) != c}
                lag = await group_lag(kafka, app_id, [events.name])
                raise AssertionError(
                    f"{err}; lag {lag}; (got, want) for {len(wrong)} entities: "
                    f"{dict(list(wrong.items())[:10])}\n{log_tails(processes)}"
                ) from None
            clock.mark("features exact")

            # (b) Every pair joined into one example, and the joiner's group caught up.
            async def joined() -> list[LabelledExample] | None:
                alive()
                lag = await group_lag(kafka, joiner_app, [predictions.name, feedback.name])
                if any(lag.values()):
                    return None
                rows = await read_all(kafka, joiner_topics.examples, timeout=120)
                got = [LabelledExample.model_validate(value) for _, value in rows]
                return got if len({e.prediction_id for e in got}) >= len(labels) else None

            try:
                examples = await eventually(joined, timeout=180, interval=2.0)
            except AssertionError as err:
                raise AssertionError(f"{err}\n{log_tails(processes)}") from None
            clock.mark("joiner exact")
            assert examples is not None
            ids_by_prediction: dict[str, set[str]] = defaultdict(set)
            for example in examples:
                ids_by_prediction[example.prediction_id].add(example.event_id)
                assert example.target == labels[example.prediction_id]
            assert set(ids_by_prediction) == set(labels)
            assert all(ids == {example_id(p)} for p, ids in ids_by_prediction.items()), (
                "an example with a second event id would be counted twice"
            )
            alive()
    finally:
        await client.close()
        await producer.stop()

    stream_s = clock.marks["acked"] - clock.marks["load"]
    retried = len(stream_failures) + len(feedback_failures)
    kill_at = clock.marks["killed"]
    resumed = min((t for t in state["window_acked"] if t > kill_at), default=clock.marks["acked"])
    print(
        f"\n{N_EVENTS} events in {stream_s:.1f}s ({N_EVENTS / stream_s:,.0f} events/s) through "
        f"the door, {len(labels)} prediction+feedback pairs in {n_rounds} rounds; node {victim} "
        f"(leader of every events, predictions and feedback partition) SIGKILLed after "
        f"{KILL_AT} events.\n"
        f"caller retries (all UNAVAILABLE): {len(stream_failures)} IngestStream + "
        f"{len(feedback_failures)} SubmitStream = {retried}; "
        f"prediction publishes retried: {len(publish_failures)} {Counter(publish_failures)}\n"
        f"seconds after the kill: new leaders {clock.since('killed', 're-elected')}, first "
        f"window acknowledged {resumed - kill_at:.1f}, killed node restarted "
        f"{clock.since('killed', 'restarted')}, back in every ISR "
        f"{clock.since('killed', 'in sync')}"
        f"\ncopies in the events topic: {sum(landed.values()) - len(landed)}; copies of examples: "
        f"{len(examples) - len(ids_by_prediction)}; seconds since start: {clock.summary()}"
    )


async def test_two_features_workers_one_sigkilled_mid_stream_count_exactly(
    cluster: KafkaCluster, kafka: KafkaSettings, feast_repo: Path, tmp_path: Path
) -> None:
    clock = Clock()
    run = uuid.uuid4().hex[:6]
    events, erasures = unique_topic(EVENTS_RAW), unique_topic(ENTITIES_ERASED)
    await declare_topics(kafka, [events, erasures])
    app_id = f"cl-two-{run}"
    first, second = (
        features_worker(kafka, feast_repo, app_id, (events, erasures), tmp_path / f"w{i}.log")
        for i in (1, 2)
    )
    entities = [f"two-{run}-{i}" for i in range(ENTITIES)]
    sent = [
        InteractionEvent(entity_id=entities[i % ENTITIES], event_type="click")
        for i in range(30_000)
    ]
    chunks = [sent[i : i + 500] for i in range(0, len(sent), 500)]
    producer = EventProducer(kafka, "cluster-two")
    await producer.start()
    try:
        async with services(first, second):
            await asyncio.gather(first.wait_serving(), second.wait_serving())

            # Started means assigned: both hold partitions before the stream begins.
            async def split() -> bool:
                return all("features started" in w.log.read_text() for w in (first, second))

            await eventually(split, timeout=120, interval=0.5)

            async def both_hold_partitions() -> list[set[int]] | None:
                held = await group_members(kafka, app_id, events.name)
                return held if len(held) == 2 and all(held) else None

            before = await eventually(both_hold_partitions, timeout=60, interval=0.5)
            clock.mark("start")
            for i, chunk in enumerate(chunks):
                await producer.publish_many(events, chunk)
                await asyncio.sleep(0.1)  # paced, so each worker is mid-fold at the kill
                if i == len(chunks) // 2:
                    second.kill()  # its partitions move to the first worker
                    clock.mark("killed")
                    killed_after = (i + 1) * len(chunk)
            clock.mark("produced")
            want = {e: float(c) for e, c in Counter(ev.entity_id for ev in sent).items()}

            async def exact() -> bool:
                first.check_alive()
                lag = await group_lag(kafka, app_id, [events.name])
                totals = await events_totals(first.address, entities)
                return lag[events.name] == 0 and totals == want

            try:
                await eventually(exact, timeout=180, interval=1.0)
            except AssertionError as err:
                totals = await events_totals(first.address, entities)
                wrong = {e: (totals.get(e), c) for e, c in want.items() if totals.get(e) != c}
                raise AssertionError(
                    f"{err}; (got, want) for {len(wrong)} entities: "
                    f"{dict(list(wrong.items())[:10])}\n{log_tails([first, second])}"
                ) from None
            clock.mark("exact")
            after = await group_members(kafka, app_id, events.name)
            assert after == [set(range(PARTITIONS))], after  # the survivor holds them all
    finally:
        await producer.stop()
    print(
        f"\n{len(sent)} events, two workers holding partitions {before}, one SIGKILLed after "
        f"{killed_after}: exact counts and lag 0 on the survivor "
        f"{clock.since('killed', 'exact')}s after the kill "
        f"({clock.since('produced', 'exact')}s after the last event); seconds: {clock.summary()}"
    )
