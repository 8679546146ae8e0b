"""A typed Kafka layer on aiokafka: pydantic events in and out, dead letters, topic declaration.

Producing waits for the broker's acknowledgement (idempotent producer, ``acks=all``), so a
caller that acknowledges its own client after ``publish`` never loses an event. Consuming
commits an offset only after the handler for that message returned; a message that cannot
be decoded or validated goes to ``<topic>.dlq`` with the reason and its source offset, and
the consumer moves on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.helpers import create_ssl_context
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Link, SpanKind
from pydantic import ValidationError

from loopmesh.mesh.errors import Unavailable
from loopmesh.mesh.events import DeadLetter, Event
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.telemetry import KafkaHeaders, extract_context, inject_headers, tracer
from loopmesh.mesh.topics import Topic

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Event)

# Instruments bind to whatever meter provider setup_telemetry installs later (OTel proxies).
_meter = metrics.get_meter("loopmesh.bus")
_produced = _meter.create_counter(
    "loopmesh.kafka.produced", unit="{message}", description="Events acknowledged by Kafka"
)
_consumed = _meter.create_counter(
    "loopmesh.kafka.consumed", unit="{message}", description="Events handled and committed"
)
_dead_lettered = _meter.create_counter(
    "loopmesh.kafka.dead_lettered", unit="{message}", description="Messages sent to a DLQ"
)
_lag: dict[tuple[str, str, int], int] = {}


def _observe_lag(_options: CallbackOptions) -> Iterable[Observation]:
    for (group, topic, partition), lag in list(_lag.items()):
        yield Observation(lag, {"group": group, "topic": topic, "partition": partition})


_meter.create_observable_gauge(
    "loopmesh.kafka.consumer_lag",
    callbacks=[_observe_lag],
    unit="{message}",
    description="Messages behind the partition's high watermark, per group and partition",
)


async def record_lag_of(consumer: AIOKafkaConsumer, reader: str) -> None:
    """Record an aiokafka consumer's lag on each assigned partition, under ``reader``."""
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is not None:
            lag = highwater - await consumer.position(tp)
            record_consumer_lag(reader, tp.topic, tp.partition, lag)


def record_consumer_lag(group: str, topic: str, partition: int, lag: int) -> None:
    """Report a consumer's lag on one partition (faust agents; EventConsumer records its own)."""
    _lag[(group, topic, partition)] = max(0, lag)


TOPIC_ALREADY_EXISTS = 36
DLQ_MAX_BYTES = 8 * 1024 * 1024
"""Largest dead letter. A letter carries its raw message base64-encoded (a third larger) plus
the reason, so DLQ topics and every producer that writes them allow more than a source topic
(the broker's default is 1 MiB); else the largest hostile messages could not be
dead-lettered and would stall their consumer."""
DLQ_TOPIC_CONFIG = {
    "cleanup.policy": "delete",
    "retention.ms": str(30 * 24 * 3600 * 1000),
    "max.message.bytes": str(DLQ_MAX_BYTES),
}
"""Every ``<topic>.dlq``: kept 30 days, room for a letter carrying its source message."""


