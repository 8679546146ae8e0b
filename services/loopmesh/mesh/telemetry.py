"""OpenTelemetry for every service: providers, Kafka header propagation, RPC metrics, JSON logs."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from loopmesh.mesh.settings import TelemetrySettings

KafkaHeaders = list[tuple[str, bytes]]


class _HeaderSetter(Setter[KafkaHeaders]):
    def set(self, carrier: KafkaHeaders, key: str, value: str) -> None:
        carrier.append((key, value.encode()))


class _HeaderGetter(Getter[Sequence[tuple[str, bytes]]]):
    def get(self, carrier: Sequence[tuple[str, bytes]], key: str) -> list[str] | None:
        found = [v.decode(errors="replace") for k, v in carrier if k == key]
        return found or None

    def keys(self, carrier: Sequence[tuple[str, bytes]]) -> list[str]:
        return [k for k, _ in carrier]


def inject_headers(headers: KafkaHeaders, context: Context | None = None) -> KafkaHeaders:
    """Append the current trace context (W3C traceparent, baggage) to Kafka headers."""
    propagate.inject(headers, context=context, setter=_HeaderSetter())
    return headers


def extract_context(headers: Iterable[tuple[str, bytes]] | None) -> Context:
    """The trace context a producer put into a message's headers."""
    return propagate.extract(list(headers or ()), getter=_HeaderGetter())


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the trace and span ids of the current span."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            entry["trace_id"] = format(ctx.trace_id, "032x")
            entry["span_id"] = format(ctx.span_id, "016x")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_telemetry(service: str, settings: TelemetrySettings, *, log_level: str = "INFO") -> None:
    """Install tracer and meter providers, the Prometheus endpoint and JSON logs for a process.

    Spans and metrics go to an OTLP collector when ``otlp_endpoint`` is set; metrics are also
    served for Prometheus on ``metrics_port`` when it is set.
    """
    resource = Resource.create(
        {"service.name": f"loopmesh-{service}", "service.namespace": settings.service_namespace}
    )
    tracer_provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = []
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True))
        )
        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=settings.otlp_endpoint, insecure=True)
            )
        )
    if settings.metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.metrics_host)
        readers.append(PrometheusMetricReader())
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))

    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(log_level)


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(name)


@functools.cache
def rpc_instruments(service: str) -> tuple[metrics.Counter, metrics.Histogram]:
    """``rpc.server.calls`` (attributes ``rpc.method``, ``rpc.grpc.status_code``) and
    ``rpc.server.duration`` (ms, ``rpc.method``) of ``service``: its gRPC servers' interceptor
    records them, and so does a control plane for the calls its data plane answered."""
    m = meter(f"loopmesh.{service}.rpc")
    calls = m.create_counter(
        "rpc.server.calls", unit="{call}", description="gRPC calls by method and status code"
    )
    duration = m.create_histogram(
        "rpc.server.duration", unit="ms", description="gRPC call duration by method"
    )
    return calls, duration


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts calls and records their duration per method and status code."""

    def __init__(self, service: str) -> None:
        self._calls, self._duration = rpc_instruments(service)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    return await inner(request, context)
                finally:
                    self._record(method, context, start)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    return await inner_su(requests, context)
                finally:
                    self._record(method, context, start)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # Streaming responses: count the call when it is set up; duration is per stream.
        self._calls.add(1, {"rpc.method": method, "rpc.grpc.status_code": "STREAM"})
        return handler

    def _record(self, method: str, context: grpc.aio.ServicerContext, start: float) -> None:
        code = context.code()
        name = code.name if isinstance(code, grpc.StatusCode) else "OK"
        attrs = {"rpc.method": method, "rpc.grpc.status_code": name}
        self._calls.add(1, attrs)
        self._duration.record((time.perf_counter() - start) * 1000, {"rpc.method": method})
