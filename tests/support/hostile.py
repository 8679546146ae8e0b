"""Hostile Kafka messages for property tests, and a reader that collects dead letters.

``hostile(model, base)`` draws messages that no consumer may accept: invalid JSON and UTF-8,
empty and null values, wrong types, NaN and infinity literals, huge strings, unknown schema
versions, missing fields, extra nesting, garbage keys and headers. Each is built from a valid
event (``base``) so it reaches past the JSON parser into field validation, and every draw is
checked against the model: a payload the model accepts is not hostile and is never drawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from hypothesis import strategies as st
from pydantic import ValidationError

from loopmesh.mesh.events import DeadLetter, Event

PLACEHOLDER = "\u2603HOSTILE\u2603"
MAX_HUGE = 900_000
"""Huge values stay under the broker's default 1 MB message limit, so they can be produced."""


@dataclass(frozen=True)
class Bad:
    """One hostile message and why it is hostile."""

    kind: str
    value: bytes | None
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    def __repr__(self) -> str:  # keeps hypothesis' failure report readable for huge values
        shown = self.value if self.value is None or len(self.value) < 200 else self.value[:200]
        return f"Bad({self.kind}, value={shown!r}, key={self.key!r}, headers={self.headers!r})"


@dataclass(frozen=True)
class Sent:
    """Where a produced message landed."""

    partition: int
    offset: int
    value: bytes | None


def _splice(base: dict[str, Any], field: str, literal: bytes) -> bytes:
    """``base`` as JSON with ``field``'s value replaced by raw bytes (not valid JSON values)."""
    doc = dict(base)
    doc[field] = PLACEHOLDER
    return json.dumps(doc).encode().replace(json.dumps(PLACEHOLDER).encode(), literal)


def _rejected(model: type[Event], value: bytes | None) -> bool:
    try:
        model.model_validate_json(value or b"")
    except ValidationError:
        return True
    return False


WRONG_VALUES: list[Any] = [
    [],
    {},
    [1, 2],
    {"nested": {"deeper": [1]}},
    True,
    -1,
    0,
    12345678901234567890123,
    "",
    "not a number",
    None,
    1.5,
]


def hostile(model: type[Event], base: dict[str, Any], *, compacted: bool) -> st.SearchStrategy[Bad]:
    """Messages ``model`` must reject, built around the valid JSON object ``base``.

    ``compacted``: the topic is compacted, where a null value is a deletion marker, not a
    message, and the broker refuses null keys: neither is drawn there.
    """
    fields = sorted(base)
    required = sorted(n for n, f in model.model_fields.items() if f.is_required())
    required = [model.model_fields[n].alias or n for n in required]
    field = st.sampled_from(fields)

    def with_value(name: str, value: Any) -> bytes:
        return json.dumps({**base, name: value}).encode()

    values: list[st.SearchStrategy[tuple[str, bytes | None]]] = [
        st.text(max_size=40).map(lambda s: ("invalid-json", ("{" + s).encode())),
        st.sampled_from([b"[]", b'"text"', b"42", b"null", b"true", b"NaN"]).map(
            lambda v: ("not-an-object", v)
        ),
        st.tuples(field, st.binary(min_size=1, max_size=16)).map(
            lambda t: ("invalid-utf8", _splice(base, t[0], b'"\xff\xc3\x28' + t[1] + b'"'))
        ),
        st.just(("empty", b"")),
        st.tuples(field, st.sampled_from(WRONG_VALUES)).map(
            lambda t: ("wrong-type", with_value(*t))
        ),
        st.tuples(field, st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999"])).map(
            lambda t: ("nan-inf", _splice(base, t[0], t[1]))
        ),
        st.tuples(field, st.integers(min_value=1_000, max_value=MAX_HUGE)).map(
            lambda t: ("huge-string", with_value(t[0], "x" * t[1]))
        ),
        st.text(min_size=1, max_size=30)
        .filter(lambda s: s != model.SCHEMA)
        .map(lambda s: ("unknown-schema", with_value("schema", s))),
        st.sampled_from(["v2", "v0", "v1.1", "V1"]).map(
            lambda v: (
                "unknown-schema",
                with_value("schema", model.SCHEMA.rsplit(".", 1)[0] + "." + v),
            )
        ),
        st.sampled_from(required).map(
            lambda name: (
                "missing-field",
                json.dumps({k: v for k, v in base.items() if k != name}).encode(),
            )
        ),
        st.tuples(field, st.integers(min_value=1, max_value=3)).map(
            lambda t: ("extra-nesting", with_value(t[0], _nest(base[t[0]], t[1])))
        ),
        st.integers(min_value=150, max_value=50_000).map(
            lambda depth: ("deep-nesting", b"[" * depth + b"]" * depth)
        ),
        st.text(min_size=1, max_size=12)
        .filter(lambda k: k not in base)
        .map(lambda k: ("unknown-field", with_value(k, {"x": [1, {"y": None}]}))),
    ]
    keys = st.one_of(st.binary(max_size=32), st.sampled_from([b"\xff\xfe", b"", b"\x00" * 8]))
    if not compacted:
        values.append(st.just(("null-value", None)))
        keys = st.one_of(st.none(), keys)
    header = st.tuples(
        st.sampled_from(["traceparent", "tracestate", "baggage", "event_id", "schema", "x"]),
        st.one_of(st.binary(max_size=64), st.just(b"00-zz-\xff-01")),
    )
    headers = st.lists(header, max_size=4).map(tuple)
    return (
        st.tuples(st.one_of(values), keys, headers)
        # Kafka refuses a message with neither key nor value: such a message cannot exist.
        .map(lambda t: Bad(t[0][0], t[0][1], b"k" if t[0][1] is None else t[1], t[2]))
        .filter(lambda bad: _rejected(model, bad.value))
    )


