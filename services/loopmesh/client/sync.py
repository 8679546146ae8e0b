"""``Client``: the blocking LoopMesh client, for scripts, threads and other code without an
event loop.

It wraps ``AsyncClient`` and runs it on an event loop of its own, in one daemon thread the
client starts and stops; each method hands its call to that loop and blocks until it is done.
The caller's thread never gets or needs an event loop, so the client works the same from a
plain script, from many threads at once (calls are independent; the buffered senders are
shared and keep each thread's order), and from inside code that runs its own loop (it blocks
that loop's thread while it waits, as any blocking call does).

Callbacks (``on_delivery``) run on the client's thread: keep them quick and do not call the
client from them. Call ``close()`` (or use ``with``): it delivers what the senders hold and
stops the thread; a client never closed loses what its senders still held at exit.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Generic, TypeVar

from loopmesh.client.aio import AsyncClient
from loopmesh.client.config import ClientConfig
from loopmesh.client.errors import ClientClosedError
from loopmesh.client.sender import AsyncSender, Delivery, Identified, SenderStats
from loopmesh.client.types import (
    BatchResult,
    EventLike,
    FeedbackLike,
    Prediction,
    StreamResult,
    SubmitResult,
)
from loopmesh.gen.loopmesh.v1 import feedback_pb2, ingestion_pb2

T = TypeVar("T")
L = TypeVar("L")
M = TypeVar("M", bound=Identified)


class _LoopThread:
    """An event loop running in a daemon thread, and a way to run coroutines on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError(
                "a blocking LoopMesh client was called from its own thread (a callback?)"
            )
        if not self.running:
            coroutine.close()
            raise ClientClosedError("the client is closed")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: stop the call, not only the wait
            raise

    def stop(self) -> None:
        if self.running:
            self.run(self.loop.shutdown_asyncgens())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        if not self.loop.is_closed():
            self.loop.close()


class SyncSender(Generic[L, M]):
    """The blocking face of a buffered sender (``loopmesh.client.sender``)."""

    def __init__(self, runner: _LoopThread, sender: AsyncSender[L, M]) -> None:
        self._runner = runner
        self._sender = sender

    def send(self, item: L) -> str:
        """Queue ``item``; returns its event id. Blocks while the buffer is full."""
        return self._runner.run(self._sender.send(item))

    def flush(self) -> None:
        """Deliver everything queued so far; ``DeliveryError`` when batches failed."""
        self._runner.run(self._sender.flush())

    def close(self) -> None:
        self._runner.run(self._sender.close())

    @property
    def stats(self) -> SenderStats:
        return self._sender.stats

    @property
    def pending(self) -> int:
        return self._sender.pending


class Client:
    """The blocking client: the methods of ``AsyncClient``, each returning its result.

    ``Client(config)`` or ``Client(ingestion_url=..., token=...)``; the rest of the
    configuration from ``LOOPMESH_CLIENT__*``.
    """

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        on_delivery: Callable[[Delivery], None] | None = None,
        **fields: Any,
    ) -> None:
        # Built (and validated) here, in the caller's thread, so errors surface at once.
        self._client = AsyncClient(config, on_delivery=on_delivery, **fields)
        self._runner = _LoopThread("loopmesh-client")
        self._events: SyncSender[EventLike, ingestion_pb2.InteractionEvent] | None = None
        self._feedback: SyncSender[FeedbackLike, feedback_pb2.Feedback] | None = None
        self._lock = threading.Lock()

    @property
    def config(self) -> ClientConfig:
        return self._client.config

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_error:
            exc.add_note(f"closing the LoopMesh client also failed: {close_error}")

    def ingest(self, events: Iterable[EventLike], *, timeout: float | None = None) -> BatchResult:
        """See ``AsyncClient.ingest``."""
        return self._runner.run(self._client.ingest(events, timeout=timeout))

    def ingest_stream(
        self, events: Iterable[EventLike], *, timeout: float | None = None
    ) -> StreamResult:
        """See ``AsyncClient.ingest_stream``; ``events`` is read in a worker thread."""
        return self._runner.run(self._client.ingest_stream(events, timeout=timeout))

    def submit(self, feedback: FeedbackLike, *, timeout: float | None = None) -> SubmitResult:
        """See ``AsyncClient.submit``."""
        return self._runner.run(self._client.submit(feedback, timeout=timeout))

    def submit_many(
        self, feedback: Iterable[FeedbackLike], *, timeout: float | None = None
    ) -> BatchResult:
        """See ``AsyncClient.submit_many``."""
        return self._runner.run(self._client.submit_many(feedback, timeout=timeout))

    def predict(
        self,
        entity_id: str,
        *,
        context: Mapping[str, float] | None = None,
        model_name: str = "",
        model_version: int | str | None = None,
        request_id: str = "",
        timeout: float | None = None,
        categorical: Mapping[str, str] | None = None,
    ) -> Prediction:
        """See ``AsyncClient.predict``."""
        return self._runner.run(
            self._client.predict(
                entity_id,
                context=context,
                model_name=model_name,
                model_version=model_version,
                request_id=request_id,
                timeout=timeout,
                categorical=categorical,
            )
        )

    @property
    def events(self) -> SyncSender[EventLike, ingestion_pb2.InteractionEvent]:
        """The buffered event sender: ``client.events.send(event)``, then ``flush()``."""
        with self._lock:
            if self._events is None:
                self._events = SyncSender(self._runner, self._runner.run(_get_events(self._client)))
            return self._events

    @property
    def feedback(self) -> SyncSender[FeedbackLike, feedback_pb2.Feedback]:
        """The buffered feedback sender: ``client.feedback.send(Feedback(...))``."""
        with self._lock:
            if self._feedback is None:
                self._feedback = SyncSender(
                    self._runner, self._runner.run(_get_feedback(self._client))
                )
            return self._feedback

    def flush(self) -> None:
        """Flush both buffered senders (``DeliveryError`` when batches failed)."""
        self._runner.run(self._client.flush())

    @property
    def closed(self) -> bool:
        return not self._runner.running

    def close(self) -> None:
        """Deliver what the senders hold, close the channels and stop the client's thread;
        raises the senders' ``DeliveryError`` after all that, when batches failed."""
        if not self._runner.running:
            return
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.stop()


# The senders' asyncio parts are made on the client's loop.


async def _get_events(
    client: AsyncClient,
) -> AsyncSender[EventLike, ingestion_pb2.InteractionEvent]:
    return client.events


async def _get_feedback(client: AsyncClient) -> AsyncSender[FeedbackLike, feedback_pb2.Feedback]:
    return client.feedback
