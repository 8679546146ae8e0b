"""OpenTelemetry instruments of the rollout controller: traffic weights, states, changes.

Prometheus names (OTel's conversion):

- ``loopmesh_rollout_weight{model, version}``: share of traffic each serving version gets
  (the canary's weight for the canary, the rest for stable);
- ``loopmesh_rollout_state{model, state}``: 1 for the model's current state, 0 for the others;
- ``loopmesh_rollout_step{model}``: the canary step (0: candidate or none);
- ``loopmesh_rollout_changes_total{model, state}``: changes published, by the state entered;
- ``loopmesh_rollout_leader``: 1 while this controller leads (it alone publishes and loads),
  0 while it waits as a standby.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import get_args

from opentelemetry.metrics import CallbackOptions, Observation

from loopmesh.mesh.events import RolloutChanged, RolloutState
from loopmesh.mesh.telemetry import meter
from loopmesh.rollout.machine import Record

STATES: tuple[str, ...] = get_args(RolloutState)

# Created at import; they bind to the provider setup_telemetry installs later (OTel proxies).
_meter = meter("loopmesh.rollout")
_changes = _meter.create_counter(
    "loopmesh.rollout.changes",
    unit="{change}",
    description="Rollout changes published, by the state they enter",
)
_sources: list[Callable[[], Iterable[Record]]] = []
_leadership: list[Callable[[], bool]] = []


def watch(records: Callable[[], Iterable[Record]]) -> None:
    """Report the gauges from ``records()`` (the controller's current records) from now on."""
    _sources.append(records)


def unwatch(records: Callable[[], Iterable[Record]]) -> None:
    if records in _sources:
        _sources.remove(records)


def watch_leadership(leading: Callable[[], bool]) -> None:
    """Report ``loopmesh_rollout_leader`` from ``leading()`` from now on."""
    _leadership.append(leading)


def unwatch_leadership(leading: Callable[[], bool]) -> None:
    if leading in _leadership:
        _leadership.remove(leading)


def _records() -> list[Record]:
    return [record for source in list(_sources) for record in source()]


def weights(record: Record) -> dict[int, float]:
    """Traffic share per version: the canary's weight while it is in a rollout, the rest to
    stable (a candidate is loaded at weight 0)."""
    out: dict[int, float] = {}
    canary = record.canary_version if record.in_rollout else None
    share = record.canary_weight if canary is not None else 0.0
    if record.stable_version is not None:
        out[record.stable_version] = 1.0 - share
    if canary is not None:
        out[canary] = share
    return out


def _observe_weights(_options: CallbackOptions) -> Iterable[Observation]:
    for record in _records():
        for version, share in weights(record).items():
            yield Observation(share, {"model": record.model_name, "version": str(version)})


def _observe_states(_options: CallbackOptions) -> Iterable[Observation]:
    for record in _records():
        for state in STATES:
            value = 1 if record.state == state else 0
            yield Observation(value, {"model": record.model_name, "state": state})


def _observe_steps(_options: CallbackOptions) -> Iterable[Observation]:
    for record in _records():
        yield Observation(record.step, {"model": record.model_name})


_meter.create_observable_gauge(
    "loopmesh.rollout.weight",
    callbacks=[_observe_weights],
    description="Traffic share of each serving version (canary weight, 1 - weight for stable)",
)
_meter.create_observable_gauge(
    "loopmesh.rollout.state",
    callbacks=[_observe_states],
    description="1 for the rollout state a model is in, 0 for the others",
)
_meter.create_observable_gauge(
    "loopmesh.rollout.step", callbacks=[_observe_steps], description="Canary step of a model"
)


def _observe_leader(_options: CallbackOptions) -> Iterable[Observation]:
    for leading in list(_leadership):
        yield Observation(1 if leading() else 0)


_meter.create_observable_gauge(
    "loopmesh.rollout.leader",
    callbacks=[_observe_leader],
    description="1 while this rollout controller leads (publishes and loads), 0 on a standby",
)


def record_change(event: RolloutChanged) -> None:
    _changes.add(1, {"model": event.model_name, "state": event.state})
