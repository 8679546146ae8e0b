"""A real KRaft broker from the Maven jars: produce, consume, crash it, restart, read again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from loopmesh.devstack.kafka import KafkaBroker

TOPIC = "loopmesh.test.durability"


async def _produce(bootstrap: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(TOPIC, value)
    finally:
        await producer.stop()


async def _read_all(bootstrap: str) -> list[bytes]:
    # No group: read the partition from the start, so the result depends on the log alone.
    consumer = AIOKafkaConsumer(
        TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=10_000)
        return [record.value for records in batches.values() for record in records]
    finally:
        await consumer.stop()


@pytest.mark.integration  # starts its own brokers
def test_message_survives_broker_crash(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path / "kafka")
    broker.start()
    try:
        address = broker.bootstrap_servers
        asyncio.run(_produce(address, b"acked-before-crash"))
        assert asyncio.run(_read_all(address)) == [b"acked-before-crash"]

        broker.kill()
        assert not broker.running
        broker.restart()

        assert broker.bootstrap_servers == address
        assert asyncio.run(_read_all(address)) == [b"acked-before-crash"]
    finally:
        broker.stop()
