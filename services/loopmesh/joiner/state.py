"""The joiner's bounded state besides the join table: the age index of unmatched feedback and
the erased entities.

``UnmatchedFeedback`` orders feedback-only entries by creation so the oldest go first, both
when they outwait ``unmatched_feedback_wait_seconds`` and when there are more than
``max_unmatched_feedback`` (one worker's cap). It is in memory and bounded by that cap; the
entries themselves live in the join table (on disk). The sweeper rebuilds it from the table
after a restart or a rebalance.

``ErasureLog`` maps an erased entity to the time of its erasure. It is rebuilt from the
compacted ``entities.erased`` on every start (every worker needs every entity: erasures are
keyed by entity, joins by prediction), into RocksDB when the table is on disk, so the number
of erasures ever made does not set the process' memory.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_CREATED = re.compile(rb'^\{"created":(-?[0-9][0-9.eE+-]*)[,}]')
# JoinEntry.encode writes a set prediction as this key; inside JSON strings quotes are escaped,
# and a feedback-only entry has no nested object with free-form keys, so the bytes cannot
# appear in one by accident.
_HAS_PREDICTION = b'"prediction":'


def created_of(raw: bytes) -> float | None:
    """An encoded JoinEntry's ``created`` without decoding it (the sweeper reads every entry;
    a prediction's features make a full decode cost ten times more); None if not found."""
    match = _CREATED.match(raw)
    return float(match.group(1)) if match else None


def has_prediction(raw: bytes) -> bool:
    """Whether an encoded JoinEntry holds its prediction (else it is feedback waiting)."""
    return _HAS_PREDICTION in raw


@dataclass(frozen=True, slots=True)  # slots: up to a cap's worth live at once
class Waiting:
    """Where an unmatched feedback entry is and since when."""

    key: bytes
    created: float
    partition: int


class UnmatchedFeedback:
    """Feedback-only join entries by age (oldest first), at most ``cap`` of them."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._entries: OrderedDict[bytes, Waiting] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def add(self, waiting: Waiting) -> list[Waiting]:
        """Remember a new unmatched entry; returns the oldest ones beyond the cap, removed."""
        self._entries.pop(waiting.key, None)
        self._entries[waiting.key] = waiting
        return self._over_cap()

    def discard(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def expired(self, now: float, wait: float) -> list[Waiting]:
        """The entries older than ``wait``, removed (they are in creation order)."""
        gone: list[Waiting] = []
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.created <= wait:
                break
            gone.append(self._entries.popitem(last=False)[1])
        return gone

    def merge(self, found: Iterable[Waiting]) -> list[Waiting]:
        """Take entries found in the table (after a restart or a rebalance), restore age order,
        and return the oldest ones beyond the cap, removed."""
        fresh = [w for w in found if w.key not in self._entries]
        if not fresh:
            return []
        merged = sorted([*self._entries.values(), *fresh], key=lambda w: w.created)
        self._entries = OrderedDict((w.key, w) for w in merged)
        return self._over_cap()

    def forget_partitions(self, partitions: set[int]) -> None:
        """Drop the entries of partitions this worker no longer owns (their owner keeps them)."""
        for key in [k for k, w in self._entries.items() if w.partition in partitions]:
            del self._entries[key]

    def _over_cap(self) -> list[Waiting]:
        dropped: list[Waiting] = []
        while len(self._entries) > self.cap:
            dropped.append(self._entries.popitem(last=False)[1])
        return dropped


class _Bytes(Protocol):
    def get(self, key: bytes) -> bytes | None: ...
    def put(self, key: bytes, value: bytes) -> None: ...
    def close(self) -> None: ...


class _InMemory:
    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self._data[key] = value

    def close(self) -> None:
        self._data.clear()


class _OnDisk:
    def __init__(self, path: Path) -> None:
        import rocksdict  # the joiner's dependency, imported where it is used

        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        # Small: lookups are one per prediction, and the log is read again at every start.
        options.set_write_buffer_size(4 * 1024 * 1024)
        options.set_max_write_buffer_number(2)
        table = rocksdict.BlockBasedOptions()
        table.set_block_cache(rocksdict.Cache(8 * 1024 * 1024))
        table.set_bloom_filter(10, block_based=False)
        options.set_block_based_table_factory(table)
        path.mkdir(parents=True, exist_ok=True)
        self._db = rocksdict.Rdict(str(path), options=options)

    def get(self, key: bytes) -> bytes | None:
        value = self._db.get(key)
        return value if isinstance(value, bytes) else None

    def put(self, key: bytes, value: bytes) -> None:
        self._db.put(key, value)

    def close(self) -> None:
        self._db.close()


class ErasureLog:
    """Erased entity -> erasure time (epoch seconds); on disk at ``path``, else in memory."""

    def __init__(self, path: Path | None) -> None:
        self._store: _Bytes = _OnDisk(path) if path is not None else _InMemory()

    def record(self, entity_id: str, at: float) -> bool:
        """Remember an erasure; True when it is newer than what was known of the entity."""
        key = entity_id.encode()
        known = self.erased_at(entity_id)
        if known is not None and known >= at:
            return False
        self._store.put(key, struct.pack(">d", at))
        return True

    def erased_at(self, entity_id: str) -> float | None:
        raw = self._store.get(entity_id.encode())
        return struct.unpack(">d", raw)[0] if raw is not None else None

    def covers(self, entity_id: str, at: float) -> bool:
        """Whether data of ``entity_id`` from time ``at`` was erased (erased at or after it)."""
        erased = self.erased_at(entity_id)
        return erased is not None and at <= erased

    def close(self) -> None:
        self._store.close()
