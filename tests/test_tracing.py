"""Trace context crosses a Kafka hop: the consumer's span continues the producer's trace."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.mesh.bus import Delivery, EventConsumer, EventProducer, declare_topics
from services.mesh.events import InteractionEvent
from services.mesh.settings import KafkaSettings
from services.mesh.topics import EVENTS_RAW
from tests.helpers import eventually, unique_topic


async def test_consumer_span_continues_producer_trace(
    kafka_settings: KafkaSettings, spans: InMemorySpanExporter
) -> None:
    topic = unique_topic(EVENTS_RAW)
    await declare_topics(kafka_settings, [topic])
    producer = EventProducer(kafka_settings, "trace-test")
    await producer.start()
    seen: list[trace.SpanContext] = []

    async def handler(_: InteractionEvent, __: Delivery) -> None:
        seen.append(trace.get_current_span().get_span_context())

    consumer = EventConsumer(
        kafka_settings, topic, f"g-{uuid.uuid4().hex[:6]}", handler, dlq=producer, service="t"
    )
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        with trace.get_tracer("test").start_as_current_span("ingest request") as root:
            await producer.publish(topic, InteractionEvent(entity_id="u1", event_type="click"))
        await eventually(lambda: _ready(bool(seen)))
    finally:
        await consumer.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await producer.stop()

    trace_id = root.get_span_context().trace_id
    assert seen[0].trace_id == trace_id
    finished = {s.name: s for s in spans.get_finished_spans() if s.context.trace_id == trace_id}
    publish = finished[f"{topic.name} publish"]
    process = finished[f"{topic.name} process"]
    assert publish.kind == SpanKind.PRODUCER and process.kind == SpanKind.CONSUMER
    assert publish.parent is not None and publish.parent.span_id == root.get_span_context().span_id
    # The consumer's parent is the producer span, restored from the message headers.
    assert process.parent is not None and process.parent.span_id == publish.context.span_id


async def _ready(value: bool) -> bool:
    return value
