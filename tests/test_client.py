"""The client SDK (loopmesh.client) against real doors on the real broker, and its pure logic.

Retries are proven with real failures: a TCP proxy between client and door that cuts the
connection at the door's answer (the door has written the batch; the client never hears it),
so the retry is a true resend of the same event ids and Kafka must still hold each event once.
The unit tier covers the retry and backoff rules, request cutting, error parsing, the
configuration and the buffered sender (a fake deliver function), plus Predict and the
IngestStream resume against small in-process gRPC servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import SecretStr, ValidationError

from loopmesh.client import (
    AsyncClient,
    BatchPolicy,
    BatchResult,
    Client,
    ClientClosedError,
    ClientConfig,
    DeliveryError,
    Event,
    Feedback,
    InvalidArgumentError,
    ItemOutcome,
    NotFoundError,
    Prediction,
    RejectedItemsError,
    ResourceExhaustedError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
)
from loopmesh.client import aio as client_aio
from loopmesh.client.batching import encoded_size, request_batches
from loopmesh.client.errors import CallError, error_for, split_details
from loopmesh.client.retry import Attempts, retryable
from loopmesh.client.sender import AsyncSender
from loopmesh.client.types import as_event, as_feedback, predict_request, shifted_field
from loopmesh.devstack.process import free_port
from loopmesh.feedback.server import feedback_server
from loopmesh.feedback.settings import FeedbackScope, FeedbackSettings
from loopmesh.gen.loopmesh.v1 import (
    feedback_pb2,
    inference_pb2,
    inference_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
)
from loopmesh.mesh.auth import AuthSettings, TokenSpec
from loopmesh.mesh.intake_server import ACKED_TRAILER, IntakeServer
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.mesh.settings import GrpcServerSettings, KafkaSettings
from tests.helpers import eventually
from tests.support.certs import make_pki
from tests.test_ingestion_support import (
    event_ids,
    feedback,
    ingestion,
    new_topic,
    read_all,
    running,
    topic_size,
)

FAST_RETRY = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5, max_attempts=5)


def config(**fields: Any) -> ClientConfig:
    """A client configuration from arguments only (what the test does not set: defaults)."""
    fields.setdefault("retry", FAST_RETRY)
    fields.setdefault("deadline_s", 30.0)
    fields.setdefault("tracing", False)
    return ClientConfig(**fields)


def events(n: int, **fields: Any) -> list[Event]:
    return [
        Event(
            entity_id=f"user-{i % 13}",
            event_type="click",
            numeric={"price": float(i)},
            categorical={"page": "home"},
            **fields,
        )
        for i in range(n)
    ]


# -- a proxy that loses the door's answer -----------------------------------------------------

_HEADERS = 0x1


class CuttingProxy:
    """Relays TCP to ``target`` and loses the next ``cuts`` answers: it drops the connection at
    the first HTTP/2 HEADERS frame the server sends on a call's stream (the start of its answer)
    instead of relaying it. A unary door has then done the work (written to Kafka); the client
    only sees the connection die (UNAVAILABLE) and must retry."""

    def __init__(self, target: str, cuts: int = 1) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.cuts = cuts
        """Answers still to be lost."""
        self.cut = 0
        """Answers lost so far."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def upstream() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while True:
                header = await up_reader.readexactly(9)
                length = int.from_bytes(header[:3], "big")
                stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
                payload = await up_reader.readexactly(length)
                if header[3] == _HEADERS and stream and self.cuts > 0:
                    self.cuts -= 1
                    self.cut += 1
                    return
                writer.write(header + payload)
                await writer.drain()

        relays = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for relay in relays:
                relay.cancel()
            await asyncio.gather(*relays, return_exceptions=True)
            writer.transport.abort()
            up_writer.transport.abort()
            self._tasks.discard(task)


# -- unit: retry and backoff ------------------------------------------------------------------


