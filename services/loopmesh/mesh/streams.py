"""faust-streaming plumbing shared by stream processors: app factory and dead-lettering.

Values travel as raw bytes and are decoded with the pydantic models of ``events``, so the
validation rules are the same as on the ``bus`` path; a message that fails them goes to
``<topic>.dlq`` as a ``DeadLetter`` with its source offset, and the agent keeps going.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeVar

import faust
from pydantic import ValidationError

from loopmesh.mesh.bus import (
    DLQ_MAX_BYTES,
    dead_letter,
    describe_validation_error,
    record_consumer_lag,
)
from loopmesh.mesh.events import Event
from loopmesh.mesh.settings import KafkaSettings

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Event)


def faust_app(
    app_id: str,
    settings: KafkaSettings,
    *,
    data_dir: Path,
    store: str = "memory://",
    **overrides: Any,
) -> faust.App:
    """A faust app wired to ``settings`` with raw serializers and no web server."""
    data_dir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    brokers = [f"kafka://{address.strip()}" for address in settings.bootstrap_servers.split(",")]
    options: dict[str, Any] = {
        "broker": brokers,
        "store": store,
        "datadir": str(data_dir),
        "key_serializer": "raw",
        "value_serializer": "raw",
        "web_enabled": False,
        "autodiscover": False,
        "topic_partitions": settings.default_partitions,
        "topic_replication_factor": settings.replication_factor,
        "producer_acks": -1,
        "processing_guarantee": "at_least_once",
        "broker_client_id": f"{settings.client_id}-{app_id}",
        "producer_max_request_size": DLQ_MAX_BYTES,  # dead letters outgrow their source
    }
    if settings.security_protocol != "PLAINTEXT":
        options["broker_credentials"] = _credentials(settings)
    options.update(overrides)
    return faust.App(app_id, **options)


def _credentials(settings: KafkaSettings) -> Any:
    from loopmesh.mesh.bus import client_options

    ssl_context = client_options(settings, "faust").get("ssl_context")
    if settings.security_protocol.startswith("SASL"):
        password = settings.sasl_password.get_secret_value() if settings.sasl_password else ""
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=password,
            mechanism=settings.sasl_mechanism,
            ssl_context=ssl_context,
        )
    return faust.SSLCredentials(ssl_context)


async def decode_or_dead_letter(
    app: faust.App, model: type[E], event: Any, *, group: str
) -> E | None:
    """Validate a faust event's raw value as ``model``; dead-letter it and return None if not."""
    message = event.message
    try:
        return model.model_validate_json(message.value or b"")
    except ValidationError as err:
        reason = describe_validation_error(err)

    async def send(topic: str, value: bytes | None, key: bytes | None, headers: Any) -> None:
        await app.producer.send_and_wait(
            topic, key=key, value=value, partition=None, timestamp=None, headers=headers
        )

    await dead_letter(send, message, group=group, reason=reason)
    return None


async def record_lag(app: faust.App, group: str) -> None:
    """Put the app's lag per assigned partition (high watermark minus fetch position) into
    the bus's ``loopmesh.kafka.consumer_lag`` gauge; call it from a faust timer."""
    consumer = app.consumer
    for tp in consumer.assignment():
        try:
            highwater = consumer.highwater(tp)
            position = await consumer.position(tp)
        except Exception:  # mid-rebalance the partition may be gone: next tick
            log.debug("no lag for %s[%d] now", tp.topic, tp.partition, exc_info=True)
            continue
        if highwater is not None and position is not None:
            record_consumer_lag(group, tp.topic, tp.partition, highwater - position)