def client_options(settings: KafkaSettings, service: str) -> dict[str, Any]:
    """aiokafka keyword arguments for connection and security, shared by every client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": f"{settings.client_id}-{service}",
        "request_timeout_ms": settings.request_timeout_ms,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None,
            certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
            keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        )
    if settings.security_protocol.startswith("SASL"):
        if not settings.sasl_mechanism or not settings.sasl_username:
            raise ValueError("SASL needs kafka.sasl_mechanism and kafka.sasl_username")
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = (
            settings.sasl_password.get_secret_value() if settings.sasl_password else ""
        )
    return options


def group_options(settings: KafkaSettings, service: str, group_id: str) -> dict[str, Any]:
    """aiokafka options of a consumer-group member that commits by hand, after the effect."""
    options = client_options(settings, service)
    options.update(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    return options


MAX_LINKS = 128
"""Most links a batch's publish span keeps (OpenTelemetry's default span limit)."""


def encode(event: Event) -> bytes:
    return event.model_dump_json(by_alias=True).encode()


def event_headers(event: Event, context: Context | None = None) -> KafkaHeaders:
    """Headers every produced event carries: its id, schema and the trace context (the
    current one unless ``context`` is given)."""
    headers: KafkaHeaders = [
        ("event_id", event.event_id.encode()),
        ("schema", event.schema_.encode()),
        ("content-type", b"application/json"),
    ]
    return inject_headers(headers, context)


async def declare_topics(
    settings: KafkaSettings, topics: Iterable[Topic], *, with_dlq: bool = True
) -> None:
    """Create the topics (and their dead-letter topics) that do not exist yet.

    Each gets ``settings.replication_factor`` replicas and, when set,
    ``settings.min_insync_replicas``; a topic that exists already is left as it is.
    """
    durability: dict[str, str] = {}
    if settings.min_insync_replicas is not None:
        durability["min.insync.replicas"] = str(settings.min_insync_replicas)
    wanted: list[NewTopic] = []
    # One request may not name a topic twice (two deployables' lists often overlap).
    for topic in {t.name: t for t in topics}.values():
        wanted.append(
            NewTopic(
                topic.name,
                num_partitions=settings.default_partitions,
                replication_factor=settings.replication_factor,
                topic_configs={**topic.config(), **durability},
            )
        )
        if with_dlq:
            wanted.append(
                NewTopic(
                    topic.dlq,
                    num_partitions=1,
                    replication_factor=settings.replication_factor,
                    topic_configs={**DLQ_TOPIC_CONFIG, **durability},
                )
            )
    admin = AIOKafkaAdminClient(**client_options(settings, "admin"))
    await admin.start()
    try:
        response = await admin.create_topics(wanted)
        for name, code, *rest in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise RuntimeError(f"creating topic {name!r} failed: error {code} {rest}")
    finally:
        await admin.close()


async def partition_counts(settings: KafkaSettings, topics: Sequence[str]) -> dict[str, int]:
    """Partitions of each existing topic (absent topics are left out)."""
    admin = AIOKafkaAdminClient(**client_options(settings, "admin"))
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if t["partitions"]}


class EventProducer:
    """Produces pydantic events with their key, id and trace headers; waits for acks."""

    def __init__(self, settings: KafkaSettings, service: str, **overrides: Any) -> None:
        options = client_options(settings, service)
        options.update(
            enable_idempotence=True, acks="all", linger_ms=5, max_request_size=DLQ_MAX_BYTES
        )
        options.update(overrides)
        self._producer = AIOKafkaProducer(**options)
        self._tracer = tracer(f"loopmesh.{service}.bus")

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, topic: Topic, event: Event, *, key: str | None = None) -> None:
        """Produce one event and wait until the broker acknowledged it."""
        await self.publish_many(topic, [event], keys=[key] if key is not None else None)

    async def publish_many(
        self,
        topic: Topic,
        events: Sequence[Event],
        *,
        keys: Sequence[str | None] | None = None,
        contexts: Sequence[Context] | None = None,
    ) -> None:
        """Produce a batch and wait until every event of it is acknowledged.

        ``contexts``: each event's own trace context (where it was created, e.g. its Predict),
        which its headers carry so that its consumer continues that trace; the batch's span
        links to them. Without it every event carries the batch's span.

        Raises the first delivery error (``KafkaError``); events before it may have landed,
        which is why consumers deduplicate by event id.
        """
        if not events:
            return
        links = None
        if contexts is not None:
            spans = (trace.get_current_span(c).get_span_context() for c in contexts)
            links = [Link(sc) for sc in spans if sc.is_valid][:MAX_LINKS]
        with self._tracer.start_as_current_span(
            f"{topic.name} publish",
            kind=SpanKind.PRODUCER,
            links=links,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": topic.name,
                "messaging.batch.message_count": len(events),
            },
        ):
            futures = []
            for i, event in enumerate(events):
                key = keys[i] if keys is not None else None
                if key is None:
                    key = str(getattr(event, topic.key_field))
                futures.append(
                    await self._producer.send(
                        topic.name,
                        value=encode(event),
                        key=key.encode(),
                        headers=event_headers(event, contexts[i] if contexts else None),
                    )
                )
            await asyncio.gather(*futures)
        _produced.add(len(events), {"topic": topic.name})

    async def publish_raw(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: KafkaHeaders,
        *,
        partition: int | None = None,
    ) -> None:
        """Produce bytes as they are (dead letters, changelog records), waiting for the ack."""
        await self._producer.send_and_wait(
            topic, value=value, key=key, headers=headers, partition=partition
        )


@dataclass(frozen=True)
class Delivery:
    """Where a consumed event came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...]