def test_backoff_grows_is_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0, jitter=0.5)
    assert [policy.backoff(n, rand=lambda: 0.0) for n in (1, 2, 3, 4, 5, 50, 5000)] == [
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
        1.0,
        1.0,
    ]
    # Jitter takes up to its share off each wait, never more, never below zero.
    assert policy.backoff(3, rand=lambda: 1.0) == pytest.approx(0.2)
    assert 0.2 <= policy.backoff(3) <= 0.4
    with pytest.raises(ValueError, match="from 1"):
        policy.backoff(0)
    with pytest.raises(ValidationError, match="max_backoff_s"):
        RetryPolicy(initial_backoff_s=2.0, max_backoff_s=1.0)


def test_only_unavailable_and_resendable_deadlines_are_retried() -> None:
    policy = RetryPolicy()
    code = grpc.StatusCode
    assert retryable(code.UNAVAILABLE, policy, resendable=False)
    assert retryable(code.DEADLINE_EXCEEDED, policy, resendable=True)
    assert not retryable(code.DEADLINE_EXCEEDED, policy, resendable=False)
    no_deadline = RetryPolicy(retry_deadline_exceeded=False)
    assert not retryable(code.DEADLINE_EXCEEDED, no_deadline, resendable=True)
    for final in (
        code.INVALID_ARGUMENT,
        code.RESOURCE_EXHAUSTED,
        code.UNAUTHENTICATED,
        code.PERMISSION_DENIED,
        code.INTERNAL,
        code.NOT_FOUND,
    ):
        assert not retryable(final, policy, resendable=True)


def test_attempts_stop_at_the_limit_and_the_time_budget() -> None:
    now = [0.0]
    policy = RetryPolicy(
        max_attempts=4, initial_backoff_s=1.0, max_backoff_s=8.0, jitter=0.0, total_timeout_s=5.0
    )
    attempts = Attempts(policy, resendable=True, clock=lambda: now[0], rand=lambda: 0.0)
    assert attempts.begin() == 1
    assert attempts.next_delay(grpc.StatusCode.INVALID_ARGUMENT) is None
    assert attempts.next_delay(grpc.StatusCode.UNAVAILABLE) == 1.0
    now[0] = 1.5
    attempts.begin()
    assert attempts.next_delay(grpc.StatusCode.UNAVAILABLE) == 2.0  # 1.5 + 2 within 5
    now[0] = 4.0
    attempts.begin()
    assert attempts.next_delay(grpc.StatusCode.UNAVAILABLE) is None  # 4 + 4 beyond 5

    unbounded = policy.model_copy(update={"total_timeout_s": None})
    attempts = Attempts(unbounded, resendable=False, clock=lambda: 0.0, rand=lambda: 0.0)
    delays = []
    while True:
        attempts.begin()
        delay = attempts.next_delay(grpc.StatusCode.UNAVAILABLE)
        if delay is None:
            break
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0]  # four attempts, three waits
    assert attempts.next_delay(grpc.StatusCode.DEADLINE_EXCEEDED) is None


# -- unit: requests, ids, errors, configuration -----------------------------------------------


def test_requests_are_cut_by_count_and_size() -> None:
    messages = [as_event(e) for e in events(25)]
    cuts = list(request_batches(messages, 10, 1 << 20))
    assert [(offset, len(batch)) for offset, batch in cuts] == [(0, 10), (10, 10), (20, 5)]
    size = encoded_size(messages[0])
    by_bytes = list(request_batches(messages, 100, size * 4 + 3))
    assert all(len(batch) <= 4 for _, batch in by_bytes)
    assert sum(len(batch) for _, batch in by_bytes) == 25
    assert [m for _, batch in by_bytes for m in batch] == messages
    huge = as_event(Event("u", "click", categorical={"blob": "x" * 5000}))
    alone = list(request_batches([messages[0], huge, messages[1]], 100, 2048))
    assert [len(batch) for _, batch in alone] == [1, 1, 1]
    # The request the door receives fits the byte limit it was cut for.
    for _, batch in by_bytes:
        assert ingestion_pb2.IngestRequest(events=batch).ByteSize() <= size * 4 + 3


