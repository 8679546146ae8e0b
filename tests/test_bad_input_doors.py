"""Hostile requests for the doors (Ingest, IngestStream, Submit, SubmitStream) (no tests).

Batches mix valid items, items that are certainly invalid (each naming the field that must be
refused) and hostile items that may be valid. The checks require every valid item accepted
and every invalid one refused with its field, and record the event ids reported accepted and
refused in ``DOOR_LEDGER``, which the tests compare with Kafka afterwards.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import strategies as st

from loopmesh.gen.loopmesh.v1 import feedback_pb2, ingestion_pb2
from tests.test_bad_input_mesh import BATCH_LIMIT, Mesh
from tests.test_bad_input_support import (
    EXHAUSTED,
    INVALID,
    OK,
    Case,
    bad_float,
    case,
    event_id,
    finite,
    hostile_text,
    huge,
    ident,
)

Checker = Callable[[Case, Any, str, list[Any]], None] | None
"""Checks a call's answer beyond its status: (case, code, details, decoded replies)."""
VALID, MAYBE = "", None
"""Item expectations: valid; hostile but possibly valid; else the refused field ('.': item)."""


@dataclass
class Ledger:
    accepted: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)


DOOR_LEDGER: defaultdict[str, Ledger] = defaultdict(Ledger)