Handler = Callable[[E, Delivery], Awaitable[None]]
TRANSIENT = (Unavailable, KafkaError, ConnectionError, TimeoutError)
"""Handler errors that mean "a dependency is down", retried until it is back (not every
OSError: a missing file or a full disk says nothing about an outage ending)."""


class EventConsumer(Generic[E]):
    """A consumer-group member that hands valid events to ``handler`` and commits after it.

    A handler that raises leaves the offset uncommitted: the consumer seeks back, waits
    ``retry_backoff`` and delivers the same message again (at-least-once). After
    ``max_attempts`` failures of the same message it is dead-lettered with the last error, so
    one poison message cannot stall its partition forever; a ``TRANSIENT`` error (a dependency
    down) is retried without bound instead, since it says nothing about the message. Messages
    that are not valid events are dead-lettered at once, never retried.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topic: Topic,
        group_id: str,
        handler: Handler[E],
        *,
        dlq: EventProducer,
        service: str,
        retry_backoff: float = 1.0,
        max_attempts: int = 5,
        max_batch: int = 500,
        **overrides: Any,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        options = group_options(settings, service, group_id)
        options.update(overrides)
        self.topic = topic
        self.group_id = group_id
        self._consumer = AIOKafkaConsumer(topic.name, **options)
        self._handler = handler
        self._dlq = dlq
        self._retry_backoff = retry_backoff
        self._max_attempts = max_attempts
        self._failures: dict[tuple[TopicPartition, int], int] = {}
        self._max_batch = max_batch
        self._tracer = tracer(f"loopmesh.{service}.bus")
        self._stopping = asyncio.Event()
        self.dead_lettered = 0
        self.handled = 0

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        self._stopping.set()
        await self._consumer.stop()

    async def run(self) -> None:
        """Consume until ``stop``; returns when stopped."""
        while not self._stopping.is_set():
            batches = await self._consumer.getmany(timeout_ms=500, max_records=self._max_batch)
            for tp, records in batches.items():
                await self._handle_partition(tp, records)
            await record_lag_of(self._consumer, self.group_id)

    async def _handle_partition(self, tp: TopicPartition, records: list[Any]) -> None:
        # One commit for the handled part of a batch, not one per message: each commit is a
        # broker round trip (~4 ms on a loaded machine, capping a consumer near 250 msg/s).
        # A crash redelivers at most one batch, which handlers idempotent by event id absorb.
        handled: int | None = None
        for record in records:
            try:
                await self._handle_record(record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not await self._gave_up(tp, record, exc):
                    await self._commit(tp, handled)
                    self._consumer.seek(tp, record.offset)
                    await asyncio.sleep(self._retry_backoff)
                    return
            self._failures.pop((tp, record.offset), None)
            handled = record.offset + 1
        await self._commit(tp, handled)

    async def _gave_up(self, tp: TopicPartition, record: Any, exc: Exception) -> bool:
        """Count a failure; after ``max_attempts`` dead-letter the record (True: move on)."""
        where = f"{tp.topic}[{tp.partition}]@{record.offset}"
        if isinstance(exc, TRANSIENT):
            # An outage says nothing about the message: wait it out, never dead-letter.
            log.warning("handler on %s waits for a dependency: %s", where, exc)
            return False
        attempts = self._failures.get((tp, record.offset), 0) + 1
        if attempts < self._max_attempts:
            self._failures[(tp, record.offset)] = attempts
            log.exception("handler failed on %s (attempt %d); retrying", where, attempts)
            return False
        log.exception("handler failed on %s %d times; dead-lettering", where, attempts)
        reason = f"handler failed {attempts} times, last: {type(exc).__name__}: {exc}"
        await dead_letter(self._dlq, record, group=self.group_id, reason=reason[:2000])
        self.dead_lettered += 1
        return True

    async def _commit(self, tp: TopicPartition, offset: int | None) -> None:
        if offset is not None:
            await self._consumer.commit({tp: offset})

    async def _handle_record(self, record: Any) -> None:
        headers = tuple(record.headers or ())
        delivery = Delivery(record.topic, record.partition, record.offset, record.key, headers)
        try:
            event = self.topic.value_type.model_validate_json(record.value or b"")
        except ValidationError as err:
            await self._dead_letter(record, delivery, describe_validation_error(err))
            return
        with consume_span(self._tracer, record, event.event_id, self.group_id):
            await self._handler(event, delivery)  # type: ignore[arg-type]
        self.handled += 1
        _consumed.add(1, {"topic": record.topic, "group": self.group_id})

    async def _dead_letter(self, record: Any, delivery: Delivery, reason: str) -> None:
        await dead_letter(self._dlq, record, group=self.group_id, reason=reason)
        self.dead_lettered += 1


RawSend = Callable[[str, bytes | None, bytes | None, KafkaHeaders], Awaitable[None]]
"""(topic, value, key, headers) -> produced and acknowledged: ``EventProducer.publish_raw``, or
a faust app's producer (``streams``), so every consumer dead-letters the same way."""


