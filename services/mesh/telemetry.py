"""OpenTelemetry plumbing shared by the services: tracer setup and Kafka header propagation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter

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