def test_event_ids_are_assigned_once_and_callers_messages_kept() -> None:
    given = ingestion_pb2.InteractionEvent(entity_id="u", event_type="click")
    first, second = as_event(given), as_event(given)
    assert first.event_id and second.event_id and first.event_id != second.event_id
    assert given.event_id == ""  # a template can be sent again and again
    named = ingestion_pb2.InteractionEvent(event_id="mine", entity_id="u", event_type="x")
    assert as_event(named) is named
    assert as_event(Event("u", "click", event_id="e-1")).event_id == "e-1"
    assert len(as_event(Event("u", "click")).event_id) == 32
    feedback_message = feedback_pb2.Feedback(prediction_id="p", label=1)
    assert as_feedback(feedback_message).event_id and not feedback_message.event_id
    proto = Feedback("p", reward=0.5).to_proto()
    assert proto.HasField("reward") and not proto.HasField("label")
    assert not proto.HasField("value")
    regression = Feedback("p", value=-3.25).to_proto()
    assert regression.HasField("value") and regression.value == -3.25
    assert not regression.HasField("label") and not regression.HasField("reward")


def test_predict_requests_carry_categorical_context_and_answers_their_task() -> None:
    request = predict_request("u", context={"price": 2.0}, categorical={"country": "FR"})
    assert dict(request.categorical) == {"country": "FR"} and dict(request.context) == {
        "price": 2.0
    }
    multiclass = Prediction.from_proto(
        inference_pb2.PredictResponse(
            prediction_id="p",
            score=0.5,
            task="multiclass",
            probabilities=[0.2, 0.5, 0.3],
            predicted_class=1,
        )
    )
    assert (multiclass.task, multiclass.probabilities, multiclass.predicted_class) == (
        "multiclass",
        (0.2, 0.5, 0.3),
        1,
    )
    regression = Prediction.from_proto(
        inference_pb2.PredictResponse(prediction_id="p", score=41.5, task="regression")
    )
    assert (regression.task, regression.score, regression.predicted_class) == (
        "regression",
        41.5,
        None,
    )
    # A gateway from before tasks says nothing: its models were binary.
    old = Prediction.from_proto(inference_pb2.PredictResponse(prediction_id="p", score=0.9))
    assert (old.task, old.probabilities, old.predicted_class) == ("binary", (), None)


def test_errors_carry_code_field_and_message() -> None:
    assert split_details("events[3].numeric.price: not a finite number") == (
        "events[3].numeric.price",
        "not a finite number",
    )
    assert split_details("feedback.attributes..[key]: empty") == (
        "feedback.attributes..[key]",
        "empty",
    )
    assert split_details("events[10].numeric. .[key]: blank") == (
        "events[10].numeric. .[key]",
        "blank",
    )
    assert split_details("missing or invalid token") == ("", "missing or invalid token")
    no_field = "Kafka refused the write to 'x' (KafkaConnectionError: down); retry"
    assert split_details(no_field) == ("", no_field)
    err = error_for(grpc.StatusCode.INVALID_ARGUMENT, "entity_id: empty", method="Predict")
    assert isinstance(err, InvalidArgumentError) and isinstance(err, ValueError)
    assert (err.code, err.field, err.message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "entity_id",
        "empty",
    )
    assert "INVALID_ARGUMENT" in str(err) and "entity_id" in str(err)
    assert isinstance(error_for(grpc.StatusCode.NOT_FOUND, "model: unknown"), NotFoundError)
    assert type(error_for(grpc.StatusCode.INTERNAL, "boom")) is CallError
    assert shifted_field("events[3].numeric.price", 10) == "events[13].numeric.price"
    assert shifted_field("feedback.label", 10) == "feedback.label"

    refused = BatchResult(
        1, 1, 0, (ItemOutcome(0, "a", True), ItemOutcome(1, "b", False, "events[1].x", "bad"))
    )
    with pytest.raises(RejectedItemsError) as caught:
        refused.raise_for_rejected()
    assert caught.value.field == "events[1].x" and len(caught.value.results) == 2