def extremes(model: type[Event], base: dict[str, Any], *, compacted: bool) -> list[Bad]:
    """One message of each kind at its extreme, so every run covers them whatever is drawn."""
    key = b"\xff\xfe\x00"
    batch = [
        Bad("huge-string", json.dumps({**base, "event_id": "x" * MAX_HUGE}).encode(), key, ()),
        Bad("deep-nesting", b"[" * 100_000 + b"]" * 100_000, key, ()),
        Bad("invalid-utf8", _splice(base, "event_id", b'"\xff\xfe\xc3\x28"'), key, ()),
        Bad("nan-inf", _splice(base, "event_time", b"NaN"), key, (("traceparent", b"\xff"),)),
        Bad("empty", b"", key, ()),
    ]
    if not compacted:
        batch.append(Bad("null-value", None, b"k", ()))
        batch.append(Bad("null-key", b"{}", None, ()))
    assert all(_rejected(model, bad.value) for bad in batch)
    return batch


def _nest(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = {"value": [value]}
    return value


def as_json(event: Event) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(event.model_dump_json(by_alias=True))
    return loaded


async def send_all(
    producer: AIOKafkaProducer, topic: str, messages: list[tuple[bytes | None, bytes | None, Any]]
) -> list[Sent]:
    """Produce ``(value, key, headers)`` in order; returns where each landed."""
    futures = [
        await producer.send(topic, value=value, key=key, headers=list(headers))
        for value, key, headers in messages
    ]
    landed = await asyncio.gather(*futures)
    return [
        Sent(meta.partition, meta.offset, value)
        for meta, (value, _, _) in zip(landed, messages, strict=True)
    ]


class DeadLetters:
    """Reads every ``*.dlq`` topic of a test from the beginning, in the background."""

    def __init__(self, bootstrap_servers: str, topics: list[str]) -> None:
        self._consumer = AIOKafkaConsumer(
            *[f"{t}.dlq" for t in topics],
            bootstrap_servers=bootstrap_servers,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            metadata_max_age_ms=1000,
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
        )
        self.letters: list[DeadLetter] = []
        self.unreadable: list[bytes | None] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    try:
                        self.letters.append(DeadLetter.model_validate_json(record.value or b""))
                    except ValidationError:
                        self.unreadable.append(record.value)

    def groups_for(self, topic: str, sent: Sent) -> set[str]:
        """Consumer groups that dead-lettered the message ``sent`` to ``topic`` intact."""
        return {
            letter.consumer_group
            for letter in self.letters
            if letter.topic == topic
            and letter.partition == sent.partition
            and letter.offset == sent.offset
            and letter.value == sent.value
            and letter.reason
        }
