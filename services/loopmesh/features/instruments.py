"""OpenTelemetry instruments of the features agents: events folded, online writes, erasures.

Prometheus names: ``loopmesh_features_events_total{outcome}`` (accepted, duplicate,
too_late, erased), ``loopmesh_features_online_writes_total`` (entity rows pushed to the online
store) and ``loopmesh_features_erasures_total``. Dead letters and consumer lag go to the bus's
``loopmesh_kafka_dead_lettered_total`` and ``loopmesh_kafka_consumer_lag`` (see
``loopmesh.mesh.bus``), like every other consumer's.
"""

from __future__ import annotations

from loopmesh.mesh.telemetry import meter

# Created at import; they bind to the provider setup_telemetry installs later (OTel proxies).
_meter = meter("loopmesh.features")
_events = _meter.create_counter(
    "loopmesh.features.events",
    unit="{event}",
    description="Interaction events folded into entity state, by outcome",
)
_online_writes = _meter.create_counter(
    "loopmesh.features.online_writes",
    unit="{row}",
    description="Entity feature rows written to the online store",
)
_erasures = _meter.create_counter(
    "loopmesh.features.erasures", unit="{entity}", description="Entities erased"
)


def record_event(outcome: str) -> None:
    _events.add(1, {"outcome": outcome})


def record_online_writes(rows: int) -> None:
    if rows:
        _online_writes.add(rows)


def record_erasure() -> None:
    _erasures.add(1)
