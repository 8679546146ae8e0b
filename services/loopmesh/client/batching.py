"""Cutting items into requests the doors accept: at most ``max_items`` each (the doors'
batch limit) and at most ``max_bytes`` encoded (below their message limit). Pure logic."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar


class Sized(Protocol):
    def ByteSize(self) -> int: ...


M = TypeVar("M", bound=Sized)

FIELD_OVERHEAD = 6
"""Bytes a repeated message field adds per element at most: its tag and length prefix."""


def encoded_size(message: Sized) -> int:
    """Bytes ``message`` adds to a request as one element of a repeated field."""
    return message.ByteSize() + FIELD_OVERHEAD


def request_batches(
    messages: Sequence[M], max_items: int, max_bytes: int
) -> Iterator[tuple[int, Sequence[M]]]:
    """``(offset, batch)`` slices of ``messages`` in order, each within both limits; a message
    larger than ``max_bytes`` alone makes a batch of its own (the server then answers it)."""
    if max_items < 1:
        raise ValueError("max_items must be at least 1")
    start = 0
    size = 0
    for i, message in enumerate(messages):
        cost = encoded_size(message)
        if i > start and (i - start >= max_items or size + cost > max_bytes):
            yield start, messages[start:i]
            start, size = i, 0
        size += cost
    if start < len(messages):
        yield start, messages[start:]
