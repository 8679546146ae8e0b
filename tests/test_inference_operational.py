"""The gateway's operational figures: the sliding window (pure) and their trip to ``metrics.live``.

Pure tests cover the window (p99, error rate, expiry, bounded samples) and that the readers of
``metrics.live`` (rollout book, loop charts) keep gateway snapshots apart from
the trainer's quality snapshots. The integration test runs a gateway in-process against the
session's Kafka and Triton: successful calls to a loaded version and server-side failures of
a version published but never loaded show up as ``VersionMetrics`` on a unique topic.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from aiokafka import AIOKafkaConsumer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tritonclient.utils import InferenceServerException

from loopmesh.devstack.state import LoopState
from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import inference_pb2, inference_pb2_grpc
from loopmesh.inference.core import Counters
from loopmesh.inference.operational import OperationalWindows, percentile, to_events
from loopmesh.mesh.events import VersionMetrics
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import METRICS_LIVE, PREDICTIONS, ROLLOUTS
from loopmesh.rollout.metrics import MetricsBook
from tests.helpers import eventually, unique_topic
from tests.test_inference_support import (
    CALL_TIMEOUT,
    FEATURES,
    feature_server,
    load,
    publish,
    running,
    settings_for,
)

# -- the window (pure) ------------------------------------------------------------------------


def test_p99_and_error_rate_per_version() -> None:
    windows = OperationalWindows(60.0)
    for i in range(1, 101):
        windows.record("m", 1, failed=i % 20 == 0, latency_ms=float(i), at=float(i) / 10)
    windows.record("m", 2, failed=False, latency_ms=7.0, at=5.0)
    windows.record("n", 1, failed=True, latency_ms=3.0, at=5.0)
    figures = {(f.model_name, f.model_version): f for f in windows.snapshot(now=11.0)}
    assert set(figures) == {("m", 1), ("m", 2), ("n", 1)}
    m1 = figures[("m", 1)]
    assert (m1.count, m1.error_rate, m1.latency_p99_ms) == (100, 0.05, 99.0)
    assert (figures[("m", 2)].error_rate, figures[("m", 2)].latency_p99_ms) == (0.0, 7.0)
    assert (figures[("n", 1)].count, figures[("n", 1)].error_rate) == (1, 1.0)
    assert percentile([5.0], 0.99) == 5.0 and percentile([3.0, 1.0, 2.0], 0.5) == 2.0


def test_old_requests_leave_the_window() -> None:
    windows = OperationalWindows(10.0, buckets=10)  # one-second buckets
    windows.record("m", 1, failed=True, latency_ms=500.0, at=0.5)
    windows.record("m", 1, failed=False, latency_ms=5.0, at=5.0)
    [inside] = windows.snapshot(now=10.4)
    assert (inside.count, inside.error_rate, inside.latency_p99_ms) == (2, 0.5, 500.0)
    [later] = windows.snapshot(now=11.0)  # the failure's bucket has left the window
    assert (later.count, later.error_rate, later.latency_p99_ms) == (1, 0.0, 5.0)
    [lagging] = windows.snapshot(now=15.5)  # the count lags its latency by under a bucket
    assert (lagging.count, lagging.latency_p99_ms) == (1, None)
    assert windows.snapshot(now=16.0) == []  # nothing in the window: nothing published
    assert to_events(windows.snapshot(now=16.0), 10.0) == []


def test_memory_is_bounded_but_the_count_stays_exact() -> None:
    windows = OperationalWindows(60.0, max_samples=100)
    for i in range(1000):
        windows.record("m", 1, failed=False, latency_ms=float(i), at=1.0 + i / 1000)
    [figures] = windows.snapshot(now=2.0)
    # Counted exactly; the p99 is over the newest 100 latencies (900..999).
    assert (figures.count, figures.latency_p99_ms) == (1000, 998.0)
    with pytest.raises(ValueError):
        OperationalWindows(0.0)


def test_counters_feed_the_window_on_every_finished_call() -> None:
    windows = OperationalWindows(60.0, clock=lambda: 1.0)
    counters = Counters(windows=windows)
    counters.succeeded("m", 1, 4.0)
    counters.failed("m", 1, 9.0)
    assert (counters.of("m", 1).answered, counters.of("m", 1).failures) == (1, 1)
    [figures] = windows.snapshot(now=2.0)
    assert (figures.count, figures.error_rate, figures.latency_p99_ms) == (2, 0.5, 9.0)
    Counters().succeeded("m", 1, 1.0)  # without a window it only counts


# -- readers of metrics.live (pure) -----------------------------------------------------------


def _gateway_event(at: datetime) -> VersionMetrics:
    windows = OperationalWindows(60.0)
    windows.record("m", 2, failed=True, latency_ms=40.0, at=1.0)
    windows.record("m", 2, failed=False, latency_ms=20.0, at=1.5)
    [event] = to_events(windows.snapshot(now=2.0), 60.0)
    return event.model_copy(update={"event_time": at})


def test_gateway_snapshots_do_not_replace_quality_snapshots() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    quality = VersionMetrics(
        model_name="m", model_version=2, window_seconds=600.0, count=80, log_loss=0.4, event_time=t0
    )
    gateway = _gateway_event(t0 + timedelta(seconds=5))
    assert (gateway.count, gateway.window_seconds, gateway.error_rate) == (2, 60.0, 0.5)
    assert (gateway.log_loss, gateway.accuracy, gateway.auc, gateway.label_rate) == (None,) * 4
    assert gateway.latency_p99_ms == 40.0

    book = MetricsBook()
    assert book.record(quality) and book.record(gateway)
    kept = book.quality("m", 2, since=t0)
    assert kept is not None and kept.event_id == quality.event_id
    assert book.served("m", 2) == 80  # the gateway's request count is not a joined count
    ops = book.operational("m", 2, since=t0)
    assert (ops.error_rate, ops.requests, ops.latency_p99_ms, ops.latency_samples) == (
        0.5,
        2,
        40.0,
        2,
    )
    assert ops.latency_p99_low_ms == 20.0 and ops.latency_p99_high_ms is None  # 2 latencies

    state = LoopState(model_name="m")
    state.apply(quality, 0.0)
    state.apply(gateway, 1.0)
    assert [p.log_loss for p in state.metric_points] == [0.4]


# -- on the real mesh -------------------------------------------------------------------------


async def test_gateway_publishes_error_rate_and_latency_per_version(
    kafka_settings: KafkaSettings,
    triton: TritonServer,
    model_repository: Path,
    spans: InMemorySpanExporter,
) -> None:
    model = f"ops{uuid.uuid4().hex[:8]}"
    publish(model_repository, model, [1], FEATURES)
    await load(triton.grpc_url, model)
    publish(model_repository, model, [3], FEATURES)  # published, never loaded: UNAVAILABLE
    topic = unique_topic(METRICS_LIVE).name
    async with feature_server() as (_, features_url):
        settings = settings_for(
            kafka_settings,
            triton.grpc_url,
            model_repository,
            features_url,
            predictions_topic=unique_topic(PREDICTIONS).name,
            rollouts_topic=unique_topic(ROLLOUTS).name,
            metrics_topic=topic,
            operational_publish_s=0.3,
            default_model=model,
        )
        async with running(settings) as gateway:
            started = time.monotonic()
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                for i in range(5):
                    answer = await stub.Predict(
                        inference_pb2.PredictRequest(entity_id=f"u{i}", model_version="1"),
                        timeout=CALL_TIMEOUT,
                    )
                    assert answer.model_version == 1
                for i in range(3):
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await stub.Predict(
                            inference_pb2.PredictRequest(entity_id=f"u{i}", model_version="3"),
                            timeout=CALL_TIMEOUT,
                        )
                    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                # The caller's mistakes are not a version's failures: never recorded.
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await stub.Predict(
                        inference_pb2.PredictRequest(entity_id="u", model_version="99"),
                        timeout=CALL_TIMEOUT,
                    )
                assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            x = np.ones((1, len(FEATURES)), dtype=np.float32)
            inp = aioclient.InferInput("INPUT__0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            async with aioclient.InferenceServerClient(gateway.address) as client:
                await client.infer(model, [inp], model_version="1", client_timeout=CALL_TIMEOUT)
                for version in ("3", "99"):
                    with pytest.raises(InferenceServerException):
                        await client.infer(model, [inp], model_version=version, client_timeout=30)

            seen: dict[int, tuple[VersionMetrics, list[tuple[str, bytes]]]] = {}
            consumer = AIOKafkaConsumer(
                topic,
                bootstrap_servers=kafka_settings.bootstrap_servers,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                group_id=None,
            )
            await consumer.start()
            try:

                async def complete() -> bool:
                    batch = await consumer.getmany(timeout_ms=300)
                    for records in batch.values():
                        for r in records:
                            assert r.key == model.encode() and r.value is not None
                            event = VersionMetrics.model_validate_json(r.value)
                            seen[event.model_version] = (event, list(r.headers))
                    # Every call is in the window: 5 Predicts + 1 ModelInfer, 3 + 1 failures.
                    return (
                        1 in seen and seen[1][0].count == 6 and 3 in seen and seen[3][0].count == 4
                    )

                await eventually(complete, timeout=30)
            finally:
                await consumer.stop()
    assert time.monotonic() - started < 45
    assert set(seen) == {1, 3}  # version 99 does not exist: no snapshot
    good, headers = seen[1]
    bad = seen[3][0]
    assert (good.model_name, good.window_seconds, good.error_rate) == (model, 60.0, 0.0)
    assert good.latency_p99_ms is not None and good.latency_p99_ms > 0
    assert bad.error_rate == 1.0 and bad.latency_p99_ms is not None and bad.latency_p99_ms > 0
    assert (good.log_loss, good.accuracy, good.auc, good.label_rate) == (None,) * 4
    # Each publish is a producer span whose context travels in the headers (W3C traceparent).
    trace_id = dict(headers)["traceparent"].decode().split("-")[1]
    published = {
        format(span.context.trace_id, "032x")
        for span in spans.get_finished_spans()
        if span.name == f"{topic} publish" and span.context is not None
    }
    assert trace_id in published


def test_gateway_snapshots_name_each_versions_task() -> None:
    windows = OperationalWindows(60.0)
    windows.record("minutes", 3, failed=False, latency_ms=5.0, at=1.0)
    windows.record("ctr", 1, failed=False, latency_ms=5.0, at=1.0)
    tasks = {("minutes", 3): "regression", ("ctr", 1): "binary"}
    events = to_events(windows.snapshot(now=2.0), 60.0, lambda m, v: tasks[(m, v)])  # type: ignore[arg-type,return-value]
    assert {(e.model_name, e.task) for e in events} == {
        ("minutes", "regression"),
        ("ctr", "binary"),
    }
