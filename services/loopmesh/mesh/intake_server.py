"""gRPC and Kafka adapters shared by the intake doors (ingestion, feedback), and their runner.

``KafkaPublisher`` is the ``Publisher`` of ``loopmesh.mesh.intake`` on an idempotent ``acks=all``
producer: it returns when Kafka acknowledged every event, and turns a broker that does not
answer within ``ack_timeout_seconds`` into ``Unavailable`` (the idempotent producer would
otherwise retry forever while the client waits). The helpers map outcomes to ``ItemResult`` and
errors to status codes the same way for every door, and ``IntakeServer`` / ``run_service``
give both doors one life cycle.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn

import grpc
from aiokafka.errors import KafkaError
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, Field, StringConstraints

from loopmesh.gen.loopmesh.v1 import common_pb2
from loopmesh.mesh import app
from loopmesh.mesh.app import SettingsT
from loopmesh.mesh.auth import AuthSettings, Role
from loopmesh.mesh.bus import EventProducer, declare_topics
from loopmesh.mesh.errors import Unavailable
from loopmesh.mesh.events import Event
from loopmesh.mesh.intake import DedupeSettings, IntakeLimits, Item, Outcome, Refusal
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.mesh.settings import GrpcServerSettings, KafkaSettings, TelemetrySettings
from loopmesh.mesh.topics import Topic

log = logging.getLogger(__name__)

ACKED_TRAILER = "loopmesh-acked-events"
"""Trailer of a failed request stream: events from its start that were durably handled."""

TopicName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,249}$")]

# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


class IntakeScope(BaseModel):
    """Settings every intake door has (under ``LOOPMESH_<SERVICE>__``)."""

    server: GrpcServerSettings = GrpcServerSettings()
    """Where the gRPC server listens, its message size limit and TLS."""
    topic: TopicName = "events.raw"
    """Kafka topic the door writes to (tests and staging use their own)."""
    limits: IntakeLimits = IntakeLimits()
    """What the door accepts beyond the event model's own rules."""
    dedupe: DedupeSettings = DedupeSettings()
    """Window of recently written event ids."""
    ack_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long a request waits for Kafka's acknowledgement before failing UNAVAILABLE."""
    stream_in_flight: int = Field(default=8, ge=1)
    """Batches of one stream being written at once (ordering of answers is kept)."""
    stream_batch_items: int = Field(default=500, ge=1)
    """Largest batch formed from a stream of single items."""
    max_reported_results: int = Field(default=1000, ge=0)
    """Refused and duplicate items a stream's summary lists at most."""
    linger_ms: int = Field(default=5, ge=0)
    """Producer linger: how long a Kafka batch may wait to fill up."""
    max_batch_bytes: int = Field(default=256 * 1024, ge=16 * 1024)
    """Producer batch size per partition; larger batches mean fewer requests under load."""


class KafkaPublisher:
    """Writes events to one topic and returns once Kafka acknowledged all of them."""

    def __init__(self, producer: EventProducer, topic: Topic, ack_timeout: float) -> None:
        self.topic = topic
        self._producer = producer
        self._ack_timeout = ack_timeout

    async def publish(self, events: Sequence[Event]) -> None:
        try:
            await asyncio.wait_for(
                self._producer.publish_many(self.topic, events), self._ack_timeout
            )
        except TimeoutError as err:
            raise Unavailable(
                f"Kafka did not acknowledge {len(events)} events on {self.topic.name!r} "
                f"within {self._ack_timeout:g}s; retry with the same event ids"
            ) from err
        except KafkaError as err:
            raise Unavailable(
                f"Kafka refused the write to {self.topic.name!r} ({err!r}); "
                "retry with the same event ids"
            ) from err


# --- protobuf conversion ---------------------------------------------------------------------


def to_datetime(timestamp: Timestamp) -> datetime | Refusal:
    """A set ``Timestamp`` as an aware UTC datetime, or why it is not a valid one."""
    if not (_MIN_SECONDS <= timestamp.seconds <= _MAX_SECONDS) or not (
        0 <= timestamp.nanos < 1_000_000_000
    ):
        return Refusal("event_time", "not a valid timestamp (years 1 to 9999, 0 <= nanos < 1e9)")
    return timestamp.ToDatetime(tzinfo=UTC)


def envelope_item(message: Any, index: int, data: dict[str, Any]) -> Item:
    """Complete ``data`` with the fields every intake message shares (event id and time)."""
    if message.event_id:
        data["event_id"] = message.event_id
    if message.HasField("event_time"):
        event_time = to_datetime(message.event_time)
        if isinstance(event_time, Refusal):
            return Item(index, data, refusal=event_time)
        data["event_time"] = event_time
    return Item(index, data)


