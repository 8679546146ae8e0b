"""Coalescing of concurrent calls into one downstream call (micro-batching), only when it pays.

A lone caller is sent at once: waiting would only add latency. While ``max_inflight`` batches
are already out, new items queue and leave together when one of those returns (the usual
case under load) or when the oldest has waited ``max_delay`` (the bound), or as soon as
``max_size`` items are queued. Under load this turns N small calls into a few large ones;
idle, it costs nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - an item, as in the type parameter names of the docs
R = TypeVar("R")

FlushFn = Callable[[Sequence[I]], Awaitable[Sequence[R]]]


class Coalescer(Generic[I, R]):
    """``submit(item)`` returns ``flush([...items])[i]`` for that item.

    ``flush`` must return one result per item, in order; if it raises, every item of that
    batch gets the exception.
    """

    def __init__(
        self,
        flush: FlushFn[I, R],
        *,
        max_size: int,
        max_delay_s: float,
        max_inflight: int,
    ) -> None:
        if max_size < 1 or max_inflight < 1 or max_delay_s < 0:
            raise ValueError("max_size and max_inflight must be >= 1, max_delay_s >= 0")
        self._flush = flush
        self._max_size = max_size
        self._max_delay = max_delay_s
        self._max_inflight = max_inflight
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._inflight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.items = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    async def submit(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._inflight < self._max_inflight or len(self._pending) >= self._max_size:
            self._launch()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._max_delay, self._launch)
        return await future

    def _launch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch = self._pending[: self._max_size]
        del self._pending[: self._max_size]
        self._inflight += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._pending and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._max_delay, self._launch)

    async def _run(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            results = await self._flush([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"flush returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        except BaseException:  # cancelled (shutdown): the waiters must not hang
            for _, future in batch:
                future.cancel()
            raise
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # the caller may have gone (deadline, cancel)
                    future.set_result(result)
        finally:
            self._inflight -= 1
            if self._pending:
                self._launch()

    async def close(self) -> None:
        """Wait for batches in flight; queued items are sent first."""
        self._launch()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
