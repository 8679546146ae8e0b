"""Per-entity feature state and the rules of the feature API, knowing nothing of Kafka or gRPC.

``EntityAggregate`` folds interaction events into the values the Feast views serve
(feature_store/features.py). Everything runs on event time, never on arrival time:

* Windows end at the entity's newest event: ``events_1h`` counts events with
  ``newest - 1h < t <= newest`` (``events_24h`` likewise), so a late event moves a count
  only if it falls inside the window, and any arrival order yields the same values.
* Idempotent by ``event_id``: the ids of every event within ``horizon`` of the newest one
  are kept, so a redelivered event is recognised and counted once.
* Allowed lateness: an event older than ``newest - allowed_lateness`` is dropped (``TOO_LATE``).
  Its id may already be forgotten, so counting it could count it twice; dropping it keeps
  the fold idempotent. Within the allowed lateness, arrival order never changes the result.
* Last values (``last_event_type``, ``last_category``) belong to the event with the greatest
  ``(event_time, event_id)``: an older event never overwrites a newer value.
* Means are exact sums (Shewchuk partials) divided once, so they do not depend on order.
* Erasure (right to be forgotten) drops everything and keeps only the erasure time: events at
  or before it belong to the erased history and are dropped, later ones start afresh.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from loopmesh.mesh.events import InteractionEvent
from loopmesh.mesh.model_repo import shown

HOUR = 3600.0
DAY = 24 * HOUR
WINDOWS: dict[str, float] = {"events_1h": HOUR, "events_24h": DAY}
"""Windowed counts by feature name and width in seconds."""
NUMERIC_MEANS: dict[str, str] = {"value_mean": "value", "amount_mean": "amount"}
"""Mean features by name and the numeric attribute they average."""
CATEGORY_ATTRIBUTE = "category"
DEFAULT_MAX_AGE_SECONDS = 7 * DAY
"""The views' TTL (``FEATURE_TTL`` in feature_store/features.py): older values are stale."""

ACTIVITY_VIEW = "entity_activity"
NUMERIC_VIEW = "entity_numeric"
MAX_ENTITY_ID_LENGTH = 256


def _ts(entry: tuple[float, str]) -> float:
    return entry[0]


class Outcome(enum.Enum):
    """What folding one event did."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    TOO_LATE = "too_late"
    ERASED = "erased"


class _Mean(BaseModel):
    model_config = ConfigDict(extra="forbid")

    partials: list[float] = Field(default_factory=list)
    """Non-overlapping partial sums whose exact total is the sum of the values."""
    count: int = 0

    def add(self, x: float) -> None:
        # Shewchuk's exact summation (the algorithm behind math.fsum), kept incrementally.
        partials = self.partials
        i = 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]
        self.count += 1

    def value(self) -> float | None:
        if self.count == 0:
            return None
        try:
            mean = math.fsum(self.partials) / self.count
        except (OverflowError, ValueError):
            return None  # only sums beyond ±1.8e308 get here; no honest mean exists
        return mean if math.isfinite(mean) else None


class _Last(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: str
    ts: float
    event_id: str

    def older_than(self, ts: float, event_id: str) -> bool:
        return (self.ts, self.event_id) < (ts, event_id)


class EntityState(BaseModel):
    """The serialized state of one entity (a faust table value), JSON."""

    model_config = ConfigDict(extra="forbid")

    v: int = 1
    """Shape version of this state."""
    newest: float | None = None
    """Event time (unix seconds) of the newest accepted event."""
    recent: list[tuple[float, str]] = Field(default_factory=list)
    """``(event_time, event_id)`` of accepted events within the horizon, sorted."""
    total: int = 0
    means: dict[str, _Mean] = Field(default_factory=dict)
    last_type: _Last | None = None
    last_category: _Last | None = None
    erased_at: float | None = None
    """Event time of the latest erasure; events at or before it are dropped."""


class EntityAggregate:
    """One entity's state with the fold rules; ``to_bytes``/``from_bytes`` for the table."""

    def __init__(
        self,
        entity_id: str,
        state: EntityState | None = None,
        *,
        allowed_lateness: float = DAY,
    ) -> None:
        if allowed_lateness < 0:
            raise ValueError("allowed_lateness must be >= 0")
        self.entity_id = entity_id
        self.state = state or EntityState()
        self.allowed_lateness = allowed_lateness
        # Ids must outlive the allowed lateness (to deduplicate) and the widest window.
        self.horizon = max(allowed_lateness, *WINDOWS.values())
        self._ids = {event_id for _, event_id in self.state.recent}

    @classmethod
    def from_bytes(
        cls, entity_id: str, raw: bytes | None, *, allowed_lateness: float = DAY
    ) -> EntityAggregate:
        state = EntityState.model_validate_json(raw) if raw else None
        return cls(entity_id, state, allowed_lateness=allowed_lateness)

    def to_bytes(self) -> bytes:
        return self.state.model_dump_json().encode()

    @property
    def has_features(self) -> bool:
        return self.state.newest is not None

    def apply(self, event: InteractionEvent) -> Outcome:
        """Fold one event in; returns what happened to it."""
        s = self.state
        ts = event.event_time.timestamp()
        if s.erased_at is not None and ts <= s.erased_at:
            return Outcome.ERASED
        if event.event_id in self._ids:
            return Outcome.DUPLICATE
        if s.newest is not None and ts <= s.newest - self.allowed_lateness:
            return Outcome.TOO_LATE
        s.total += 1
        bisect.insort(s.recent, (ts, event.event_id))
        self._ids.add(event.event_id)
        if s.newest is None or ts > s.newest:
            s.newest = ts
            self._prune()
        for feature, attribute in NUMERIC_MEANS.items():
            if attribute in event.numeric:
                s.means.setdefault(feature, _Mean()).add(event.numeric[attribute])
        if s.last_type is None or s.last_type.older_than(ts, event.event_id):
            s.last_type = _Last(value=event.event_type, ts=ts, event_id=event.event_id)
        category = event.categorical.get(CATEGORY_ATTRIBUTE)
        if category is not None and (
            s.last_category is None or s.last_category.older_than(ts, event.event_id)
        ):
            s.last_category = _Last(value=category, ts=ts, event_id=event.event_id)
        return Outcome.ACCEPTED

    def erase(self, at: float) -> None:
        """Forget everything; remember only that events up to ``at`` are erased history."""
        previous = self.state.erased_at
        self.state = EntityState(erased_at=at if previous is None else max(previous, at))
        self._ids = set()

    def _prune(self) -> None:
        assert self.state.newest is not None
        cut = bisect.bisect_right(self.state.recent, self.state.newest - self.horizon, key=_ts)
        if cut:
            for _, event_id in self.state.recent[:cut]:
                self._ids.discard(event_id)
            del self.state.recent[:cut]

    def count_within(self, width: float) -> int:
        """Accepted events with ``newest - width < t <= newest``."""
        if self.state.newest is None:
            return 0
        start = bisect.bisect_right(self.state.recent, self.state.newest - width, key=_ts)
        return len(self.state.recent) - start

    def rows(self) -> dict[str, dict[str, Any]]:
        """The Feast rows by view name (every feature of each view); empty without events."""
        s = self.state
        if s.newest is None:
            return {}
        ts = datetime.fromtimestamp(s.newest, UTC)
        activity: dict[str, Any] = {"entity_id": self.entity_id, "event_timestamp": ts}
        for name, width in WINDOWS.items():
            activity[name] = self.count_within(width)
        activity["events_total"] = s.total
        activity["last_event_ts"] = s.newest
        numeric: dict[str, Any] = {"entity_id": self.entity_id, "event_timestamp": ts}
        for name in NUMERIC_MEANS:
            mean = s.means.get(name)
            numeric[name] = mean.value() if mean else None
        numeric["last_event_type"] = s.last_type.value if s.last_type else None
        numeric["last_category"] = s.last_category.value if s.last_category else None
        return {ACTIVITY_VIEW: activity, NUMERIC_VIEW: numeric}


