"""``AsyncClient``: the LoopMesh doors for asyncio applications.

One client holds a channel per door (Ingest, Feedback, Predict), made by the mesh's channel
factory (``loopmesh.mesh.channels``: TLS or mutual TLS, the bearer token, the OpenTelemetry
interceptor, a default deadline) when first used, so a client can be built outside a running
loop. Every call has a deadline (``timeout=``, else the configuration's), is retried under the
retry policy (``loopmesh.client.retry``) and fails with a ``CallError`` subclass.

Events and feedback get their event ids before the first attempt, so a retry resends the same
ids and the doors drop what they already wrote: UNAVAILABLE (or a connection lost after the
door wrote the batch) costs a resend, never a copy in Kafka.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc

from loopmesh.client import retry
from loopmesh.client.batching import request_batches
from loopmesh.client.config import ClientConfig
from loopmesh.client.errors import CallError, ClientClosedError, error_for, from_rpc_error
from loopmesh.client.sender import AsyncSender, Delivery
from loopmesh.client.types import (
    BatchResult,
    EventLike,
    FeedbackLike,
    ItemOutcome,
    Prediction,
    StreamResult,
    SubmitResult,
    as_event,
    as_feedback,
    outcome_of,
    predict_request,
    shifted_field,
)
from loopmesh.gen.loopmesh.v1 import (
    feedback_pb2,
    feedback_pb2_grpc,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
)
from loopmesh.mesh.channels import aio_channel

ACKED_TRAILER = "loopmesh-acked-events"
"""Trailer of an IngestStream that failed: events from the start of that stream the door
durably handled (``loopmesh.mesh.intake_server.ACKED_TRAILER``; not imported, as that module
brings the doors' Kafka producer along)."""

EventSender = AsyncSender[EventLike, ingestion_pb2.InteractionEvent]
FeedbackSender = AsyncSender[FeedbackLike, feedback_pb2.Feedback]


def acked_events(err: grpc.aio.AioRpcError) -> int:
    """The door's ``loopmesh-acked-events`` count of a failed stream; 0 when absent."""
    for key, value in err.trailing_metadata() or ():
        if key == ACKED_TRAILER:
            try:
                return max(0, int(value))
            except ValueError:
                return 0
    return 0


async def windows(
    items: Iterable[EventLike] | AsyncIterable[EventLike], size: int
) -> AsyncIterator[list[EventLike]]:
    """``items`` in lists of at most ``size``; a plain iterable is read in a worker thread,
    so one that blocks does not stop the event loop."""
    if isinstance(items, AsyncIterable):
        chunk: list[EventLike] = []
        async for item in items:
            chunk.append(item)
            if len(chunk) >= size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
        return
    if isinstance(items, Sequence):
        for start in range(0, len(items), size):
            yield list(items[start : start + size])
        return
    iterator = iter(items)
    while chunk := await asyncio.to_thread(lambda: list(itertools.islice(iterator, size))):
        yield chunk


class AsyncClient:
    """Ingest, feedback and Predict over gRPC, with retries, batching and deadlines.

    ``AsyncClient(config)`` or ``AsyncClient(ingestion_url=..., token=...)`` (fields of
    ``ClientConfig``; the rest from ``LOOPMESH_CLIENT__*``). Use it as ``async with`` or call
    ``close()``, which delivers what the buffered senders hold.
    """

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        on_delivery: Callable[[Delivery], None] | None = None,
        **fields: Any,
    ) -> None:
        if config is not None and fields:
            raise TypeError("give a ClientConfig or its fields, not both")
        self.config = config if config is not None else ClientConfig(**fields)
        self._on_delivery = on_delivery
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._events: EventSender | None = None
        self._feedback: FeedbackSender | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
            return
        try:
            await self.close()
        except Exception as close_error:  # the exception in flight matters more
            exc.add_note(f"closing the LoopMesh client also failed: {close_error}")

    # -- channels -----------------------------------------------------------------------------

    def _channel(self, url: str) -> grpc.aio.Channel:
        if self._closed:
            raise ClientClosedError("the client is closed")
        channel = self._channels.get(url)
        if channel is None:
            config = self.config
            channel = aio_channel(
                url,
                config.channel_settings(),
                auth=config.auth(),
                options=config.channel_options(),
                tracing=config.tracing,
            )
            self._channels[url] = channel
        return channel

    def _ingestion(self) -> Any:
        return ingestion_pb2_grpc.IngestionServiceStub(self._channel(self.config.ingestion_url))

    def _feedback_stub(self) -> Any:
        return feedback_pb2_grpc.FeedbackServiceStub(self._channel(self.config.feedback_url))

    def _inference(self) -> Any:
        return inference_pb2_grpc.InferenceServiceStub(self._channel(self.config.inference_url))

    def _deadline(self, timeout: float | None, *, stream: bool = False) -> float:
        if timeout is not None:
            return timeout
        return self.config.stream_deadline_s if stream else self.config.deadline_s

    # -- ingestion ----------------------------------------------------------------------------

    async def ingest(
        self, events: Iterable[EventLike], *, timeout: float | None = None
    ) -> BatchResult:
        """Send ``events`` (``Event`` or ``InteractionEvent``) in requests within the doors'
        batch limit, one after another, each retried on its own; one outcome per event.

        A request the door refuses as a whole (every event invalid: INVALID_ARGUMENT naming
        the first field) stops the call: the ``CallError`` names the field as an index into
        ``events`` and carries the outcomes of the requests before it. Refused events in a
        request with valid ones are outcomes (``result.refused``, ``raise_for_rejected()``).
        No events: an empty result, no call.
        """
        return await self._ingest_messages([as_event(e) for e in events], timeout)

    async def _ingest_messages(
        self, messages: Sequence[ingestion_pb2.InteractionEvent], timeout: float | None = None
    ) -> BatchResult:
        stub = self._ingestion()
        deadline = self._deadline(timeout)
        limits = self.config.batch
        results: list[ItemOutcome] = []
        accepted = rejected = duplicates = 0
        most_attempts = 1
        for offset, batch in request_batches(messages, limits.max_items, limits.max_bytes):
            request = ingestion_pb2.IngestRequest(events=batch)

            def attempt(request: ingestion_pb2.IngestRequest = request) -> Any:
                return stub.Ingest(request, timeout=deadline)

            try:
                reply, attempts = await retry.call(
                    self.config.retry, attempt, method="Ingest", resendable=True
                )
            except CallError as err:
                raise retry.with_context(
                    err, field=shifted_field(err.field, offset), results=results, handled=offset
                ) from err.__cause__
            most_attempts = max(most_attempts, attempts)
            accepted += reply.accepted
            rejected += reply.rejected
            duplicates += reply.duplicates
            results.extend(outcome_of(r, offset) for r in reply.results)
        return BatchResult(accepted, rejected, duplicates, tuple(results), most_attempts)

    async def ingest_stream(
        self,
        events: Iterable[EventLike] | AsyncIterable[EventLike],
        *,
        timeout: float | None = None,
    ) -> StreamResult:
        """Send a long or unbounded run of events over IngestStream.

        The input is read in windows of ``batch.stream_window_items`` events, each sent as
        one IngestStream call (requests within the batch limits) and kept until the door
        answered it. On UNAVAILABLE the door's ``loopmesh-acked-events`` trailer says how many
        of the window it handled, and the rest is resent with the same event ids (without the
        trailer, the whole window is resent: the doors drop what they already wrote). The
        result reports refused and duplicate events only, indexed in the caller's stream;
        ``timeout`` bounds each call (``stream_deadline_s`` by default).
        """
        stub = self._ingestion()
        deadline = self._deadline(timeout, stream=True)
        policy, limits = self.config.retry, self.config.batch
        accepted = rejected = duplicates = unreported = calls = 0
        truncated = False
        reported: list[ItemOutcome] = []
        base = 0  # stream index of the window's first event
        async for window in windows(events, limits.stream_window_items):
            kept = [as_event(e) for e in window]
            done = 0  # events of the window handled by failed calls
            attempts = retry.Attempts(policy, resendable=True)
            while done < len(kept):
                number = attempts.begin()
                calls += 1
                rest = kept[done:]
                requests = [
                    ingestion_pb2.IngestRequest(events=batch)
                    for _, batch in request_batches(rest, limits.max_items, limits.max_bytes)
                ]
                try:
                    reply = await stub.IngestStream(iter(requests), timeout=deadline)
                except grpc.aio.AioRpcError as err:
                    acked = min(acked_events(err), len(rest))
                    if acked:
                        unreported += acked
                        done += acked
                        attempts = retry.Attempts(policy, resendable=True)  # progress
                        attempts.begin()
                    if done >= len(kept):
                        break
                    delay = attempts.next_delay(err.code())
                    if delay is None:
                        failure = from_rpc_error(err, method="IngestStream", attempts=number)
                        offset = base + done - acked
                        raise retry.with_context(
                            failure,
                            field=shifted_field(failure.field, offset),
                            results=reported,
                            handled=base + done,
                        ) from err
                    await asyncio.sleep(delay)
                    continue
                offset = base + done
                accepted += reply.accepted
                rejected += reply.rejected
                duplicates += reply.duplicates
                truncated = truncated or reply.results_truncated
                reported.extend(outcome_of(r, offset) for r in reply.results)
                done = len(kept)
            base += len(kept)
        return StreamResult(
            accepted, rejected, duplicates, tuple(reported), truncated, unreported, max(1, calls)
        )

    @property
    def events(self) -> EventSender:
        """The buffered event sender: ``await client.events.send(event)``, then ``flush()``
        (see ``loopmesh.client.sender``). Closed with the client."""
        if self._closed:
            raise ClientClosedError("the client is closed")
        if self._events is None:
            self._events = AsyncSender(
                "events",
                self._ingest_messages,
                as_event,
                self.config.batch,
                on_delivery=self._on_delivery,
            )
        return self._events

    # -- feedback -----------------------------------------------------------------------------

    async def submit(self, feedback: FeedbackLike, *, timeout: float | None = None) -> SubmitResult:
        """Send one feedback (``Feedback`` or the protobuf message); retried with its event
        id. Invalid feedback raises ``InvalidArgumentError`` naming the field
        (``feedback.label``)."""
        message = as_feedback(feedback)
        request = feedback_pb2.SubmitRequest(feedback=message)
        stub = self._feedback_stub()
        deadline = self._deadline(timeout)
        reply, attempts = await retry.call(
            self.config.retry,
            lambda: stub.Submit(request, timeout=deadline),
            method="Submit",
            resendable=True,
        )
        return SubmitResult(reply.event_id, reply.duplicate, attempts)

    async def submit_many(
        self, feedback: Iterable[FeedbackLike], *, timeout: float | None = None
    ) -> BatchResult:
        """Send many feedback over one SubmitStream; one outcome per item, invalid ones
        refused with their field. Items the door had not answered when a call failed are
        resent (same event ids) under the retry policy."""
        messages = [as_feedback(f) for f in feedback]
        outcomes: list[ItemOutcome | None] = [None] * len(messages)
        todo = list(range(len(messages)))
        stub = self._feedback_stub()
        deadline = self._deadline(timeout, stream=True)
        attempts = retry.Attempts(self.config.retry, resendable=True)
        most = 0
        while todo:
            number = attempts.begin()
            most = max(most, number)
            order = todo
            requests = [feedback_pb2.SubmitStreamRequest(feedback=messages[i]) for i in order]
            answered = 0
            try:
                async for response in stub.SubmitStream(iter(requests), timeout=deadline):
                    result = response.result
                    position = order[result.index]
                    outcomes[position] = ItemOutcome(
                        index=position,
                        event_id=result.event_id,
                        accepted=result.accepted,
                        field=result.field,
                        reason=result.reason,
                    )
                    answered += 1
            except grpc.aio.AioRpcError as err:
                todo = [i for i in order if outcomes[i] is None]
                if not todo:
                    break  # every item was answered before the call broke
                if answered:
                    attempts = retry.Attempts(self.config.retry, resendable=True)  # progress
                    attempts.begin()
                delay = attempts.next_delay(err.code())
                if delay is None:
                    raise retry.with_context(
                        from_rpc_error(err, method="SubmitStream", attempts=number),
                        results=[o for o in outcomes if o is not None],
                        handled=_answered_prefix(outcomes),
                    ) from err
                await asyncio.sleep(delay)
                continue
            todo = [i for i in order if outcomes[i] is None]
            if todo:
                raise error_for(
                    grpc.StatusCode.INTERNAL,
                    f"the stream ended with {len(todo)} items unanswered",
                    method="SubmitStream",
                    attempts=number,
                    results=[o for o in outcomes if o is not None],
                    handled=_answered_prefix(outcomes),
                )
        done = [o for o in outcomes if o is not None]
        return BatchResult(
            accepted=sum(1 for o in done if o.accepted and not o.duplicate),
            rejected=sum(1 for o in done if not o.accepted),
            duplicates=sum(1 for o in done if o.duplicate),
            results=tuple(done),
            attempts=max(1, most),
        )

    @property
    def feedback(self) -> FeedbackSender:
        """The buffered feedback sender: ``await client.feedback.send(Feedback(...))``, then
        ``flush()``. Closed with the client."""
        if self._closed:
            raise ClientClosedError("the client is closed")
        if self._feedback is None:
            self._feedback = AsyncSender(
                "feedback",
                self.submit_many,
                as_feedback,
                self.config.batch,
                on_delivery=self._on_delivery,
            )
        return self._feedback

    # -- inference ----------------------------------------------------------------------------

    async def predict(
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
        """One prediction for ``entity_id`` (``InferenceService.Predict``).

        ``context`` supplies or overrides features by name (finite numbers); ``categorical``
        gives the categorical inputs the model declares (e.g. ``{"country": "FR"}``; a name
        the version does not declare is INVALID_ARGUMENT naming ``categorical.<name>``);
        ``model_name`` empty means the gateway's default model; ``model_version`` pins a
        version, else the rollout's weights choose (sticky by entity id). The answer says the
        version's task: ``score`` (binary: probability; regression: the value) and, for
        multiclass, ``probabilities`` and ``predicted_class``. Retried on UNAVAILABLE only: a
        repeat after a lost answer would log a second prediction.
        """
        request = predict_request(
            entity_id,
            context=context,
            model_name=model_name,
            model_version=model_version,
            request_id=request_id,
            categorical=categorical,
        )
        stub = self._inference()
        deadline = self._deadline(timeout)
        reply, attempts = await retry.call(
            self.config.retry,
            lambda: stub.Predict(request, timeout=deadline),
            method="Predict",
            resendable=False,
        )
        return Prediction.from_proto(reply, attempts)

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    async def flush(self) -> None:
        """Flush both buffered senders (``DeliveryError`` when batches failed)."""
        for sender in (self._events, self._feedback):
            if sender is not None:
                await sender.flush()

    async def close(self) -> None:
        """Deliver what the senders hold, then close the channels. Raises the senders'
        ``DeliveryError`` (after closing everything) when batches failed."""
        if self._closed:
            return
        failure: BaseException | None = None
        for sender in (self._events, self._feedback):
            if sender is None:
                continue
            try:
                await sender.close()
            except Exception as err:
                failure = failure or err
        self._closed = True
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
        if failure is not None:
            raise failure


def _answered_prefix(outcomes: Sequence[ItemOutcome | None]) -> int:
    for i, outcome in enumerate(outcomes):
        if outcome is None:
            return i
    return len(outcomes)
