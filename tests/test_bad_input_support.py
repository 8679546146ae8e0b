"""Hostile requests for every gRPC method of the mesh, as hypothesis strategies (no tests here).

A ``Case`` is what goes on the wire (serialized bytes: one message, or the request stream) and
what may come back: the status codes that are right for it and, for INVALID_ARGUMENT, the
fields one of which the details must name first. Generic cases fit any method (bytes that are
not protobuf, a string field that is not UTF-8, a message over the server's size limit);
typed cases put hostile values into the fields a method has (huge strings, control
characters, path traversal, NaN and infinities, empty and oversized batches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from loopmesh.mesh import model_repo

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED
MAX_MESSAGE_BYTES = 64 * 1024
"""Every server under test is started with this receive limit."""
UNDECODABLE = "request"
"""The field the DecodeGuard names for a message that does not decode."""


@dataclass(frozen=True)
class Case:
    """One hostile call and the answers that are right for it."""

    messages: tuple[bytes, ...]
    """The request (one message) or the request stream (any number)."""
    codes: frozenset[grpc.StatusCode]
    fields: frozenset[str] = frozenset()
    """For INVALID_ARGUMENT: the details start with one of these (empty: not checked)."""
    meta: Any = field(default=None, compare=False)
    """What a method's own check needs (e.g. which items of a batch are valid)."""


def case(
    messages: Sequence[Message | bytes],
    *codes: grpc.StatusCode,
    fields: Sequence[str] = (),
    meta: Any = None,
) -> Case:
    wire = tuple(m if isinstance(m, bytes) else m.SerializeToString() for m in messages)
    return Case(wire, frozenset(codes), frozenset(fields), meta)


# --- hostile values ------------------------------------------------------------------------------

TRAVERSAL = [
    "../etc/passwd",
    "..",
    "/etc/passwd",
    "a/../../b",
    "a\x00b",
    "..\\..\\windows",
    "%2e%2e%2f",
    "~root",
    "model/1",
]
CONTROL = st.text(
    st.characters(codec="utf-8", categories=("Cc", "Cf", "Zs")), min_size=1, max_size=8
)


def huge(limit: int) -> st.SearchStrategy[str]:
    """Strings just beyond a field's length limit, or far beyond it."""
    return st.sampled_from([limit + 1, 4 * limit, 20_000]).map(lambda n: "x" * n)


def hostile_text(limit: int = 256) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=20),
        st.sampled_from(TRAVERSAL),
        CONTROL,
        huge(limit),
        st.sampled_from(["", " ", "\t", "é" * 3, "\U0001f600", "\ufeff"]),
    )


def bad_float() -> st.SearchStrategy[float]:
    return st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 1e13])


def any_float() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), bad_float())


def finite(limit: float = 1e9) -> st.SearchStrategy[float]:
    return st.floats(-limit, limit, allow_nan=False)


def ident(max_size: int = 24) -> st.SearchStrategy[str]:
    """A valid id (letters, digits, '-'), for fields that are not under test."""
    return st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=max_size)


def event_id() -> st.SearchStrategy[str]:
    return st.uuids().map(lambda u: u.hex)


def model_names(known: Sequence[str]) -> st.SearchStrategy[str]:
    """Known names, unknown well-formed names, and names a path could be made of."""
    return st.one_of(
        st.sampled_from(list(known)),
        ident(16).map(lambda s: f"m{s}"),
        st.sampled_from(TRAVERSAL),
        huge(64),  # echoed in a refusal, it must not outgrow the status (16 KiB)
        hostile_text(64),
    )


def versions() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["", "1", "2", "99", "0", "-1", "01", "1.5", " 1", "1\x00", "../1"]),
        st.sampled_from(TRAVERSAL),
        st.integers(0, 2**70).map(str),
    )


def bad_model_name(name: str) -> bool:
    """Not a repository's model name (the repository's own rule: that is what every door
    applies; the properties are about how a refusal is answered)."""
    try:
        model_repo.validate_model_name(name)
    except ValueError:
        return True
    return False


def bad_version(text: str) -> bool:
    try:
        model_repo.validate_version(text)
    except ValueError:
        return True
    return False


# --- generic cases: bytes that are not the method's message -------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _string_path(descriptor: Descriptor, depth: int = 0) -> list[int] | None:
    """Field numbers leading to a string field (through message fields), if any."""
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            return [f.number]
    if depth < 3:
        for f in descriptor.fields:
            if f.type == FieldDescriptor.TYPE_MESSAGE and not f.message_type.GetOptions().map_entry:
                inner = _string_path(f.message_type, depth + 1)
                if inner is not None:
                    return [f.number, *inner]
    return None


INVALID_UTF8 = st.one_of(
    st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"ab\xfe", b"\xe2\x82", b"\x80"]),
    st.binary(min_size=1, max_size=16).filter(lambda b: not _decodes(b)),
)


def _decodes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def generic_cases(
    method: MethodDescriptor, normal: Sequence[grpc.StatusCode]
) -> st.SearchStrategy[Case]:
    """Garbage, invalid UTF-8 in a string field, oversized: for any method."""
    accepted = (*normal, INVALID)
    options: list[st.SearchStrategy[Case]] = [
        # Random bytes may even parse (as unknown fields): then the method's normal answer.
        st.binary(max_size=64).map(lambda raw: case([raw], *accepted)),
        # Over the receive limit, in a field no schema knows: refused before decoding.
        st.integers(1, 4096).map(
            lambda extra: case(
                [_length_delimited(9999, b"x" * (MAX_MESSAGE_BYTES + extra))], EXHAUSTED
            )
        ),
        # A field number this schema does not have (a newer client): ignored, normal answer.
        st.binary(max_size=32).map(lambda raw: case([_length_delimited(4242, raw)], *normal)),
    ]
    path = _string_path(method.input_type)
    if path is not None:

        def nest(bad: bytes) -> bytes:
            payload = bad
            for number in reversed(path):
                payload = _length_delimited(number, payload)
            return payload

        options.append(
            INVALID_UTF8.map(lambda bad: case([nest(bad)], INVALID, fields=[UNDECODABLE]))
        )
    single = st.one_of(options)
    if not method.client_streaming:
        return single
    # Request streams: the hostile message after some that decode fine, or an empty stream.
    return st.tuples(st.integers(0, 2), single).map(
        lambda t: Case((b"",) * t[0] + t[1].messages, t[1].codes, t[1].fields)
    )
