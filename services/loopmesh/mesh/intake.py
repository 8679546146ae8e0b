"""The shared core of the intake doors (ingestion, feedback): validate, clean, dedupe, write.

Transport-agnostic. An adapter turns each incoming message into an ``Item`` (a dict of model
fields and where it sat in the request); ``Intake.submit`` validates every item with the event
model of ``loopmesh.mesh.events`` (the one validation, whatever the door), applies the door's
cleaning and range rules, drops exact duplicates of recently written event ids, hands the rest
to a ``Publisher`` and returns one ``Outcome`` per item once the publisher confirmed that the
accepted ones are durable. When it cannot confirm, ``submit`` raises ``Unavailable`` and reports
nothing as written: the caller tells its client to retry, and the event ids make that harmless.

``loopmesh.mesh.pipeline`` shapes streams into batches for ``submit``.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, Field, ValidationError

from loopmesh.mesh.errors import Unavailable
from loopmesh.mesh.events import Event
from loopmesh.mesh.telemetry import tracer

E = TypeVar("E", bound=Event)
E_contra = TypeVar("E_contra", bound=Event, contravariant=True)

ItemStatus = Literal["accepted", "duplicate", "rejected"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an item is refused; ``field`` is relative to the item (empty: the item as a whole)."""

    field: str
    reason: str


@dataclass(slots=True)
class Item:
    """One incoming event before validation."""

    index: int
    """Position in the request (or in the stream)."""
    data: dict[str, Any]
    """Model fields as the client sent them; ``event_id`` left out means "assign one".
    Owned by the item: cleaning may change it in place."""
    refusal: Refusal | None = None
    """Set when the adapter already could not convert the message."""


@dataclass(slots=True)
class Outcome:
    """What became of one item."""

    index: int
    event_id: str
    status: ItemStatus
    field: str = ""
    reason: str = ""

    @property
    def accepted(self) -> bool:
        """Durable in the event store (written now, or earlier under the same id)."""
        return self.status != "rejected"


class Publisher(Protocol[E_contra]):
    """Where accepted events go; returns only once all of them are durable."""

    async def publish(self, events: Sequence[E_contra]) -> None:
        """Write ``events``; raise ``Unavailable`` when that cannot be confirmed."""


Rule = Callable[[E], Refusal | None]
"""A door-specific check of a valid event (ranges the model cannot know)."""


class DedupeWindow:
    """Event ids written recently (bounded in count and age), and the ones being written now.

    The first claimant of an id owns its write and resolves that write's future with whether
    Kafka acknowledged it; later claimants follow the future instead of writing again. An id
    counts as written only after the acknowledgement, so a failed write never turns its retry
    into a "duplicate" of something that was never stored.
    """

    def __init__(
        self, max_ids: int, seconds: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_ids = max_ids
        self.seconds = seconds
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, asyncio.Future[bool]]] = OrderedDict()
        self._now = clock()

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, event_id: str, write: asyncio.Future[bool]) -> asyncio.Future[bool] | None:
        """None when the caller now owns ``event_id``'s write (resolved through ``write``);
        else the future of the write that owns it."""
        entry = self._entries.get(event_id)
        if entry is not None:
            return entry[1]
        self._entries[event_id] = (self._now, write)
        return None

    def forget(self, event_ids: Iterable[str], write: asyncio.Future[bool]) -> None:
        """Drop the ids a failed ``write`` owned, so their retry writes again."""
        for event_id in event_ids:
            entry = self._entries.get(event_id)
            if entry is not None and entry[1] is write:
                del self._entries[event_id]

    def evict(self) -> None:
        """Forget ids beyond the window's age and size; called once per batch (cheaper)."""
        self._now = now = self._clock()
        horizon = now - self.seconds
        entries = self._entries
        while entries:
            oldest = next(iter(entries.values()))
            if len(entries) <= self.max_ids and oldest[0] >= horizon:
                break
            entries.popitem(last=False)


