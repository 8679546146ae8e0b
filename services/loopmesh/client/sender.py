"""Buffered, producer-style sending: ``await sender.send(item)`` returns at once with the
item's event id, and a background task sends what accumulated in batches.

A batch goes when it holds ``batch.max_items`` items, when its oldest item has waited
``batch.linger_s``, or when ``flush()``/``close()`` ask for it; one batch is in flight at a
time, so items are delivered in the order they were sent. Each batch is one ``ingest`` (or
``submit_many``) call with its retries, the event ids fixed at ``send``.

Memory is bounded: at most ``batch.buffer_items`` items are held, waiting or in flight, and
``send`` waits for room beyond that (backpressure) instead of growing the buffer.

Failures do not surface in ``send`` (the item was only queued). ``flush()`` and ``close()``
raise ``DeliveryError`` when batches failed since the last flush (after their retries), with
the first error and the undelivered event ids. Items the door refused as invalid are
answered, not failed: they are counted in ``stats``, logged, and passed to ``on_delivery``
with every batch's ``BatchResult``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from loopmesh.client.config import BatchPolicy
from loopmesh.client.errors import CallError, ClientClosedError, DeliveryError
from loopmesh.client.types import BatchResult

log = logging.getLogger(__name__)

MAX_REPORTED_IDS = 10_000
"""Undelivered event ids a ``DeliveryError`` lists at most (it counts them all)."""


class Identified(Protocol):
    """Anything with an event id (the protobuf messages a sender batches)."""

    @property
    def event_id(self) -> str: ...


L = TypeVar("L")
M = TypeVar("M", bound=Identified)


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of one batch of a sender: its result, or the error that stopped it."""

    event_ids: tuple[str, ...]
    result: BatchResult | None
    error: Exception | None


@dataclass(slots=True)
class SenderStats:
    """Counts since the sender started."""

    sent: int = 0
    """Items given to ``send``."""
    accepted: int = 0
    """Written to Kafka."""
    duplicates: int = 0
    """Already written under the same event id (not written again)."""
    rejected: int = 0
    """Refused by the door as invalid."""
    failed: int = 0
    """In batches that failed after their retries."""