def test_config_from_environment_and_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPMESH_CLIENT__INGESTION_URL", "ingest.example:443")
    monkeypatch.setenv("LOOPMESH_CLIENT__TOKEN", "a-client-token-0123456789")
    monkeypatch.setenv("LOOPMESH_CLIENT__RETRY__MAX_ATTEMPTS", "9")
    monkeypatch.setenv("LOOPMESH_CLIENT__BATCH__LINGER_S", "0.25")
    monkeypatch.setenv("LOOPMESH_CLIENT__TLS", "true")
    from_env = ClientConfig()
    assert from_env.ingestion_url == "ingest.example:443"
    assert from_env.retry.max_attempts == 9 and from_env.batch.linger_s == 0.25
    assert from_env.channel_settings().tls_enabled
    assert from_env.auth().client_metadata() == (
        ("authorization", "Bearer a-client-token-0123456789"),
    )
    argued = ClientConfig(ingestion_url="other:1", batch=BatchPolicy(max_items=7))
    assert argued.ingestion_url == "other:1" and argued.batch.max_items == 7
    assert argued.retry.max_attempts == 9  # the rest still from the environment
    monkeypatch.setenv("MYAPP_LOOPMESH__FEEDBACK_URL", "fb:2")
    assert ClientConfig(_env_prefix="MYAPP_LOOPMESH__").feedback_url == "fb:2"

    monkeypatch.delenv("LOOPMESH_CLIENT__TOKEN")
    with pytest.raises(ValidationError, match="tls_keyfile"):
        ClientConfig(tls_certfile=Path("client.pem"))
    with pytest.raises(ValidationError, match="16"):
        ClientConfig(token=SecretStr("short"))
    with pytest.raises(ValidationError, match="ingestion_ulr"):
        ClientConfig(ingestion_ulr="typo:1")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        AsyncClient(ClientConfig(), ingestion_url="x:1")


# -- unit: the buffered sender ----------------------------------------------------------------


