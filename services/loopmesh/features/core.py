"""Per-entity feature state and the rules of the feature API, knowing nothing of Kafka or gRPC.

``EntityFold`` folds interaction events into the values of every declared stream feature view
of one entity key (``features.definitions``). Everything runs on event time, never on arrival
time (docs/features.md holds the user's version of these rules):

* Each view's windows end at the view's newest event: a hopping window of width ``W`` and
  slide ``S`` holds the events of the ``W/S`` slides (buckets ``floor(t/S)``) up to and
  including the newest event's. A late event moves a value only if its slide is still inside
  the window, and any arrival order within the allowed lateness yields the same values.
* Bounded whatever the traffic: a window keeps ``W/S`` bucket summaries (count, sum, sum of
  squared deviations, min, max), an aggregation without a window one, a latest value one.
* Idempotent by ``event_id``: a record redelivered by Kafka is recognised by its offset (the
  state keeps the greatest offset folded per source topic), and a copy written again under
  the same id by the last ``dedup_ids`` accepted ids of the entity.
* Allowed lateness (per view): an event older than the view's newest by more is ``late`` for
  that view; the caller counts and reports it.
* Latest values belong to the event with the greatest ``(event_time, event_id)``.
* Erasure drops everything and keeps only the erasure time (at least the newest event time
  folded so far): events at or before it belong to the erased history and are dropped.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any, NamedTuple

import pydantic_core

from loopmesh.features.definitions import (
    PRIMARY_JOIN_KEY,
    STATE_LAYOUT,
    AggregationSpec,
    ViewSpec,
)
from loopmesh.mesh.events import InteractionEvent
from loopmesh.mesh.model_repo import shown

HOUR = 3600.0
DAY = 24 * HOUR
DEFAULT_MAX_AGE_SECONDS = 7 * DAY
"""Freshness bound of a view without a TTL."""
MAX_ENTITY_ID_LENGTH = 256
STATE_VERSION = STATE_LAYOUT
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Value = float | int | str | None
Columns = dict[str, float | str]
"""An event flattened into the columns views name (``event_columns``)."""


class Outcome(enum.Enum):
    """What folding one event did to one entity."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    TOO_LATE = "too_late"
    ERASED = "erased"


def event_columns(event: InteractionEvent) -> Columns:
    """The event as the columns a source's schema may declare (definitions module docs)."""
    columns: Columns = {
        **event.categorical,
        **event.numeric,
        **event.entities,
        "event_id": event.event_id,
        "event_type": event.event_type,
        "event_time": event.event_time.timestamp(),
        "entity_id": event.entity_id,
    }
    return columns


def key_of(event: InteractionEvent, join_key: str) -> str | None:
    """The event's value of ``join_key`` (None when it carries none)."""
    if join_key == PRIMARY_JOIN_KEY:
        return event.entity_id
    return event.entities.get(join_key)


def table_key(join_key: str, value: str) -> str:
    """The state table's key of one entity (join keys are identifiers, so '=' splits)."""
    return f"{join_key}={value}"


def split_key(key: str) -> tuple[str, str]:
    join_key, _, value = key.partition("=")
    return join_key, value


# A bucket summary: [count, sum, sum of squares, min, max], the sums as Shewchuk partials
# (the non-overlapping floats whose exact total is the sum; at most ~40 for any doubles), so
# every value is the correctly rounded result of exact arithmetic: the same whatever the
# arrival order, and no cancellation in the variance.
Summary = list[Any]


def _grow(partials: list[float], x: float) -> None:
    # Shewchuk's exact summation (the algorithm behind math.fsum), kept incrementally.
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


def _add(summary: Summary | None, x: float) -> Summary:
    if summary is None:
        return [1, [x], [x * x], x, x]
    _grow(summary[1], x)
    _grow(summary[2], x * x)
    summary[0] += 1
    summary[3] = min(summary[3], x)
    summary[4] = max(summary[4], x)
    return summary