EVENT_LATENESS_S = 24 * 3600.0
"""How old an interaction event may be and still count: the ingestion door's default max age
and the features' default allowed lateness are this one figure, so the door refuses (with a
reason) what the features would not fold, instead of acknowledging it."""


@dataclass(frozen=True)
class TimeWindow:
    """Accepted event times relative to the server's clock."""

    max_future: timedelta
    max_age: timedelta


class IntakeLimits(BaseModel):
    """Ranges a door accepts beyond what the event model checks."""

    max_batch_items: int = Field(default=10_000, ge=1)
    """Events in one request (or one stream message); more is RESOURCE_EXHAUSTED."""
    max_attributes: int = Field(default=256, ge=0)
    """Attributes per event; bounds an event's size well below Kafka's message limit."""
    max_abs_value: float = Field(default=1e12, gt=0)
    """Largest magnitude of a number (attribute, reward, value); beyond it is a unit or overflow
    bug."""
    max_future_seconds: float = Field(default=300.0, ge=0)
    """How far an event time may lie ahead of the server's clock (client clock skew)."""
    max_age_seconds: float = Field(default=30 * 24 * 3600.0, gt=0)
    """How old an event time may be; older events are refused as out of range."""

    def time_window(self) -> TimeWindow:
        return TimeWindow(
            timedelta(seconds=self.max_future_seconds), timedelta(seconds=self.max_age_seconds)
        )


class DedupeSettings(BaseModel):
    """The window of recently written event ids whose exact repeats are dropped."""

    max_ids: int = Field(default=100_000, ge=1)
    """Ids remembered at most (oldest forgotten first); roughly 250 bytes of memory each."""
    seconds: float = Field(default=600.0, gt=0)
    """How long an id is remembered."""

    def window(self) -> DedupeWindow:
        return DedupeWindow(self.max_ids, self.seconds)