class FakeDoor:
    """A deliver function that records batches and can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: CallError | None = None

    async def deliver(self, batch: Sequence[ingestion_pb2.InteractionEvent]) -> BatchResult:
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        ids = [m.event_id for m in batch]
        self.batches.append(ids)
        results = tuple(ItemOutcome(i, e, True) for i, e in enumerate(ids))
        return BatchResult(len(ids), 0, 0, results)


async def test_sender_batches_by_size_and_linger_and_bounds_its_buffer() -> None:
    door = FakeDoor()
    policy = BatchPolicy(max_items=4, linger_s=0.2, buffer_items=10)
    sender: AsyncSender[Event, ingestion_pb2.InteractionEvent] = AsyncSender(
        "events", door.deliver, as_event, policy
    )
    loop = asyncio.get_running_loop()

    # Linger: two events go together once the first has waited linger_s.
    started = loop.time()
    ids = [await sender.send(e) for e in events(2)]
    await eventually(lambda: _true(door.batches), timeout=5, interval=0.01)
    assert door.batches == [ids]
    assert loop.time() - started >= 0.18

    # Size: a full batch goes at once, without waiting for the linger.
    started = loop.time()
    ids = [await sender.send(e) for e in events(4)]
    await eventually(lambda: _true(len(door.batches) == 2), timeout=5, interval=0.005)
    assert door.batches[1] == ids and loop.time() - started < 0.15

    # Backpressure: with the door held, ten items fill the buffer and the eleventh waits.
    door.gate.clear()
    for event in events(10):
        await sender.send(event)
    assert sender.pending == 10
    blocked = asyncio.ensure_future(sender.send(events(1)[0]))
    await asyncio.sleep(0.4)
    assert not blocked.done() and sender.pending == 10
    door.gate.set()
    await asyncio.wait_for(blocked, 5)
    await sender.flush()
    assert sender.pending == 0
    assert all(len(batch) <= 4 for batch in door.batches)
    assert sum(len(batch) for batch in door.batches) == 17 == sender.stats.accepted

    # A failed batch is reported by flush (with its ids), once.
    door.fail = error_for(grpc.StatusCode.UNAVAILABLE, "down", method="Ingest", attempts=5)
    lost = [await sender.send(e) for e in events(3)]
    with pytest.raises(DeliveryError) as caught:
        await sender.flush()
    assert caught.value.undelivered == 3 and list(caught.value.event_ids) == lost
    assert isinstance(caught.value.error, UnavailableError)
    await sender.flush()  # reported already
    assert sender.stats.failed == 3

    # After a flush, the sender idles; a lone item still goes after its linger.
    door.fail = None
    lone = await sender.send(events(1)[0])
    await eventually(lambda: _true(door.batches[-1] == [lone]), timeout=5, interval=0.01)
    last = await sender.send(events(1)[0])
    await sender.close()
    assert door.batches[-1] == [last]
    with pytest.raises(ClientClosedError):
        await sender.send(events(1)[0])


async def _true(value: object) -> bool:
    return bool(value)


# -- unit: real gRPC, small in-process servers ------------------------------------------------


class FlakyInference(inference_pb2_grpc.InferenceServiceServicer):
    """Predict that fails UNAVAILABLE ``outages`` times, then answers; bad context named."""

    def __init__(self, outages: int) -> None:
        self.outages = outages
        self.calls = 0

    async def Predict(
        self, request: inference_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.PredictResponse:
        self.calls += 1
        if self.outages:
            self.outages -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "Triton is restarting")
        if any(not math.isfinite(v) for v in request.context.values()):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "context.price: not finite")
        if request.model_name == "nope":
            await context.abort(grpc.StatusCode.NOT_FOUND, "model_name: no model 'nope'")
        return inference_pb2.PredictResponse(
            prediction_id=f"p-{request.entity_id}",
            score=0.75,
            model_name=request.model_name or "default",
            model_version=int(request.model_version or 3),
            arm="pinned" if request.model_version else "stable",
            defaulted_features=["v:f"],
            request_id=request.request_id,
        )


@contextlib.asynccontextmanager
async def serving(name: str, add: Any, servicer: Any, service: str) -> AsyncIterator[str]:
    server = GrpcServer(name, GrpcServerSettings(port=0, grace_seconds=0))
    add(servicer, server.server)
    await server.start([service])
    try:
        yield server.address
    finally:
        await server.stop()


async def test_predict_returns_the_typed_answer_and_retries_unavailable_only() -> None:
    servicer = FlakyInference(outages=2)
    add = inference_pb2_grpc.add_InferenceServiceServicer_to_server
    async with (
        serving("inference", add, servicer, "loopmesh.v1.InferenceService") as address,
        AsyncClient(config(inference_url=address)) as client,
    ):
        prediction = await client.predict(
            "user-1", context={"price": 2.0}, model_version=7, request_id="r-1"
        )
        assert (prediction.prediction_id, prediction.score) == ("p-user-1", 0.75)
        assert (prediction.model_version, prediction.arm) == (7, "pinned")
        assert prediction.defaulted_features == ("v:f",)
        assert prediction.request_id == "r-1" and prediction.attempts == 3
        assert servicer.calls == 3

        with pytest.raises(InvalidArgumentError) as caught:
            await client.predict("user-1", context={"price": math.inf})
        assert (caught.value.field, caught.value.attempts) == ("context.price", 1)
        with pytest.raises(NotFoundError):
            await client.predict("user-1", model_name="nope")

        servicer.outages = 10
        with pytest.raises(UnavailableError) as unavailable:
            await client.predict("user-1", timeout=5)
        assert unavailable.value.attempts == FAST_RETRY.max_attempts
    assert client.closed
    with pytest.raises(ClientClosedError):
        await client.predict("user-1")


class ResumingIngestion(ingestion_pb2_grpc.IngestionServiceServicer):
    """IngestStream that handles ``acked`` events of its first call, then fails UNAVAILABLE
    with the doors' trailer; later calls take everything. Records what each call received."""

    def __init__(self, acked: int) -> None:
        self.acked = acked
        self.calls: list[list[str]] = []

    async def IngestStream(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.IngestStreamResponse:
        received = [e.event_id async for r in request_iterator for e in r.events]
        self.calls.append(received)
        if len(self.calls) == 1:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "Kafka did not acknowledge",
                trailing_metadata=((ACKED_TRAILER, str(self.acked)),),
            )
        refused = [{"index": 0, "event_id": received[0], "accepted": False, "field": "events[0].x"}]
        return ingestion_pb2.IngestStreamResponse(
            accepted=len(received) - 1, rejected=1, results=refused
        )


