"""Trace context crosses a Kafka hop (the consumer's span continues the producer's trace), and
log lines carry the ids of the span they were written in."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import uuid

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from loopmesh.mesh.bus import Delivery, EventConsumer, EventProducer, declare_topics
from loopmesh.mesh.events import InteractionEvent
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.telemetry import JsonLogFormatter
from loopmesh.mesh.topics import EVENTS_RAW
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


def test_json_logs_carry_the_current_trace_and_span_ids(spans: InMemorySpanExporter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter("tests"))
    logger = logging.getLogger(f"loopmesh.test.{uuid.uuid4().hex[:6]}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)

    logger.info("outside any span")
    with trace.get_tracer("test").start_as_current_span("logged") as span:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("inside %s", "a span")

    outside, inside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert outside["message"] == "outside any span" and "trace_id" not in outside
    ctx = span.get_span_context()
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert inside["message"] == "inside a span" and inside["level"] == "ERROR"
    assert inside["service"] == "tests" and "ValueError: boom" in inside["exception"]