def _result(spec: AggregationSpec, found: Sequence[Summary | int]) -> Value:
    """The feature's value from its series' summaries (bare counts for a string column)."""
    n = sum(s if isinstance(s, int) else int(s[0]) for s in found)
    if spec.function == "count":
        return n
    if n == 0:
        return None
    # The other functions read numeric series only (definitions refuse them on strings).
    summaries = [s for s in found if not isinstance(s, int)]
    try:
        if spec.function in ("sum", "mean"):
            total = math.fsum(p for summary in summaries for p in summary[1])
            out = total if spec.function == "sum" else total / n
        elif spec.function == "min":
            out = min(float(summary[3]) for summary in summaries)
        elif spec.function == "max":
            out = max(float(summary[4]) for summary in summaries)
        else:  # stddev: the sample standard deviation, as Spark's and pandas' std
            if n < 2:
                return None
            # Merged into a few partials first (exactly): Fractions of those alone are cheap.
            sums: list[float] = []
            sq: list[float] = []
            for summary in summaries:
                for p in summary[1]:
                    _grow(sums, p)
                for p in summary[2]:
                    _grow(sq, p)
            exact = sum(map(Fraction, sums), Fraction())
            squares = sum(map(Fraction, sq), Fraction())
            out = math.sqrt(max(float((squares - exact * exact / n) / (n - 1)), 0.0))
    except (OverflowError, ValueError):
        return None  # only sums beyond ±1.8e308 get here; no honest value exists
    return out if math.isfinite(out) else None


@dataclass(frozen=True)
class _Series:
    """What one view keeps per column and window: every count, sum, mean, min, max and stddev
    over the same (column, window, slide) reads the same slide summaries."""

    key: str
    column: str
    numeric: bool
    """Numbers are summed; a string column (counts only) contributes 0 to the sums."""
    slide_s: float | None
    buckets: int


@dataclass(frozen=True)
class _Plan:
    """A view's series and latest values, worked out once per definition."""

    series: tuple[_Series, ...]
    latest: tuple[AggregationSpec, ...]
    series_of: dict[str, str]
    """Feature -> key of the series it reads."""


_PLANS: dict[tuple[str, str], _Plan] = {}


def _plan(spec: ViewSpec) -> _Plan:
    found = _PLANS.get((spec.name, spec.fingerprint))
    if found is not None:
        return found
    series: dict[str, _Series] = {}
    series_of: dict[str, str] = {}
    for agg in spec.aggregations:
        if agg.function == "last":
            continue
        key = f"{agg.column}/{agg.window_s or 0:g}/{agg.slide_s or 0:g}"
        series.setdefault(
            key, _Series(key, agg.column, agg.kind == "numeric", agg.slide_s, agg.buckets)
        )
        series_of[agg.feature] = key
    plan = _Plan(
        tuple(series.values()),
        tuple(a for a in spec.aggregations if a.function == "last"),
        series_of,
    )
    _PLANS[(spec.name, spec.fingerprint)] = plan
    return plan


class _ViewState:
    """One view's part of an entity's state: ``{"fp", "newest", "rt", "s", "l"}``, the series'
    summaries (``s``: key -> summary, or slide -> summary for a window) and the latest values
    (``l``: feature -> ``[value, event time, event id]``)."""

    __slots__ = ("_pruned", "data", "plan", "spec")

    def __init__(self, spec: ViewSpec, data: dict[str, Any] | None) -> None:
        self.spec = spec
        self.plan = _plan(spec)
        self._pruned: dict[str, int] = {}
        """Newest slide each window was last pruned at (in memory: pruning is idempotent)."""
        if data is None or data.get("fp") != spec.fingerprint:
            data = {"fp": spec.fingerprint, "newest": None, "s": {}, "l": {}}
        self.data = data

    @property
    def newest(self) -> float | None:
        newest: float | None = self.data["newest"]
        return newest

    def late(self, ts: float) -> bool:
        newest = self.newest
        return newest is not None and ts < newest - self.spec.allowed_lateness_s

    @property
    def row_time(self) -> datetime:
        """The row's event time: the newest event's, moved on by a microsecond per change
        when that stays put (Feast's Redis store skips a row not newer than the stored one, so
        a late event folded in must still make a newer row)."""
        return EPOCH + timedelta(microseconds=self.data["rt"])

    def fold(self, ts: float, event_id: str, columns: Columns) -> None:
        data = self.data
        newest = data["newest"]
        if newest is None or ts > newest:
            newest = data["newest"] = ts
            self._prune()
        data["rt"] = max(round(newest * 1e6), data.get("rt", 0) + 1)
        summaries: dict[str, Any] = data["s"]
        for series in self.plan.series:
            x = columns.get(series.column)
            if x is None:
                continue
            if series.numeric and not isinstance(x, float | int):
                continue  # a categorical value where a number is declared
            if series.slide_s is None:
                current = summaries.get(series.key)
                # A string column only counts: its summary is the count alone.
                summaries[series.key] = (
                    _add(current, float(x)) if series.numeric else (current or 0) + 1
                )
                continue
            bucket = math.floor(ts / series.slide_s)
            if bucket <= math.floor(newest / series.slide_s) - series.buckets:
                continue  # its slide already left the window
            buckets = summaries.setdefault(series.key, {})
            name = str(bucket)
            current = buckets.get(name)
            buckets[name] = _add(current, float(x)) if series.numeric else (current or 0) + 1
        latest: dict[str, Any] = data["l"]
        for agg in self.plan.latest:
            x = columns.get(agg.column)
            if x is None or isinstance(x, str) != (agg.kind == "categorical"):
                continue  # absent, or an attribute of the other kind under the same name
            current = latest.get(agg.feature)
            if current is None or (current[1], current[2]) < (ts, event_id):
                latest[agg.feature] = [x, ts, event_id]

    def _prune(self) -> None:
        newest = self.data["newest"]
        for series in self.plan.series:
            if series.slide_s is None:
                continue
            slide = math.floor(newest / series.slide_s)
            if self._pruned.get(series.key) == slide:
                continue  # the window has not moved since the last pass
            self._pruned[series.key] = slide
            buckets = self.data["s"].get(series.key)
            if buckets:
                first = slide - series.buckets + 1
                for name in [b for b in buckets if int(b) < first]:
                    del buckets[name]

    def values(self) -> dict[str, Value]:
        summaries: dict[str, Any] = self.data["s"]
        latest: dict[str, Any] = self.data["l"]
        windows = {s.key: s.slide_s is not None for s in self.plan.series}
        out: dict[str, Value] = {}
        for agg in self.spec.aggregations:
            if agg.function == "last":
                current = latest.get(agg.feature)
                out[agg.feature] = current[0] if current is not None else None
                continue
            key = self.plan.series_of[agg.feature]
            state = summaries.get(key)
            if state is None:
                found: list[Summary | int] = []
            elif windows[key]:
                found = list(state.values())
            else:
                found = [state]
            out[agg.feature] = _result(agg, found)
        return out