async def test_ingest_stream_resumes_after_what_the_door_acknowledged() -> None:
    assert client_aio.ACKED_TRAILER == ACKED_TRAILER
    servicer = ResumingIngestion(acked=30)
    add = ingestion_pb2_grpc.add_IngestionServiceServicer_to_server
    sent = [as_event(e) for e in events(100)]

    async def source() -> AsyncIterator[ingestion_pb2.InteractionEvent]:
        for message in sent:
            yield message

    async with (
        serving("ingestion", add, servicer, "loopmesh.v1.IngestionService") as address,
        AsyncClient(config(ingestion_url=address, batch=BatchPolicy(max_items=16))) as client,
    ):
        result = await client.ingest_stream(source())
    ids = [m.event_id for m in sent]
    assert servicer.calls == [ids, ids[30:]]
    assert (result.accepted, result.rejected, result.unreported, result.attempts) == (69, 1, 30, 2)
    assert result.handled == 100
    # Indexes and fields of the resumed call are positions in the caller's stream.
    (refused,) = result.results
    assert (refused.index, refused.field, refused.event_id) == (30, "events[30].x", ids[30])


# -- integration: the real doors on the real broker -------------------------------------------


async def test_a_lost_answer_is_retried_and_every_event_lands_once(
    kafka_settings: KafkaSettings,
) -> None:
    topic = new_topic("events.raw")
    door = ingestion(kafka_settings, topic)
    async with running(door):
        proxy = CuttingProxy(door.address, cuts=1)
        async with proxy as address, AsyncClient(config(ingestion_url=address)) as client:
            result = await client.ingest(events(300))
            # The door wrote the batch before its answer was lost: the resend is all repeats.
            assert (result.accepted, result.duplicates, result.attempts) == (0, 300, 2)
            assert proxy.cut == 1

            # The same through IngestStream (its one answer comes after everything is written)
            proxy.cuts = 1
            streamed = await client.ingest_stream(events(200))
            assert (streamed.duplicates, streamed.attempts, proxy.cut) == (200, 2, 2)

            # and through the buffered sender.
            proxy.cuts = 1
            buffered = [await client.events.send(e) for e in events(50)]
            await client.events.flush()
            assert client.events.stats.duplicates == 50 and proxy.cut == 3

    records = await read_all(kafka_settings, topic)
    counts = Counter(event_ids(records))
    assert len(records) == 300 + 200 + 50
    assert max(counts.values()) == 1
    assert set(result.event_ids) | set(buffered) <= set(counts)


