"""One trace story through the whole loop, on the real broker, tritonserver and Feast repo.

In this process, each on its own topics: ingestion and the features agents, the inference
gateway (its feature source is the fixed FeatureService of the gateway tests), the feedback
door, the joiner, the trainer (dataset sink, core, gRPC) and the rollout controller. One Ingest,
one Predict and its Feedback are sent by a client whose calls carry their trace context (the
OTel gRPC client interceptor), each under a root span; then one training run is triggered.

Proved from the spans (an in-memory exporter on the global provider, and the gateway's Go
data plane's, exported over OTLP to a receiver in this process): the synchronous chains
keep one trace id across the Kafka hops with parent links (Ingest -> ``events.raw`` ->
features; Predict -> ``predictions`` -> joiner; Feedback -> ``feedback`` -> joiner), and the
asynchronous causes are span links: the join links to the prediction's trace, the training
run to the examples it trained on and to its trigger, and the rollout of the version it
published continues the run's trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from loopmesh.devstack.triton import TritonServer
from loopmesh.features.agents import FeatureAgents
from loopmesh.gen.loopmesh.v1 import (
    feedback_pb2,
    feedback_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from loopmesh.inference.app import InferenceGateway
from loopmesh.joiner.app import JoinerApp
from loopmesh.mesh.bus import EventProducer, declare_topics
from loopmesh.mesh.events import FeedbackEvent, PredictionLogged
from loopmesh.mesh.settings import KafkaSettings, TelemetrySettings
from loopmesh.rollout.app import RolloutApp
from loopmesh.trainer.app import TrainerApp
from loopmesh.trainer.runs import RunRecord
from loopmesh.trainer.settings import (
    DatasetSettings,
    TrainingSettings,
    TriggerSettings,
)
from tests.helpers import eventually
from tests.support.mesh import MeshBuilder
from tests.support.otlp import ExportedSpan, Receiver, otlp_receiver
from tests.test_inference_support import (
    CALL_TIMEOUT,
    FEATURES,
    feature_server,
    load,
    publish,
)
from tests.test_ingestion_support import feedback, ingestion
from tests.test_rollout_support import quick_policy, unload_models

pytestmark = pytest.mark.e2e  # assembles the mesh: several services on real parts

BOOTSTRAP = 200
"""Labelled pairs sent straight to the trainer's topics first, so one run has data to learn."""
DEADLINE = 60.0

Spans = list[ReadableSpan]
T = TypeVar("T")


def finished(exporter: InMemorySpanExporter, trace_id: int) -> Spans:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def named(spans: Spans, name: str) -> Spans:
    return [s for s in spans if s.name == name]


async def span_named(
    exporter: InMemorySpanExporter, trace_id: int, name: str, **attributes: object
) -> ReadableSpan:
    """The first finished span of that trace with that name (and attributes), polled."""

    async def find() -> ReadableSpan | None:
        for span in named(finished(exporter, trace_id), name):
            attrs = span.attributes or {}
            if all(attrs.get(k) == v for k, v in attributes.items()):
                return span
        return None

    span = await eventually(find, timeout=DEADLINE)
    assert span is not None
    return span


def chain(
    span: ReadableSpan, spans: Spans, exported: Sequence[ExportedSpan] = ()
) -> list[tuple[str, SpanKind]]:
    """(name, kind) of ``span`` and of each parent up to the root, all within ``spans`` and
    the spans another process ``exported`` over OTLP (the data plane's)."""
    nodes = {
        s.context.span_id: (s.name, s.kind, s.parent.span_id if s.parent else None) for s in spans
    }
    nodes |= {s.span_id: (s.name, s.kind, s.parent_span_id) for s in exported}
    out = [(span.name, span.kind)]
    parent = span.parent.span_id if span.parent else None
    while parent is not None:
        node = nodes.get(parent)
        assert node is not None, f"a parent of {span.name} is missing from its trace: {out}"
        out.append((node[0], node[1]))
        parent = node[2]
    return out


def rpc_chain(method: str, root: str) -> list[tuple[str, SpanKind]]:
    """The tail of a chain from inside an RPC handler: server span, client span, test root."""
    return [(method, SpanKind.SERVER), (method, SpanKind.CLIENT), (root, SpanKind.INTERNAL)]