class AsyncSender(Generic[L, M]):
    """Batches items of one kind into calls of ``deliver`` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        deliver: Callable[[Sequence[M]], Awaitable[BatchResult]],
        convert: Callable[[L], M],
        policy: BatchPolicy,
        *,
        on_delivery: Callable[[Delivery], None] | None = None,
    ) -> None:
        self.name = name
        self.stats = SenderStats()
        self.on_delivery = on_delivery
        """Called on the event loop with every batch's ``Delivery``; keep it quick."""
        self._deliver = deliver
        self._convert = convert
        self._policy = policy
        self._buffer: deque[M] = deque()
        self._pending = 0  # buffered + in flight
        self._enqueued = 0  # items ever buffered
        self._taken = 0  # items ever taken into a batch
        self._done = 0  # items whose batch finished
        self._flush_to = 0  # a flush waits for ``_done`` to reach this
        self._oldest_at: float | None = None
        self._room = asyncio.Condition()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._errors: list[Exception] = []
        self._failed_ids: list[str] = []
        self._failed_count = 0

    @property
    def pending(self) -> int:
        """Items buffered or in flight."""
        return self._pending

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, item: L) -> str:
        """Queue ``item``; returns its event id (assigned now when it had none). Waits while
        the sender holds ``buffer_items`` items; raises ``ClientClosedError`` once closed."""
        message = self._convert(item)
        capacity = self._policy.buffer_items
        while self._pending >= capacity and not self._closed:
            async with self._room:
                await self._room.wait_for(lambda: self._pending < capacity or self._closed)
        if self._closed:
            raise ClientClosedError(f"the {self.name} sender is closed")
        self._pending += 1
        self._enqueued += 1
        self.stats.sent += 1
        first = not self._buffer
        if first:
            self._oldest_at = asyncio.get_running_loop().time()
        self._buffer.append(message)
        if first or len(self._buffer) >= self._policy.max_items:
            self._wake.set()  # an idle task starts the linger clock; a full batch goes now
        self._ensure_running()
        return message.event_id

    async def flush(self) -> None:
        """Send everything queued so far now and wait until it is delivered or failed;
        ``DeliveryError`` when batches failed since the last flush."""
        target = self._enqueued
        if self._done < target:
            self._flush_to = max(self._flush_to, target)
            self._wake.set()
            self._ensure_running()
            async with self._room:
                await self._room.wait_for(lambda: self._done >= target or self._task_gone())
        self._raise_failures()

    async def close(self) -> None:
        """Refuse further items, deliver what is queued, stop; ``DeliveryError`` as ``flush``."""
        if not self._closed:
            self._closed = True
            async with self._room:
                self._room.notify_all()  # senders waiting for room give up
        if self._buffer:
            self._ensure_running()
        self._flush_to = self._enqueued
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._raise_failures()

    # -- the background task ------------------------------------------------------------------

    def _task_gone(self) -> bool:
        return self._task is None or self._task.done()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"loopmesh-client-{self.name}-sender"
            )

    def _due_in(self, now: float) -> float:
        """Seconds until the buffered items are to be sent (0: now)."""
        if len(self._buffer) >= self._policy.max_items or self._closed:
            return 0.0
        if self._taken < self._flush_to:
            return 0.0
        oldest = self._oldest_at if self._oldest_at is not None else now
        return max(0.0, oldest + self._policy.linger_s - now)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._buffer:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = self._due_in(loop.time())
            if wait > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            count = min(len(self._buffer), self._policy.max_items)
            batch = [self._buffer.popleft() for _ in range(count)]
            self._taken += count
            # What stays has waited since now at least; it goes after its own linger.
            self._oldest_at = loop.time() if self._buffer else None
            await self._send_batch(batch)
            self._pending -= count
            self._done += count
            async with self._room:
                self._room.notify_all()

    async def _send_batch(self, batch: list[M]) -> None:
        ids = tuple(m.event_id for m in batch)
        try:
            result = await self._deliver(batch)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a CallError after retries, or the client closing under us
            self._failed(ids, err)
            self._report(Delivery(ids, None, err))
            return
        stats = self.stats
        stats.accepted += result.accepted
        stats.duplicates += result.duplicates
        stats.rejected += result.rejected
        if result.rejected:
            first = result.refused[0]
            log.warning(
                "%s: %d of %d items refused by the door; first: %s: %s",
                self.name,
                result.rejected,
                len(batch),
                first.field,
                first.reason,
            )
        self._report(Delivery(ids, result, None))

    def _failed(self, ids: tuple[str, ...], err: Exception) -> None:
        self.stats.failed += len(ids)
        self._errors.append(err)
        del self._errors[1:]  # the first one is reported
        self._failed_count += len(ids)
        room = MAX_REPORTED_IDS - len(self._failed_ids)
        self._failed_ids.extend(ids[: max(0, room)])
        if isinstance(err, CallError):
            log.warning("%s: %d items not delivered: %s", self.name, len(ids), err)
        else:
            log.warning("%s: %d items not delivered", self.name, len(ids), exc_info=err)

    def _report(self, delivery: Delivery) -> None:
        if self.on_delivery is None:
            return
        try:
            self.on_delivery(delivery)
        except Exception:
            log.exception("%s: on_delivery raised", self.name)

    def _raise_failures(self) -> None:
        if self._task is not None and self._task.done() and not self._task.cancelled():
            crashed = self._task.exception()
            if crashed is not None:
                raise crashed
        if not self._failed_count:
            return
        first = self._errors[0]
        count, ids = self._failed_count, self._failed_ids
        self._errors, self._failed_ids, self._failed_count = [], [], 0
        raise DeliveryError(first, count, ids)