async def test_feedback_retried_after_a_lost_answer_or_a_restart_lands_once(
    kafka_settings: KafkaSettings,
) -> None:
    topic = new_topic("feedback")
    door = feedback_server(
        FeedbackSettings(
            kafka=kafka_settings,
            feedback=FeedbackScope(
                server=GrpcServerSettings(port=free_port(), grace_seconds=1), topic=topic
            ),
        )
    )
    patient = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5, max_attempts=40)
    async with running(door):
        proxy = CuttingProxy(door.address, cuts=1)
        async with proxy as address, AsyncClient(config(feedback_url=address)) as client:
            one = await client.submit(Feedback("pred-1", label=1))
            assert (one.duplicate, one.attempts, proxy.cut) == (True, 2, 1)

        async with AsyncClient(config(feedback_url=door.address, retry=patient)) as client:
            await client.submit(Feedback("pred-warm", label=0))
            # The door goes away between attempts and comes back on the same address.
            await door.stop()
            call = asyncio.ensure_future(
                client.submit_many([Feedback(f"pred-{i}", reward=0.5) for i in range(40)])
            )
            await asyncio.sleep(1.0)
            assert not call.done()
            await door.start()
            many = await asyncio.wait_for(call, 60)
    assert many.attempts > 1 and many.accepted == 40
    assert [r.index for r in many.results] == list(range(40))
    records = await read_all(kafka_settings, topic)
    counts = Counter(event_ids(records))
    assert len(records) == 42 and max(counts.values()) == 1
    assert {one.event_id, *many.event_ids} <= set(counts)


async def test_invalid_argument_names_the_field_in_the_callers_list(
    kafka_settings: KafkaSettings,
) -> None:
    topic, feedback_topic = new_topic("events.raw"), new_topic("feedback")
    good = events(3)
    bad = [Event("   ", "click"), Event("u", "click", numeric={"price": math.nan}), Event("u", "")]
    ingest_door = ingestion(kafka_settings, topic)
    feedback_door = feedback(kafka_settings, feedback_topic)
    async with running(ingest_door), running(feedback_door):
        cfg = config(
            ingestion_url=ingest_door.address,
            feedback_url=feedback_door.address,
            batch=BatchPolicy(max_items=3),
        )
        async with AsyncClient(cfg) as client:
            # The second request holds only invalid events: the door refuses it whole.
            with pytest.raises(InvalidArgumentError) as caught:
                await client.ingest([*good, *bad, *events(2)])
            err = caught.value
            assert err.field == "events[3].entity_id" and err.attempts == 1, err
            assert err.handled == 3 and [r.accepted for r in err.results] == [True] * 3

            # Mixed requests keep the valid events and name each refused one.
            mixed = await client.ingest([*events(4), bad[1]])
            assert (mixed.accepted, mixed.rejected) == (4, 1)
            assert mixed.refused[0].field == "events[4].numeric.price"
            with pytest.raises(RejectedItemsError):
                mixed.raise_for_rejected()

            with pytest.raises(InvalidArgumentError) as feedback_error:
                await client.submit(Feedback("pred-1", label=-1))
            assert feedback_error.value.field == "feedback.label"
            batch = await client.submit_many(
                [
                    Feedback("p", label=1),
                    Feedback("p"),
                    Feedback("p", value=12.5),
                    Feedback("p", value=math.inf),
                ]
            )
            assert [r.field for r in batch.results] == ["", "feedback", "", "feedback.value"]
    assert await topic_size(kafka_settings, topic) == 3 + 4