@dataclass
class Intake(Generic[E]):
    """Validates, cleans, deduplicates and publishes one kind of event."""

    name: str
    model: type[E]
    publisher: Publisher[E]
    window: DedupeWindow
    time_window: TimeWindow
    path: Callable[[int], str]
    """The path of the item with a given index in its request, e.g. ``events[3]``: refused
    fields are named from there (a function, so only refusals pay for the string)."""
    clean: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """Repairs what can be repaired before validation (normalising spellings, trimming)."""
    rules: Sequence[Rule[E]] = ()
    transform: Callable[[E], E] | None = None
    """Applied to valid events before deduplication and writing (e.g. pseudonymising ids)."""
    _tracer: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._tracer = tracer(f"loopmesh.{self.name}.intake")

    def check(self, item: Item, bounds: tuple[datetime, datetime]) -> E | Refusal:
        """The item as a valid, cleaned event, or the reason it is refused.

        ``bounds`` is the accepted event time range, ``self.time_window`` around now.
        """
        if item.refusal is not None:
            return item.refusal
        data = self.clean(item.data) if self.clean is not None else item.data
        try:
            event = self.model.model_validate(data)
        except ValidationError as err:
            return refusal_from(err)
        refusal = self._check_time(event.event_time, bounds)
        for rule in self.rules:
            if refusal is not None:
                break
            refusal = rule(event)
        if refusal is not None:
            return refusal
        return self.transform(event) if self.transform is not None else event

    async def submit(self, items: Sequence[Item]) -> list[Outcome]:
        """One outcome per item, in order, after the accepted events are durable."""
        outcomes: list[Outcome | None] = [None] * len(items)
        # One future for this batch's write: every id it owns resolves with it.
        write: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        owned: list[tuple[int, E]] = []
        following: list[tuple[int, E, asyncio.Future[bool]]] = []
        now = datetime.now(UTC)
        bounds = (now - self.time_window.max_age, now + self.time_window.max_future)
        self.window.evict()
        with self._tracer.start_as_current_span(f"{self.name} submit") as span:
            try:
                for position, item in enumerate(items):
                    checked = self.check(item, bounds)
                    if isinstance(checked, Refusal):
                        outcomes[position] = self._refused(item, checked)
                        continue
                    earlier = self.window.claim(checked.event_id, write)
                    if earlier is None:
                        owned.append((position, checked))
                    elif earlier.done() and earlier.result():
                        outcomes[position] = _duplicate(item, checked)
                    else:
                        following.append((position, checked, earlier))
                if owned:
                    await self.publisher.publish([event for _, event in owned])
                write.set_result(True)
                for position, event in owned:
                    outcomes[position] = Outcome(items[position].index, event.event_id, "accepted")
                for position, event, earlier in following:
                    # An earlier copy, here or in a concurrent request, bounded by its timeout.
                    if not await asyncio.shield(earlier):
                        raise Unavailable(
                            f"{self.path(items[position].index)}: an earlier copy of event "
                            f"{event.event_id!r} could not be written"
                        )
                    outcomes[position] = _duplicate(items[position], event)
            finally:
                # Whatever went wrong (Kafka, cancellation), this batch's writes are unconfirmed.
                if not write.done():
                    write.set_result(False)
                    self.window.forget((event.event_id for _, event in owned), write)
            done = [o for o in outcomes if o is not None]
            span.set_attribute("loopmesh.intake.items", len(items))
            span.set_attribute("loopmesh.intake.written", len(owned))
            span.set_attribute(
                "loopmesh.intake.rejected", sum(1 for o in done if o.status == "rejected")
            )
        return done

    def _refused(self, item: Item, refusal: Refusal) -> Outcome:
        event_id = item.data.get("event_id", "")
        return Outcome(
            item.index,
            event_id if isinstance(event_id, str) else "",
            "rejected",
            field_path(self.path(item.index), refusal.field),
            refusal.reason,
        )

    def _check_time(
        self, event_time: datetime, bounds: tuple[datetime, datetime]
    ) -> Refusal | None:
        if event_time.tzinfo is None:
            event_time = event_time.replace(tzinfo=UTC)
        oldest, latest = bounds
        if event_time > latest:
            return Refusal(
                "event_time",
                f"{event_time.isoformat()} is more than {self.time_window.max_future} "
                "in the future",
            )
        if event_time < oldest:
            return Refusal(
                "event_time",
                f"{event_time.isoformat()} is older than {self.time_window.max_age} "
                "(the door's limits.max_age_seconds)",
            )
        return None


def refusal_from(err: ValidationError) -> Refusal:
    """The first error of a model validation as a refusal naming its field."""
    first = err.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    reason = first["msg"].removeprefix("Value error, ")
    more = err.error_count() - 1
    if more:
        reason += f" (and {more} more error{'s' if more > 1 else ''})"
    return Refusal(where, reason)


def field_path(path: str, relative: str) -> str:
    return f"{path}.{relative}" if relative else path


def _duplicate(item: Item, event: Event) -> Outcome:
    return Outcome(item.index, event.event_id, "duplicate", "", "duplicate")


def check_magnitude(name: str, value: float | None, limit: float) -> Refusal | None:
    """Refuse a number whose magnitude is beyond ``limit`` (a unit or overflow bug upstream)."""
    if value is not None and abs(value) > limit:
        return Refusal(name, f"{value!r} is out of range (magnitude above {limit:g})")
    return None


def trimmed_values(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    """``mapping`` with its string values trimmed (the same object when none needs it)."""
    for value in mapping.values():
        if isinstance(value, str) and value != value.strip():
            return {k: v.strip() if isinstance(v, str) else v for k, v in mapping.items()}
    return mapping


def check_size(name: str, mapping: Mapping[str, Any], limit: int) -> Refusal | None:
    if len(mapping) > limit:
        return Refusal(name, f"{len(mapping)} entries; at most {limit} are accepted")
    return None
