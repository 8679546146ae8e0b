"""Small helpers shared by tests: unique topics, polling with a deadline, reading topics."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from aiokafka import AIOKafkaConsumer

from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import Topic

T = TypeVar("T")


def unique_topic(base: Topic) -> Topic:
    """The same topic definition under a fresh name, so tests never share data."""
    return replace(base, name=f"{base.name}.{uuid.uuid4().hex[:8]}")


async def eventually(
    check: Callable[[], Awaitable[T]], *, timeout: float = 30.0, interval: float = 0.1
) -> T:
    """Await ``check`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


async def from_the_beginning(settings: KafkaSettings, topic: str) -> AIOKafkaConsumer:
    """A started consumer of ``topic`` from its first offset, in no group (stop it after)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    return consumer


async def read_topic(
    settings: KafkaSettings, topic: str, *, expect: int, timeout: float = 60.0
) -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """Read ``topic`` from the beginning until ``expect`` messages arrived (or fail)."""
    consumer = await from_the_beginning(settings, topic)
    out: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend((r.key, r.value, list(r.headers)) for r in records)
    finally:
        await consumer.stop()
    if len(out) < expect:
        raise AssertionError(f"{topic}: {len(out)} of {expect} messages within {timeout}s")
    return out