def links_to(span: ReadableSpan, trace_id: int) -> list[str]:
    """The ``loopmesh.link`` kinds of the span's links into that trace."""
    return [
        str((link.attributes or {}).get("loopmesh.link", ""))
        for link in span.links
        if link.context.trace_id == trace_id
    ]


def bootstrap_pairs(model: str, n: int) -> list[tuple[PredictionLogged, FeedbackEvent]]:
    """Learnable pairs (the label follows two of the features), scored by version 1."""
    rng = np.random.default_rng(7)
    start = datetime.now(UTC) - timedelta(minutes=30)
    pairs = []
    for i in range(n):
        x = rng.normal(size=len(FEATURES))
        at = start + timedelta(seconds=i)
        pid = f"boot-{uuid.uuid4().hex}"
        pairs.append(
            (
                PredictionLogged(
                    prediction_id=pid,
                    model_name=model,
                    model_version=1,
                    entity_id=f"user-{i % 20}",
                    features=dict(zip(FEATURES, map(float, x), strict=True)),
                    score=0.5,
                    event_time=at,
                ),
                FeedbackEvent(
                    prediction_id=pid,
                    label=1 if x[0] + x[1] > 0 else 0,
                    event_time=at + timedelta(seconds=5),
                ),
            )
        )
    return pairs