class EntityFold:
    """One entity key's state with the fold rules; ``to_bytes``/``load`` for the table.

    ``views`` are the declared views of this entity's join key.
    """

    def __init__(
        self,
        join_key: str,
        value: str,
        views: Sequence[ViewSpec],
        state: dict[str, Any] | None = None,
        *,
        dedup_ids: int = 1000,
    ) -> None:
        self.join_key = join_key
        self.value = value
        self.dedup_ids = dedup_ids
        state = state if state is not None and state.get("v") == STATE_VERSION else None
        self.state: dict[str, Any] = state or {
            "v": STATE_VERSION,
            "erased_at": None,
            "seen": {},
            "ids": [],
            "views": {},
        }
        stored = self.state["views"]
        # Views no longer declared are dropped; a changed definition starts afresh.
        self.views = {v.name: _ViewState(v, stored.get(v.name)) for v in views}
        self._ids = set(self.state["ids"])

    @classmethod
    def load(
        cls,
        key: str,
        raw: bytes | None,
        views: Sequence[ViewSpec],
        *,
        dedup_ids: int = 1000,
    ) -> EntityFold:
        join_key, value = split_key(key)
        state = pydantic_core.from_json(raw) if raw else None
        return cls(join_key, value, views, state, dedup_ids=dedup_ids)

    @property
    def key(self) -> str:
        return table_key(self.join_key, self.value)

    def to_bytes(self) -> bytes:
        self.state["views"] = {name: view.data for name, view in self.views.items()}
        # pydantic-core's encoder: four times json's on these float-heavy states (the fold's
        # largest cost in bench/features_fold_bench.py), the same JSON.
        return pydantic_core.to_json(self.state)

    @property
    def has_features(self) -> bool:
        return any(view.newest is not None for view in self.views.values())

    @property
    def erased_at(self) -> float | None:
        erased: float | None = self.state["erased_at"]
        return erased

    def known_views(self) -> set[str]:
        """Views whose stored state matches their current definition (backfill skips)."""
        return {name for name, view in self.views.items() if view.newest is not None}

    def apply(
        self,
        event: InteractionEvent,
        columns: Columns,
        *,
        source: tuple[str, int] | None = None,
        only: Collection[str] | None = None,
        dedup: bool = True,
        written_ms: int | None = None,
    ) -> tuple[Outcome, list[str]]:
        """Fold one event in: what happened, and the views it came too late for.

        ``source`` (topic, offset) recognises a Kafka redelivery. ``only`` folds into those
        views alone; ``dedup=False`` skips the duplicate checks (a backfill of new views from
        the retained log, which reads each record once). ``written_ms``: when the event was
        written to Kafka (the broker's time), so one written before an erasure is erased
        history whatever its event time says.
        """
        s = self.state
        ts = event.event_time.timestamp()
        if s["erased_at"] is not None and ts <= s["erased_at"]:
            return Outcome.ERASED, []
        erased_written = s.get("erased_written_ms")
        if (
            erased_written is not None
            and written_ms is not None
            and 0 <= written_ms <= erased_written
        ):
            return Outcome.ERASED, []
        if dedup:
            if event.event_id in self._ids:
                return Outcome.DUPLICATE, []
            if source is not None:
                topic, offset = source
                if offset <= s["seen"].get(topic, -1):
                    return Outcome.DUPLICATE, []
                s["seen"][topic] = offset
        late: list[str] = []
        folded = False
        for name, view in self.views.items():
            if only is not None and name not in only:
                continue
            if not view.spec.wants(event.event_type):
                continue
            if view.late(ts):
                late.append(name)
                continue
            view.fold(ts, event.event_id, columns)
            folded = True
        if not folded:
            return (Outcome.TOO_LATE if late else Outcome.ACCEPTED), late
        if dedup:
            ids: list[str] = s["ids"]
            ids.append(event.event_id)
            self._ids.add(event.event_id)
            if len(ids) > self.dedup_ids:
                for old in ids[: len(ids) - self.dedup_ids]:
                    self._ids.discard(old)
                del ids[: len(ids) - self.dedup_ids]
        return Outcome.ACCEPTED, late

    def erase(self, at: float, written_ms: int | None = None) -> None:
        """Forget everything: events up to ``at`` (or the newest folded) are erased history,
        and so is every event written to Kafka before the erasure (``written_ms``), even one
        stamped in the future (the door takes events up to minutes ahead)."""
        newest = [v.newest for v in self.views.values() if v.newest is not None]
        previous = self.state["erased_at"]
        cut = max([at, *newest, *([previous] if previous is not None else [])])
        written = max(
            [w for w in (written_ms, self.state.get("erased_written_ms")) if w is not None],
            default=None,
        )
        self.state = {"v": STATE_VERSION, "erased_at": cut, "seen": self.state["seen"]}
        if written is not None:
            self.state["erased_written_ms"] = written
        self.state.update(ids=[], views={})
        self.views = {name: _ViewState(view.spec, None) for name, view in self.views.items()}
        self._ids = set()

    def reset(self, views: Collection[str]) -> None:
        """Start ``views`` afresh (a backfill refills them)."""
        for name in views:
            view = self.views.get(name)
            if view is not None:
                self.views[name] = _ViewState(view.spec, None)

    def rows(self) -> dict[str, dict[str, Any]]:
        """The Feast rows by view name (every feature of each view that has events)."""
        rows: dict[str, dict[str, Any]] = {}
        for name, view in self.views.items():
            if view.newest is None:
                continue
            row: dict[str, Any] = {
                self.join_key: self.value,
                view.spec.timestamp_column: view.row_time,
            }
            row.update(view.values())
            rows[name] = row
        return rows


