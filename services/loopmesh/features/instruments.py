"""OpenTelemetry instruments of the features agents: events folded, late events, online writes,
erasures.

Prometheus names: ``loopmesh_features_events_total{outcome}`` (accepted, duplicate,
too_late, erased; per entity key an event feeds), ``loopmesh_features_late_events_total{view}``
(events older than a view's allowed lateness: reported to ``events.raw.dlq``, not folded),
``loopmesh_features_online_writes_total`` (view rows written to the online store) and
``loopmesh_features_erasures_total``. Dead letters and consumer lag go to the bus's
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
_late = _meter.create_counter(
    "loopmesh.features.late_events",
    unit="{event}",
    description="Events later than a view's allowed lateness (dead-lettered, not folded)",
)
_erasures = _meter.create_counter(
    "loopmesh.features.erasures", unit="{entity}", description="Entities erased"
)


def record_event(outcome: str) -> None:
    _events.add(1, {"outcome": outcome})


def record_late(view: str) -> None:
    _late.add(1, {"view": view})


def record_online_writes(rows: int) -> None:
    if rows:
        _online_writes.add(rows)


def record_erasure() -> None:
    _erasures.add(1)