def item_result(outcome: Outcome) -> common_pb2.ItemResult:
    return common_pb2.ItemResult(
        index=outcome.index,
        event_id=outcome.event_id,
        accepted=outcome.accepted,
        field=outcome.field,
        reason=outcome.reason,
    )


def none_valid(outcomes: Sequence[Outcome]) -> str | None:
    """The INVALID_ARGUMENT message for a request none of whose items is valid, else None."""
    if not outcomes or any(o.accepted for o in outcomes):
        return None
    first = outcomes[0]
    more = len(outcomes) - 1
    suffix = f" (and {more} more refused item{'s' if more > 1 else ''})" if more else ""
    return f"{first.field}: {first.reason}{suffix}"


async def abort_unavailable(
    context: grpc.aio.ServicerContext, err: Unavailable, *, acked: int | None = None
) -> NoReturn:
    """End the call with UNAVAILABLE so clients retry; streams also say what was handled."""
    log.warning("answering UNAVAILABLE: %s", err)
    trailer = () if acked is None else ((ACKED_TRAILER, str(acked)),)
    await context.abort(grpc.StatusCode.UNAVAILABLE, str(err), trailing_metadata=trailer)
    raise AssertionError("context.abort returned")  # abort always raises


@dataclass
class StreamTally:
    """Counts of a request stream and the first refused or duplicate results."""

    max_results: int
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    results: list[Outcome] = field(default_factory=list)
    truncated: bool = False

    @property
    def handled(self) -> int:
        return self.accepted + self.rejected + self.duplicates

    def add(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            if outcome.status == "accepted":
                self.accepted += 1
                continue
            if outcome.status == "rejected":
                self.rejected += 1
            else:
                self.duplicates += 1
            if len(self.results) < self.max_results:
                self.results.append(outcome)
            else:
                self.truncated = True


def count(outcomes: Iterable[Outcome]) -> StreamTally:
    tally = StreamTally(max_results=0)
    tally.add(outcomes)
    return tally


# --- life cycle ------------------------------------------------------------------------------

Register = Callable[[KafkaPublisher, grpc.aio.Server], None]
"""Adds a door's servicer, built on the publisher, to the gRPC server."""


class IntakeServer:
    """The running parts of one intake door: its Kafka producer and its gRPC server."""

    def __init__(
        self,
        name: str,
        kafka: KafkaSettings,
        scope: IntakeScope,
        *,
        topic: Topic,
        service_name: str,
        register: Register,
        role: Role,
        auth: AuthSettings | None = None,
        telemetry: TelemetrySettings | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.name = name
        self.auth = auth
        # Every method of a door needs the door's role (ingest or feedback).
        self.method_roles: dict[str, Role] = {f"/{service_name}/": role}
        self.telemetry = telemetry or TelemetrySettings()
        self.kafka = kafka
        self.scope = scope
        self.topic = replace(topic, name=scope.topic)
        self.service_name = service_name
        self._register = register
        self._interceptors = interceptors
        self._producer: EventProducer | None = None
        self._grpc: GrpcServer | None = None
        self.crashed = asyncio.Event()
        """Never set: a door has no background part (its calls fail on their own)."""

    @property
    def address(self) -> str:
        if self._grpc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._grpc.address

    async def start(self) -> None:
        """Declare the topic and connect the producer (fail if Kafka is unreachable), then
        serve gRPC."""
        await declare_topics(self.kafka, [self.topic])
        producer = EventProducer(
            self.kafka,
            self.name,
            linger_ms=self.scope.linger_ms,
            max_batch_size=self.scope.max_batch_bytes,
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        publisher = KafkaPublisher(producer, self.topic, self.scope.ack_timeout_seconds)
        server = GrpcServer(
            self.name,
            self.scope.server,
            auth=self.auth,
            method_roles=self.method_roles,
            interceptors=self._interceptors,
        )
        self._register(publisher, server.server)
        await server.start([self.service_name])
        self._grpc = server

    async def stop(self) -> None:
        """Finish in-flight calls (within the grace period), then flush and close the producer."""
        if self._grpc is not None:
            await self._grpc.stop()
            self._grpc = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


def main(name: str, settings: SettingsT, build: Callable[[SettingsT], IntakeServer]) -> int:
    """The ``__main__`` of an intake door: the mesh life cycle, waiting out a Kafka not up yet."""
    # A door allocates several short-lived objects per event. Freezing what start-up created
    # keeps full collections from re-walking it, and a larger young generation makes them
    # rarer: about 10% less CPU per event, measured with bench/ingest_bench.py.
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    return app.main(name, settings, build, retry_start_s=2.0)
