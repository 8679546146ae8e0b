"""Stream shaping for request streams: micro-batching and ordered, pipelined handling.

``micro_batches`` groups what a stream has ready, without waiting to fill a batch;
``pipelined`` handles several batches at once and yields their results in order, also while
the source is idle, so a bidirectional stream never holds back an answer its client awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _End:
    """Marks the end of a source in ``micro_batches``, with the error that ended it."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


async def _close(source: object) -> None:
    # Async generators left suspended are only finalised by the GC; close them now.
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


async def micro_batches(source: AsyncIterator[T], max_items: int) -> AsyncGenerator[list[T], None]:
    """Group what ``source`` has ready into lists of at most ``max_items``.

    Never waits to fill a batch: under load items pile up while the previous batch is being
    written, so batches grow by themselves; a lone item goes out at once.
    """
    queue: asyncio.Queue[T | _End] = asyncio.Queue(maxsize=max_items)

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put(item)
        except Exception as err:
            await queue.put(_End(err))
        else:
            await queue.put(_End(None))
        finally:
            await _close(source)

    reader = asyncio.create_task(pump())
    try:
        end: _End | None = None
        while end is None:
            first = await queue.get()
            if isinstance(first, _End):
                end = first
                break
            batch = [first]
            while len(batch) < max_items and not queue.empty():
                ready = queue.get_nowait()
                if isinstance(ready, _End):
                    end = ready
                    break
                batch.append(ready)
            yield batch
        if end.error is not None:
            raise end.error
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


_DONE = _End(None)


async def pipelined(
    batches: AsyncIterator[T], handle: Callable[[T], Awaitable[R]], max_in_flight: int
) -> AsyncGenerator[R, None]:
    """``handle`` each batch with up to ``max_in_flight`` running at once; results in order.

    Results are yielded as soon as they are ready, also while the source waits for more input,
    so a client that waits for an answer before sending on is never stalled. A failure (of
    ``handle`` or of the source) surfaces in order, after the results before it: it then
    cancels the batches still running and propagates.
    """

    async def next_batch() -> T | _End:
        try:
            return await anext(batches)
        except StopAsyncIteration:
            return _DONE
        except Exception as err:
            # Raised once the batches before it are answered, in order.
            return _End(err)

    upcoming: asyncio.Task[T | _End] | None = asyncio.create_task(next_batch())
    in_flight: deque[asyncio.Task[R]] = deque()
    end = _DONE
    try:
        while upcoming is not None or in_flight:
            waiting: set[asyncio.Future[Any]] = set()
            if upcoming is not None and len(in_flight) < max_in_flight:
                waiting.add(upcoming)
            if in_flight:
                waiting.add(in_flight[0])
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            while in_flight and in_flight[0].done():
                yield in_flight.popleft().result()
            if upcoming is not None and upcoming.done() and len(in_flight) < max_in_flight:
                batch = upcoming.result()
                if isinstance(batch, _End):
                    upcoming, end = None, batch
                else:
                    in_flight.append(asyncio.create_task(_call(handle, batch)))
                    upcoming = asyncio.create_task(next_batch())
        if end.error is not None:
            raise end.error
    finally:
        pending = [*in_flight, *([upcoming] if upcoming is not None else [])]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await _close(batches)


async def _call(handle: Callable[[T], Awaitable[R]], batch: T) -> R:
    return await handle(batch)