async def test_batches_respect_the_doors_limit_and_linger(kafka_settings: KafkaSettings) -> None:
    topic = new_topic("events.raw")
    door = ingestion(kafka_settings, topic, limits={"max_batch_items": 7})
    async with running(door):
        fits = config(ingestion_url=door.address, batch=BatchPolicy(max_items=7, linger_s=0.3))
        async with AsyncClient(fits) as client:
            result = await client.ingest(events(50))
            assert (result.accepted, len(result.results)) == (50, 50)
            assert [r.index for r in result.results] == list(range(50))
            for event in events(25):
                await client.events.send(event)
            await client.events.flush()
            assert client.events.stats.accepted == 25
            # Fewer than a batch go after the linger time, without a flush.
            for event in events(3):
                await client.events.send(event)
            await eventually(
                lambda: _true(client.events.stats.accepted == 28), timeout=10, interval=0.05
            )

        too_big = fits.model_copy(update={"batch": BatchPolicy(max_items=8)})
        async with AsyncClient(too_big) as client:
            with pytest.raises(ResourceExhaustedError) as caught:
                await client.ingest(events(10))
            assert caught.value.attempts == 1 and "limit is 7" in caught.value.message
    assert await topic_size(kafka_settings, topic) == 50 + 25 + 3


async def test_tls_client_certificate_and_token(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    topic = new_topic("events.raw")
    token = "client-sdk-token-0123456789"
    server = {
        "tls_certfile": pki.server_cert,
        "tls_keyfile": pki.server_key,
        "tls_client_cafile": pki.ca,
    }
    door: IntakeServer = ingestion(kafka_settings, topic, server=server)
    door.auth = AuthSettings(tokens=[TokenSpec(name="app", token=token, roles=["ingest"])])
    async with running(door):
        secured = config(
            ingestion_url=door.address,
            tls_cafile=pki.ca,
            tls_certfile=pki.client_cert,
            tls_keyfile=pki.client_key,
            server_name_override="localhost",
            token=token,
        )
        async with AsyncClient(secured) as client:
            result = await client.ingest(events(5))
            assert result.accepted == 5

        wrong = secured.model_copy(update={"token": SecretStr("not-the-token-0123456789")})
        async with AsyncClient(wrong) as client:
            with pytest.raises(UnauthenticatedError) as caught:
                await client.ingest(events(1))
            assert caught.value.attempts == 1

        no_cert = config(
            ingestion_url=door.address,
            tls_cafile=pki.ca,
            token=token,
            retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.05),
        )
        async with AsyncClient(no_cert) as client:
            with pytest.raises(UnavailableError) as refused:
                await client.ingest(events(1), timeout=5)
            assert refused.value.attempts == 2
    assert await topic_size(kafka_settings, topic) == 5


async def test_the_sync_client_works_from_a_plain_thread(kafka_settings: KafkaSettings) -> None:
    topic, feedback_topic = new_topic("events.raw"), new_topic("feedback")
    ingest_door = ingestion(kafka_settings, topic)
    feedback_door = feedback(kafka_settings, feedback_topic)
    outcome: dict[str, Any] = {}

    def app() -> None:
        # A plain thread: no event loop of its own, blocking calls only.
        try:
            with Client(
                config(
                    ingestion_url=ingest_door.address,
                    feedback_url=feedback_door.address,
                    batch=BatchPolicy(linger_s=0.01),
                )
            ) as client:
                outcome["ingest"] = client.ingest(events(20))
                outcome["submit"] = client.submit(Feedback("pred-1", label=0))
                outcome["sent"] = [client.events.send(e) for e in events(30)]
                client.feedback.send(Feedback("pred-2", reward=1.0))
                outcome["senders"] = client.events.stats
            outcome["closed"] = client.closed
        except BaseException as err:  # reported to the test's thread
            outcome["error"] = err

    async with running(ingest_door), running(feedback_door):
        thread = threading.Thread(target=app, name="plain-app")
        thread.start()
        await asyncio.to_thread(thread.join, 120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["ingest"].accepted == 20 and not outcome["submit"].duplicate
    assert outcome["senders"].accepted == 30 and outcome["closed"]
    landed = set(event_ids(await read_all(kafka_settings, topic)))
    assert len(landed) == 50 and set(outcome["sent"]) <= landed
    assert await topic_size(kafka_settings, feedback_topic) == 2