# ---------------------------------------------------------------------------- the read API


class FeatureStatus(enum.Enum):
    PRESENT = "present"
    MISSING = "missing"
    STALE = "stale"


class RequestError(ValueError):
    """A request the caller must fix; ``field`` names the part at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class FeatureSpec:
    """One servable feature."""

    view: str
    name: str
    dtype: str
    description: str = ""
    max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS

    @property
    def ref(self) -> str:
        return f"{self.view}:{self.name}"


class StoredValue(NamedTuple):
    """A value as the online store returned it (None when the store has none)."""

    value: float | int | str | None
    event_time: float | None
    """Unix seconds of the row's event time (the newest event folded into it)."""


@dataclass
class FeatureSchema:
    """The servable features, by ref, in a stable order."""

    features: Sequence[FeatureSpec]
    by_ref: dict[str, FeatureSpec] = field(init=False)

    def __post_init__(self) -> None:
        self.by_ref = {spec.ref: spec for spec in self.features}

    def resolve(self, refs: Sequence[str]) -> list[FeatureSpec]:
        """The specs of ``refs`` in order (all features when empty); RequestError if unknown."""
        if not refs:
            return list(self.features)
        out = []
        for i, ref in enumerate(refs):
            spec = self.by_ref.get(ref)
            if spec is None:
                reason = (
                    f"unknown feature {shown(ref)}"
                    if ":" in ref
                    else f"{shown(ref)} is not a 'view:feature' reference"
                )
                raise RequestError(f"feature_refs[{i}]", reason)
            out.append(spec)
        return out


def validate_entity_ids(entity_ids: Sequence[str], *, limit: int) -> list[str]:
    """The ids as given; RequestError naming the first bad one."""
    if not entity_ids:
        raise RequestError("entity_ids", "at least one entity id is required")
    if len(entity_ids) > limit:
        raise RequestError("entity_ids", f"{len(entity_ids)} ids, at most {limit} per request")
    for i, entity_id in enumerate(entity_ids):
        validate_entity_id(entity_id, field=f"entity_ids[{i}]")
    return list(entity_ids)


def validate_entity_id(entity_id: str, *, field: str = "entity_id") -> str:
    if not entity_id.strip():
        raise RequestError(field, "must not be empty")
    if entity_id != entity_id.strip():
        raise RequestError(field, "must not start or end with whitespace")
    if len(entity_id) > MAX_ENTITY_ID_LENGTH:
        raise RequestError(field, f"longer than {MAX_ENTITY_ID_LENGTH} characters")
    return entity_id


def status_of(stored: StoredValue, *, max_age: float, now: float) -> FeatureStatus:
    """Missing without a value, stale when older than ``max_age`` seconds, else present."""
    if stored.value is None:
        return FeatureStatus.MISSING
    if stored.event_time is not None and stored.event_time < now - max_age:
        return FeatureStatus.STALE
    return FeatureStatus.PRESENT


def feature_names(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``view:feature`` refs of a ``rows()`` result (for logs and tests)."""
    return [
        f"{view}:{name}"
        for view, row in rows.items()
        for name in row
        if name not in ("entity_id", "event_timestamp")
    ]