def _stamp(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


def bad_times() -> st.SearchStrategy[Timestamp]:
    now = int(time.time())
    return st.sampled_from(
        [
            *(_stamp(0), _stamp(now + 86_400), _stamp(2**40), _stamp(-(2**40))),
            *(_stamp(now, -1), _stamp(now, 2_000_000_000), _stamp(now - 400 * 86_400)),
        ]
    )


# --- the doors ----------------------------------------------------------------------------------


def _mutation(target: str, values: st.SearchStrategy[Any], expect: str | None) -> Any:
    return values.map(lambda v: (target, v, expect))


def interaction() -> st.SearchStrategy[tuple[ingestion_pb2.InteractionEvent, str | None]]:
    mutations = st.one_of(
        st.just(("", None, VALID)),
        _mutation("entity_id", st.sampled_from(["", "   ", "x" * 257]), "entity_id"),
        _mutation("event_type", st.sampled_from(["", " ", "y" * 65]), "event_type"),
        _mutation("numeric", bad_float(), "numeric.k"),
        _mutation("numeric_key", st.sampled_from(["", "  ", "k" * 257]), "numeric"),
        _mutation("categorical", huge(256), "categorical"),
        _mutation("many", st.just(257), "numeric"),
        _mutation("event_time", bad_times(), "event_time"),
        _mutation("event_id", st.sampled_from(["z" * 257, "   "]), "event_id"),
        _mutation("entity_id", hostile_text(), MAYBE),
        _mutation("event_type", hostile_text(64), MAYBE),
        _mutation("categorical", hostile_text(), MAYBE),
    )

    def build(eid: str, entity: str, price: float, m: tuple[str, Any, str | None]) -> Any:
        e = ingestion_pb2.InteractionEvent(
            event_id=eid, entity_id=entity, event_type="click", numeric={"price": price}
        )
        target, value, expect = m
        if target == "numeric":
            e.numeric["k"] = value
        elif target == "numeric_key":
            e.numeric[value] = 1.0
        elif target == "categorical":
            e.categorical["c"] = value
        elif target == "many":
            e.numeric.update({f"n{i}": 1.0 for i in range(value)})
        elif target == "event_time":
            e.event_time.CopyFrom(value)
        elif target:
            setattr(e, target, value)
        return e, expect

    return st.builds(build, event_id(), ident(), finite(), mutations)


def _check_items(results: Sequence[Any], expects: Sequence[str | None], path: Any) -> None:
    for result, expect in zip(results, expects, strict=True):
        where = path(result.index)
        if expect == VALID:
            assert result.accepted, (where, result.field, result.reason)
        elif expect is MAYBE:
            assert result.accepted or result.field.startswith(where), (where, result.field)
        else:
            named = where if expect == "." else f"{where}.{expect}"
            assert not result.accepted and result.field.startswith(named), (
                named,
                result.field,
                result.reason,
            )


def _record(topic: str, ids: Sequence[str], outcomes: Sequence[bool]) -> None:
    ledger = DOOR_LEDGER[topic]
    for eid, accepted in zip(ids, outcomes, strict=True):
        if eid:
            (ledger.accepted if accepted else ledger.refused).add(eid)


def ingest_cases(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    def as_case(items: list[tuple[Any, str | None]]) -> Case:
        expects = [x for _, x in items]
        request = ingestion_pb2.IngestRequest(events=[e for e, _ in items])
        if not items:
            return case([request], INVALID, fields=["events: the batch is empty"])
        if any(x == VALID for x in expects):
            return case([request], OK, meta=expects)
        first = expects[0]
        named = "events[0]" if first is MAYBE else f"events[0].{first}"
        codes = (OK, INVALID) if MAYBE in expects else (INVALID,)
        return case([request], *codes, fields=[named], meta=expects)

    def check(c: Case, code: Any, details: str, replies: list[Any]) -> None:
        if code != OK or c.meta is None:
            return
        (reply,) = replies
        _check_items(reply.results, c.meta, lambda i: f"events[{i}]")
        _record(
            mesh.ingestion_topic,
            [r.event_id for r in reply.results],
            [r.accepted for r in reply.results],
        )

    too_many = st.integers(BATCH_LIMIT + 1, BATCH_LIMIT + 5).map(
        lambda n: case(
            [ingestion_pb2.IngestRequest(events=[ingestion_pb2.InteractionEvent()] * n)],
            EXHAUSTED,
        )
    )
    typed = st.one_of(st.lists(interaction(), max_size=6).map(as_case), too_many)
    return typed, (OK, INVALID, EXHAUSTED), check


def ingest_stream_cases(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    def as_case(batches: list[list[tuple[Any, str | None]]]) -> Case:
        requests = [ingestion_pb2.IngestRequest(events=[e for e, _ in b]) for b in batches]
        events = [e for b in batches for e, _ in b]
        return case(requests, OK, meta=(events, [x for b in batches for _, x in b]))

    def check(c: Case, code: Any, details: str, replies: list[Any]) -> None:
        if code != OK or c.meta is None:
            return
        (reply,) = replies
        events, expects = c.meta
        reported = {r.index: r for r in reply.results}
        assert reply.accepted + reply.rejected + reply.duplicates == len(events)
        for i, (event, expect) in enumerate(zip(events, expects, strict=True)):
            result = reported.get(i)
            if result is None:  # written now
                assert expect is MAYBE or expect == VALID, (i, expect)
                _record(mesh.ingestion_topic, [event.event_id], [True])
            else:
                _check_items([result], [expect], lambda n: f"events[{n}]")
                _record(mesh.ingestion_topic, [event.event_id], [result.accepted])

    batches = st.lists(st.lists(interaction(), max_size=4), max_size=3)
    too_many = st.just(
        case(
            [ingestion_pb2.IngestRequest(events=[ingestion_pb2.InteractionEvent()] * 60)], EXHAUSTED
        )
    )
    return st.one_of(batches.map(as_case), too_many), (OK, EXHAUSTED), check


def feedback_item() -> st.SearchStrategy[tuple[feedback_pb2.Feedback, str | None]]:
    mutations = st.one_of(
        st.just(("", None, VALID)),
        _mutation("prediction_id", st.sampled_from(["", "  ", "p" * 257]), "prediction_id"),
        _mutation("label", st.sampled_from([10_000, -1, 2**31 - 1]), "label"),
        _mutation("reward", bad_float(), "reward"),
        _mutation("outcome", st.just(None), "."),
        _mutation("attributes", huge(1024), "attributes"),
        _mutation("event_time", bad_times(), "event_time"),
        _mutation("prediction_id", hostile_text(), MAYBE),
        _mutation("attributes", hostile_text(1024), MAYBE),
    )

    def build(eid: str, pid: str, label: int, m: tuple[str, Any, str | None]) -> Any:
        f = feedback_pb2.Feedback(event_id=eid, prediction_id=pid, label=label)
        target, value, expect = m
        if target == "outcome":
            f.ClearField("label")
        elif target == "attributes":
            f.attributes["a"] = value
        elif target == "event_time":
            f.event_time.CopyFrom(value)
        elif target:
            setattr(f, target, value)
        return f, expect

    return st.builds(build, event_id(), ident(), st.sampled_from([0, 1]), mutations)


def submit_cases(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    def as_case(item: tuple[Any, str | None]) -> Case:
        f, expect = item
        request = feedback_pb2.SubmitRequest(feedback=f)
        if expect == VALID:
            return case([request], OK, meta=(f, expect))
        named = "feedback" if expect in (MAYBE, ".") else f"feedback.{expect}"
        codes = (OK, INVALID) if expect is MAYBE else (INVALID,)
        return case([request], *codes, fields=[named], meta=(f, expect))

    def check(c: Case, code: Any, details: str, replies: list[Any]) -> None:
        if c.meta is not None:
            _record(mesh.feedback_topic, [c.meta[0].event_id], [code == OK])

    return feedback_item().map(as_case), (OK, INVALID), check


def submit_stream_cases(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    def as_case(items: list[tuple[Any, str | None]]) -> Case:
        requests = [feedback_pb2.SubmitStreamRequest(feedback=f) for f, _ in items]
        return case(requests, OK, meta=items)

    def check(c: Case, code: Any, details: str, replies: list[Any]) -> None:
        if code != OK or c.meta is None:
            return
        results = [r.result for r in replies]
        assert [r.index for r in results] == list(range(len(c.meta)))
        _check_items(results, [x for _, x in c.meta], lambda _: "feedback")
        _record(mesh.feedback_topic, [f.event_id for f, _ in c.meta], [r.accepted for r in results])

    return st.lists(feedback_item(), max_size=6).map(as_case), (OK,), check
