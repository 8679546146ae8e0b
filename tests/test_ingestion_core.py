"""Pure logic of the intake doors: dedupe window, submit outcomes, stream shaping, pseudonyms.

The publisher here is a fake on purpose: these tests pin down the core's bookkeeping when
writes succeed, fail or hang, which a real broker cannot be told to do on cue.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import SecretStr, ValidationError

from loopmesh.features.settings import FeaturesScope
from loopmesh.ingestion.core import ingestion_intake, normalise_event_type
from loopmesh.ingestion.settings import IngestionScope
from loopmesh.mesh.events import InteractionEvent
from loopmesh.mesh.intake import (
    DedupeWindow,
    Intake,
    IntakeLimits,
    Item,
    Refusal,
    Unavailable,
)
from loopmesh.mesh.intake_server import to_datetime
from loopmesh.mesh.pipeline import micro_batches, pipelined
from loopmesh.mesh.privacy import EntityIdMapper, PrivacySettings, pseudonymise


class FakePublisher:
    """Records what it is asked to write; fails or holds writes when told to."""

    def __init__(self) -> None:
        self.events: list[InteractionEvent] = []
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def publish(self, events: Sequence[InteractionEvent]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise Unavailable("broker away")
        self.events.extend(events)

    @property
    def written(self) -> list[str]:
        return [e.event_id for e in self.events]


def item(index: int, event_id: str, **fields: object) -> Item:
    data: dict[str, object] = {"event_id": event_id, "entity_id": "u1", "event_type": "click"}
    data.update(fields)
    return Item(index, data)


def make_intake(publisher: FakePublisher, *, key: str | None = None) -> Intake[InteractionEvent]:
    privacy = PrivacySettings(
        pseudonymise_entity_ids=key is not None,
        entity_id_key=SecretStr(key) if key is not None else None,
    )
    return ingestion_intake(
        publisher, IntakeLimits(max_abs_value=1000), DedupeWindow(100, 60), EntityIdMapper(privacy)
    )


async def test_window_remembers_ids_by_age_and_count() -> None:
    now = [0.0]
    window = DedupeWindow(max_ids=3, seconds=10, clock=lambda: now[0])
    write = asyncio.get_running_loop().create_future()
    window.evict()
    assert window.claim("a", write) is None
    assert window.claim("a", write) is write  # the second claimant follows the first write
    for name in "bcd":
        assert window.claim(name, write) is None
    window.evict()
    assert len(window) == 3  # "a", the oldest, went first
    assert window.claim("a", write) is None
    now[0] = 11.0
    window.evict()
    assert len(window) == 0


async def test_window_forgets_only_the_failed_writes_ids() -> None:
    window = DedupeWindow(max_ids=10, seconds=10)
    loop = asyncio.get_running_loop()
    failed, other = loop.create_future(), loop.create_future()
    window.claim("x", failed)
    window.claim("y", other)
    window.forget(["x", "y"], failed)
    assert window.claim("x", other) is None  # free again: a retry writes it
    assert window.claim("y", failed) is other


async def test_submit_reports_each_item_and_writes_one_copy_of_each_id() -> None:
    publisher = FakePublisher()
    intake = make_intake(publisher)
    outcomes = await intake.submit(
        [
            item(0, "e1", event_type="Page View"),
            item(1, "e1"),
            item(2, "e2", numeric={"price": 5000.0}),
            item(3, "e3", entity_id=""),
            Item(4, {}, refusal=Refusal("event_time", "not a valid timestamp")),
        ]
    )
    assert [(o.index, o.status, o.field) for o in outcomes] == [
        (0, "accepted", ""),
        (1, "duplicate", ""),
        (2, "rejected", "events[2].numeric.price"),
        (3, "rejected", "events[3].entity_id"),
        (4, "rejected", "events[4].event_time"),
    ]
    assert publisher.written == ["e1"]
    again = await intake.submit([item(0, "e1")])
    assert again[0].status == "duplicate" and again[0].reason == "duplicate"
    assert publisher.written == ["e1"]


async def test_failed_write_is_not_remembered_so_the_retry_writes() -> None:
    publisher = FakePublisher()
    intake = make_intake(publisher)
    publisher.fail = True
    with pytest.raises(Unavailable):
        await intake.submit([item(0, "e1")])
    publisher.fail = False
    outcomes = await intake.submit([item(0, "e1")])
    assert outcomes[0].status == "accepted"
    assert publisher.written == ["e1"]


async def test_a_copy_sent_while_the_first_is_in_flight_shares_its_fate() -> None:
    publisher = FakePublisher()
    intake = make_intake(publisher)
    publisher.gate = asyncio.Event()
    first = asyncio.create_task(intake.submit([item(0, "e1")]))
    second = asyncio.create_task(intake.submit([item(0, "e1")]))
    await asyncio.sleep(0)
    assert not second.done()  # waits for the first write instead of writing again
    publisher.gate.set()
    assert (await first)[0].status == "accepted"
    assert (await second)[0].status == "duplicate"
    assert publisher.written == ["e1"]

    # When the first copy's write fails, the follower cannot claim it was written.
    publisher.gate, publisher.fail = asyncio.Event(), True
    first = asyncio.create_task(intake.submit([item(0, "e2")]))
    second = asyncio.create_task(intake.submit([item(0, "e2")]))
    await asyncio.sleep(0)
    publisher.gate.set()
    for task in (first, second):
        with pytest.raises(Unavailable):
            await task


async def test_cancelled_submit_leaves_no_trace_in_the_window() -> None:
    publisher = FakePublisher()
    intake = make_intake(publisher)
    publisher.gate = asyncio.Event()
    pending = asyncio.create_task(intake.submit([item(0, "e1")]))
    await asyncio.sleep(0)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    publisher.gate.set()
    assert (await intake.submit([item(0, "e1")]))[0].status == "accepted"


async def test_pseudonymised_ids_are_keyed_hmacs_of_the_trimmed_id() -> None:
    key = "k" * 32
    publisher = FakePublisher()
    intake = make_intake(publisher, key=key)
    await intake.submit([item(0, "e1", entity_id="  alice ")])
    expected = hmac.new(key.encode(), b"alice", hashlib.sha256).hexdigest()
    assert publisher.events[0].entity_id == expected == pseudonymise(" alice", SecretStr(key))
    assert EntityIdMapper(PrivacySettings())("alice") == "alice"
    with pytest.raises(ValidationError, match="entity_id_key"):
        PrivacySettings(pseudonymise_entity_ids=True, entity_id_key=SecretStr("short"))


def test_event_types_get_one_spelling() -> None:
    assert normalise_event_type(" Add to-Cart ") == "add_to_cart"
    assert normalise_event_type("page\tview") == "page_view"
    assert normalise_event_type("click") == "click"


def test_timestamps_outside_the_protobuf_range_are_refused() -> None:
    assert isinstance(to_datetime(Timestamp(seconds=2**40)), Refusal)
    assert isinstance(to_datetime(Timestamp(seconds=0, nanos=-1)), Refusal)
    when = datetime(2026, 1, 2, tzinfo=UTC)
    stamp = Timestamp()
    stamp.FromDatetime(when)
    assert to_datetime(stamp) == when


async def test_pipelined_keeps_order_and_answers_while_the_source_idles() -> None:
    source: asyncio.Queue[int] = asyncio.Queue()
    running: list[int] = []
    peak = 0

    async def batches() -> AsyncIterator[int]:
        while (value := await source.get()) >= 0:
            yield value

    async def handle(value: int) -> int:
        nonlocal peak
        running.append(value)
        peak = max(peak, len(running))
        await asyncio.sleep(0.01 * (3 - value % 3))  # later batches finish first
        running.remove(value)
        return value * 10

    results = pipelined(batches(), handle, max_in_flight=2)
    source.put_nowait(1)
    # Answered although no further batch (and no end) has arrived.
    assert await asyncio.wait_for(anext(results), 5) == 10
    for value in range(2, 8):
        source.put_nowait(value)
    source.put_nowait(-1)
    assert [r async for r in results] == [v * 10 for v in range(2, 8)]
    assert peak == 2


async def test_pipelined_failure_cancels_the_rest_and_propagates() -> None:
    started: list[int] = []
    cancelled: list[int] = []

    async def batches() -> AsyncIterator[int]:
        for value in range(10):
            yield value

    async def handle(value: int) -> int:
        started.append(value)
        try:
            await asyncio.sleep({0: 0.05, 1: 0.1}.get(value, 30))
            if value == 1:
                raise Unavailable("down")
        except asyncio.CancelledError:
            cancelled.append(value)
            raise
        return value

    results: list[int] = []
    with pytest.raises(Unavailable):
        async for result in pipelined(batches(), handle, max_in_flight=3):
            results.append(result)
    assert results == [0]  # what came before the failure is still answered
    assert started[:3] == [0, 1, 2]
    assert 2 in cancelled and 0 not in cancelled and 1 not in cancelled


async def test_pipelined_answers_earlier_batches_before_a_source_error() -> None:
    async def batches() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise ValueError("batch 3 is too large")

    async def handle(value: int) -> int:
        await asyncio.sleep(0.05)  # still running when the source fails
        return value

    results: list[int] = []
    with pytest.raises(ValueError, match="too large"):
        async for result in pipelined(batches(), handle, max_in_flight=4):
            results.append(result)
    assert results == [1, 2]


async def test_micro_batches_group_what_is_ready_and_pass_errors_on() -> None:
    gate = asyncio.Event()

    async def source() -> AsyncIterator[int]:
        yield 0
        await gate.wait()
        for value in range(1, 8):
            yield value
        raise RuntimeError("client went away")

    batches = micro_batches(source(), max_items=3)
    assert await anext(batches) == [0]  # a lone item goes at once
    gate.set()
    await asyncio.sleep(0.01)  # let the reader queue what the source has
    assert await anext(batches) == [1, 2, 3]
    assert await anext(batches) == [4, 5, 6]
    assert await anext(batches) == [7]
    with pytest.raises(RuntimeError, match="client went away"):
        await anext(batches)


def test_limits_have_documented_defaults() -> None:
    limits = IntakeLimits()
    window = limits.time_window()
    assert window.max_future == timedelta(minutes=5)
    assert window.max_age == timedelta(days=30)


def test_the_ingestion_door_refuses_what_no_view_would_count() -> None:
    # Issue 20: the door accepted events 30 days old that the features, with their default
    # allowed lateness, never counted.
    door = IngestionScope().limits.time_window().max_age
    assert door == timedelta(seconds=FeaturesScope().allowed_lateness_s)
    assert door < IntakeLimits().time_window().max_age  # feedback keeps the longer window