def state_bytes_bound(views: Sequence[ViewSpec], dedup_ids: int) -> int:
    """A generous upper bound of one entity's serialized state (the changelog record size)."""
    per_bucket = 2 * 40 * 26 + 3 * 26 + 30  # worst-case partials, the bucket key, punctuation
    total = 4096 + dedup_ids * (256 + 4)  # ids up to 256 characters
    for view in views:
        total += 512
        for agg in view.aggregations:
            if agg.function == "last":
                total += 256 * 2 + 64 + 64
            else:
                total += agg.buckets * per_bucket + 64
    return total


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
    join_key: str = PRIMARY_JOIN_KEY
    """The join key of the view's entity: reads name entities by it."""

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

    @property
    def join_keys(self) -> set[str]:
        return {spec.join_key for spec in self.features}

    def resolve(self, refs: Sequence[str], join_key: str = PRIMARY_JOIN_KEY) -> list[FeatureSpec]:
        """The specs of ``refs`` in order (all features of ``join_key``'s entity when empty);
        RequestError if one is unknown or belongs to another entity."""
        if join_key not in self.join_keys:
            known = ", ".join(sorted(self.join_keys)) or "none"
            raise RequestError("join_key", f"no view has join key {shown(join_key)} ({known})")
        if not refs:
            return [spec for spec in self.features if spec.join_key == join_key]
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
            if spec.join_key != join_key:
                raise RequestError(
                    f"feature_refs[{i}]",
                    f"{shown(ref)} is keyed by {spec.join_key}, not {shown(join_key)}",
                )
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