@contextlib.asynccontextmanager
async def traced_channel(address: str) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel that opens a CLIENT span per call and sends its traceparent."""
    interceptors = aio_client_interceptors()  # type: ignore[no-untyped-call]
    async with grpc.aio.insecure_channel(address, interceptors=interceptors) as channel:
        yield channel


async def test_one_event_prediction_and_feedback_are_traced_across_every_hop(
    spans: InMemorySpanExporter,
    kafka_settings: KafkaSettings,
    triton: TritonServer,
    model_repository: Path,
    feast_repo: Path,
    tmp_path: Path,
) -> None:
    tracer = trace.get_tracer("tests.trace_e2e")
    tag = uuid.uuid4().hex[:8]
    model = f"trace{tag}"
    build = MeshBuilder(
        kafka_settings,
        tmp_path,
        model_repository=model_repository,
        triton_url=triton.grpc_url,
        feast_repo=feast_repo,
        suffix=tag,
    )
    topics, joins, events = build.trainer_topics, build.joiner_topics, build.events
    # Version 1 answers the Predict; the trainer's run publishes version 2 for the rollout.
    publish(model_repository, model, [1], FEATURES)
    await load(triton.grpc_url, model)

    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(unload_models, triton.grpc_url, [model])
        await build.declare()
        from loopmesh.features.store import FeastGateway  # imports feast: seconds

        fsettings = build.features(push_batch_s=0.1)
        store = await asyncio.to_thread(FeastGateway.open, fsettings.features)
        stack.callback(store.close)
        agents = FeatureAgents(fsettings, store, partitions=kafka_settings.default_partitions)

        trainer = TrainerApp(
            build.trainer(
                model,
                dataset=DatasetSettings(flush_rows=100, flush_seconds=0.2, min_rows=100),
                training=TrainingSettings(max_epochs=30, patience=5),
                # Only the TriggerTraining call below starts the run.
                triggers=TriggerSettings(
                    min_new_examples=None, drift_detector=None, check_interval_seconds=0.3
                ),
            )
        )
        rollout = RolloutApp(
            build.rollout(
                default_policy=quick_policy(),
                tick_seconds=0.1,
                reconcile_seconds=1.0,
                load_timeout_seconds=180.0,
            )
        )
        intake = ingestion(kafka_settings, events.name)
        door = feedback(kafka_settings, joins.feedback)
        fixed, features_url = await stack.enter_async_context(feature_server())
        # Predict is served by the gateway's Go data plane, which exports its spans over OTLP.
        receiver, otlp = await stack.enter_async_context(otlp_receiver())
        inference = build.inference(features_url, default_model=model)
        telemetry = TelemetrySettings(otlp_endpoint=otlp)
        gateway = InferenceGateway(inference.model_copy(update={"telemetry": telemetry}))
        await declare_topics(kafka_settings, [intake.topic, door.topic])
        # The stream apps each wait for a group rebalance: start everything at once.
        joiner = JoinerApp(build.joiner())
        await asyncio.gather(
            agents.start(),
            joiner.start(),
            trainer.start(),
            rollout.start(),
            gateway.start(),
            intake.start(),
            door.start(),
        )
        parts = (agents, joiner, trainer, rollout, gateway, intake, door)
        for stop in (part.stop for part in parts):
            stack.push_async_callback(stop)
        producer = EventProducer(kafka_settings, "trace-test")
        await producer.start()
        stack.push_async_callback(producer.stop)

        async with grpc.aio.insecure_channel(gateway.address) as channel:
            await inference_pb2_grpc.InferenceServiceStub(channel).SetRoute(
                inference_pb2.SetRouteRequest(model_name=model, stable_version=1),
                timeout=CALL_TIMEOUT,
            )
        pairs = bootstrap_pairs(model, BOOTSTRAP)
        await producer.publish_many(joins.topic("predictions"), [p for p, _ in pairs])
        await producer.publish_many(joins.topic("feedback"), [f for _, f in pairs])
        sink = trainer.sink
        assert sink is not None and trainer.core is not None
        await eventually(lambda: _ready(sink.stored == BOOTSTRAP), timeout=DEADLINE)

        # -- one event in: Ingest -> events.raw -> features ---------------------------------
        async with traced_channel(intake.address) as channel:
            with tracer.start_as_current_span("test ingest") as root:
                reply = await ingestion_pb2_grpc.IngestionServiceStub(channel).Ingest(
                    ingestion_pb2.IngestRequest(
                        events=[
                            ingestion_pb2.InteractionEvent(
                                event_id=uuid.uuid4().hex,
                                entity_id="alice",
                                event_type="click",
                                numeric={"price": 3.0},
                            )
                        ]
                    ),
                    timeout=CALL_TIMEOUT,
                )
        assert reply.accepted == 1
        ingest_trace = root.get_span_context().trace_id
        folded = await span_named(spans, ingest_trace, f"{events.name} process")

        # -- one Predict -> predictions -> joiner (stored, waiting for its feedback) --------
        async with traced_channel(gateway.address) as channel:
            with tracer.start_as_current_span("test predict") as root:
                answer = await inference_pb2_grpc.InferenceServiceStub(channel).Predict(
                    inference_pb2.PredictRequest(entity_id="alice", context={"hour": 9.0}),
                    timeout=CALL_TIMEOUT,
                )
        assert (answer.model_name, answer.model_version) == (model, 1)
        predict_trace = root.get_span_context().trace_id
        waiting = await span_named(spans, predict_trace, f"{joins.predictions} process")
        # The data plane's spans (its Predict, and its publish of the record, which ends at
        # Kafka's ack) come in its exporter's next batches (every few seconds).
        served = await eventually(
            lambda: _ready(
                _exported(
                    receiver,
                    predict_trace,
                    "inference-dataplane",
                    {"Predict", f"{joins.predictions} publish"},
                )
            ),
            timeout=DEADLINE,
        )

        # -- its Feedback -> feedback -> joiner joins -> training.examples -> dataset -------
        async with traced_channel(door.address) as channel:
            with tracer.start_as_current_span("test feedback") as root:
                await feedback_pb2_grpc.FeedbackServiceStub(channel).Submit(
                    feedback_pb2.SubmitRequest(
                        feedback=feedback_pb2.Feedback(
                            event_id=uuid.uuid4().hex, prediction_id=answer.prediction_id, label=1
                        )
                    ),
                    timeout=CALL_TIMEOUT,
                )
        feedback_trace = root.get_span_context().trace_id
        joined = await span_named(spans, feedback_trace, f"{joins.feedback} process")
        await eventually(lambda: _ready(sink.stored == BOOTSTRAP + 1), timeout=DEADLINE)

        # -- a training run -> models.published -> rollout -> rollouts ----------------------
        async with traced_channel(trainer.address) as channel:
            with tracer.start_as_current_span("test trigger") as root:
                started = await trainer_pb2_grpc.TrainerServiceStub(channel).TriggerTraining(
                    trainer_pb2.TriggerTrainingRequest(reason="trace test"),
                    timeout=CALL_TIMEOUT,
                )
        trigger_trace = root.get_span_context().trace_id
        core = trainer.core
        record = await eventually(
            lambda: _ready(_finished(core.last_run(), started.run.run_id)), timeout=DEADLINE
        )
        assert record is not None and record.status == "published", record
        run = await eventually(lambda: _ready(_run_span(spans, record.run_id)), timeout=DEADLINE)
        assert run is not None
        run_trace = run.context.trace_id
        changed = await span_named(spans, run_trace, "rollout change", model=model, state="stable")

    # Ingest: client -> server -> intake -> events.raw publish -> features process, one trace.
    ingest_spans = finished(spans, ingest_trace)
    path = chain(folded, ingest_spans)
    assert path[0] == (f"{events.name} process", SpanKind.CONSUMER)
    assert path[1] == (f"{events.name} publish", SpanKind.PRODUCER)
    assert path[-3:] == rpc_chain("/loopmesh.v1.IngestionService/Ingest", "test ingest")

    # Predict: client -> the data plane's Predict -> its publish of the record (the data plane
    # produces it to predictions itself, under the Predict) -> joiner process.
    predict_spans = finished(spans, predict_trace)
    path = chain(waiting, predict_spans, served)
    assert path == [
        (f"{joins.predictions} process", SpanKind.CONSUMER),
        (f"{joins.predictions} publish", SpanKind.PRODUCER),
        ("Predict", SpanKind.SERVER),
        ("/loopmesh.v1.InferenceService/Predict", SpanKind.CLIENT),
        ("test predict", SpanKind.INTERNAL),
    ]

    # Feedback: client -> server -> feedback publish -> the join, which links to the Predict.
    feedback_spans = finished(spans, feedback_trace)
    path = chain(joined, feedback_spans)
    assert path[:2] == [
        (f"{joins.feedback} process", SpanKind.CONSUMER),
        (f"{joins.feedback} publish", SpanKind.PRODUCER),
    ]
    assert path[-3:] == rpc_chain("/loopmesh.v1.FeedbackService/Submit", "test feedback")
    assert links_to(joined, predict_trace) == ["prediction"]
    # The example the join emitted carries the feedback's trace into the dataset sink.
    [stored] = [
        s
        for s in spans.get_finished_spans()
        if s.name == f"{topics.examples} store" and links_to(s, feedback_trace)
    ]

    # The run has causes, not a parent: its trigger and the examples (the feedback's among them).
    assert run.parent is None
    assert links_to(run, feedback_trace) == ["example"]
    assert links_to(run, trigger_trace) == ["trigger"]
    assert len(run.links) <= 65
    # What the run published is handled in the run's trace, down to the rollout's change.
    run_spans = finished(spans, run_trace)
    path = chain(changed, run_spans)
    assert path == [
        ("rollout change", SpanKind.INTERNAL),
        (f"{topics.published} process", SpanKind.CONSUMER),
        (f"{topics.published} publish", SpanKind.PRODUCER),
        ("trainer run", SpanKind.INTERNAL),
    ]
    assert (changed.attributes or {}).get("state") == "stable"
    assert stored.parent is None and fixed.calls >= 1


def _finished(record: RunRecord | None, run_id: str) -> RunRecord | None:
    return record if record is not None and record.run_id == run_id else None


def _run_span(exporter: InMemorySpanExporter, run_id: str) -> ReadableSpan | None:
    for span in named(list(exporter.get_finished_spans()), "trainer run"):
        if (span.attributes or {}).get("loopmesh.run_id") == run_id:
            return span
    return None


async def _ready(value: T) -> T:
    return value


def _exported(
    receiver: Receiver, trace_id: int, service: str, names: set[str]
) -> list[ExportedSpan] | None:
    """The spans of ``service`` in the trace received so far, once they include ``names``."""
    got = [s for s in receiver.spans if s.trace_id == trace_id and s.service == service]
    return got if names <= {s.name for s in got} else None