async def dead_letter(
    send: RawSend | EventProducer,
    record: Any,
    *,
    group: str,
    reason: str,
    event_id: str | None = None,
) -> None:
    """Send a consumed record (aiokafka's or faust's) to ``<topic>.dlq`` as a DeadLetter.

    ``event_id``: fixed by the caller when the same record may be dead-lettered again (groupless
    readers re-read it on every start), so DLQ readers can drop the copies.
    """
    produce = send.publish_raw if isinstance(send, EventProducer) else send
    letter = DeadLetter(
        **({"event_id": event_id} if event_id is not None else {}),
        reason=reason,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        consumer_group=group,
        key=record.key,
        value=record.value,
    )
    log.warning(
        "dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason
    )
    headers = [*(record.headers or ()), *event_headers(letter)]
    dlq = f"{record.topic}.dlq"
    try:
        await produce(dlq, encode(letter), record.key, headers)
    except Exception as exc:
        if not _too_large(exc):
            raise
        # A DLQ topic created without DLQ_MAX_BYTES (or a huge key): keep the letter, which
        # names the source offset, rather than retry a send that can never succeed.
        await produce(dlq, encode(without_value(letter)), None, headers)
    trace.get_current_span().add_event("dead-lettered", {"reason": reason})
    _dead_lettered.add(1, {"topic": record.topic, "group": group})


def _too_large(exc: BaseException) -> bool:
    # faust wraps the producer's error in its own ProducerSendError.
    return isinstance(exc, MessageSizeTooLargeError) or isinstance(
        exc.__cause__, MessageSizeTooLargeError
    )


def consume_span(service_tracer: trace.Tracer, record: Any, event_id: str, group: str) -> Any:
    """The span of handling one consumed record, continuing the producer's trace.

    Our own, not opentelemetry-instrumentation-aiokafka's: its spans end inside ``getmany``,
    before the handler runs (docs/architecture.md, "Kafka tracing")."""
    return service_tracer.start_as_current_span(
        f"{record.topic} process",
        context=extract_context(record.headers),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "kafka",
            "messaging.destination.name": record.topic,
            "messaging.kafka.offset": record.offset,
            "messaging.consumer.group.name": group,
            "messaging.message.id": event_id,
        },
    )


def without_value(letter: DeadLetter) -> DeadLetter:
    """The letter without its raw bytes, saying why (they stay at the source offset)."""
    size = len(letter.value or b"") + len(letter.key or b"")
    return letter.model_copy(
        update={
            "key": None,
            "value": None,
            "reason": f"{letter.reason} (raw key and value, {size} bytes, left out: too large "
            "for the dead-letter topic; read them at the source offset)",
        }
    )


def describe_validation_error(err: ValidationError) -> str:
    """A short reason naming the fields at fault."""
    parts = []
    for item in err.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "value"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)
