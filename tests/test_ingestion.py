"""The ingestion door against the real broker: streams land exactly once, bad input is named."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import SecretStr

from loopmesh.devstack.process import free_port
from loopmesh.gen.loopmesh.v1 import ingestion_pb2 as pb
from loopmesh.mesh.intake_server import ACKED_TRAILER
from loopmesh.mesh.privacy import PrivacySettings
from loopmesh.mesh.settings import KafkaSettings
from tests.helpers import eventually
from tests.test_ingestion_support import (
    PYTHON,
    call_through_reflection,
    event_ids,
    ingestion,
    ingestion_stub,
    new_topic,
    read_all,
    running,
    start_process,
    terminate,
    topic_size,
    wait_serving,
)

SERVICE = "loopmesh.v1.IngestionService"


def event(i: int, **fields: object) -> pb.InteractionEvent:
    values: dict[str, object] = {
        "event_id": uuid.uuid4().hex,
        "entity_id": f"user-{i % 97}",
        "event_type": "click",
        "numeric": {"price": float(i % 50)},
        "categorical": {"page": "home"},
    }
    values.update(fields)
    return pb.InteractionEvent(**values)  # type: ignore[arg-type]


def at(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


async def test_ten_thousand_streamed_events_land_exactly_once(
    kafka_settings: KafkaSettings,
) -> None:
    topic = new_topic("events.raw")
    sent = [event(i) for i in range(10_000)]

    async def batches() -> AsyncIterator[pb.IngestRequest]:
        for start in range(0, len(sent), 250):
            yield pb.IngestRequest(events=sent[start : start + 250])

    async with running(ingestion(kafka_settings, topic)) as channel:
        reply = await ingestion_stub(channel).IngestStream(batches(), timeout=120)
    assert (reply.accepted, reply.rejected, reply.duplicates) == (10_000, 0, 0)
    assert not reply.results

    # The reply came after the acks, so everything is readable now: count and ids compared.
    records = await read_all(kafka_settings, topic)
    counts = Counter(event_ids(records))
    assert len(records) == 10_000
    assert set(counts) == {e.event_id for e in sent}
    assert max(counts.values()) == 1
    # Keyed by entity, so one entity's events stay in order on one partition.
    assert all(key == value["entity_id"].encode() for key, value in records)


async def test_mixed_batch_keeps_valid_events_and_names_each_fault(
    kafka_settings: KafkaSettings,
) -> None:
    topic = new_topic("events.raw")
    now = datetime.now(UTC)
    good = [
        event(0, entity_id="  user-a  ", event_type=" Add to-Cart "),
        event(1, event_time=at(now - timedelta(hours=1))),
        event(2, event_id=""),  # the server assigns an id
    ]
    bad = {
        3: (event(3, entity_id="   "), "events[3].entity_id"),
        4: (event(4, numeric={"price": math.nan}), "events[4].numeric.price"),
        5: (event(5, numeric={"price": math.inf}), "events[5].numeric.price"),
        6: (event(6, numeric={"price": 1e300}), "events[6].numeric.price"),
        7: (event(7, event_type=""), "events[7].event_type"),
        8: (event(8, event_time=at(now + timedelta(days=1))), "events[8].event_time"),
        # Issue 20: beyond the features' allowed lateness no view would count it, so the door
        # refuses it (it used to accept 30 days).
        9: (event(9, event_time=at(now - timedelta(hours=25))), "events[9].event_time"),
        10: (event(10, numeric={" ": 1.0}), "events[10].numeric. .[key]"),
    }
    # Within the features' default allowed lateness: counted, so accepted.
    within = event(11, event_time=at(now - timedelta(hours=23)))
    request = pb.IngestRequest(events=[*good, *(message for message, _ in bad.values()), within])
    async with running(ingestion(kafka_settings, topic)) as channel:
        reply = await ingestion_stub(channel).Ingest(request, timeout=30)

    assert (reply.accepted, reply.rejected, reply.duplicates) == (4, len(bad), 0)
    assert [r.index for r in reply.results] == list(range(len(request.events)))
    for result in [*reply.results[:3], reply.results[11]]:
        assert result.accepted and not result.field and not result.reason
    for result in reply.results[3:11]:
        _, field = bad[result.index]
        assert not result.accepted
        assert result.field == field, (result.field, result.reason)
        assert result.reason
        assert result.event_id == request.events[result.index].event_id
    reasons = {r.index: r.reason for r in reply.results}
    assert "finite" in reasons[4] and "finite" in reasons[5]
    assert "out of range" in reasons[6]
    assert "future" in reasons[8] and "older" in reasons[9]

    records = await read_all(kafka_settings, topic)
    landed = {value["event_id"]: value for _, value in records}
    assert set(landed) == {r.event_id for r in [*reply.results[:3], reply.results[11]]}
    assert reply.results[2].event_id  # assigned
    cleaned = landed[good[0].event_id]
    assert cleaned["entity_id"] == "user-a"
    assert cleaned["event_type"] == "add_to_cart"


async def test_malformed_and_oversized_requests_are_refused_whole(
    kafka_settings: KafkaSettings,
) -> None:
    topic = new_topic("events.raw")
    server = ingestion(
        kafka_settings,
        topic,
        server={"max_message_bytes": 64 * 1024},
        limits={"max_batch_items": 100},
    )
    async with running(server) as channel:
        stub = ingestion_stub(channel)
        cases = [
            (pb.IngestRequest(), grpc.StatusCode.INVALID_ARGUMENT, "events: the batch is empty"),
            (
                pb.IngestRequest(events=[event(0, entity_id=""), event(1, event_type="  ")]),
                grpc.StatusCode.INVALID_ARGUMENT,
                "events[0].entity_id: String should have at least 1 character",
            ),
            (
                pb.IngestRequest(events=[event(i) for i in range(101)]),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "101 events in one request; the limit is 100",
            ),
            (
                pb.IngestRequest(events=[event(0, categorical={"blob": "x" * 100_000})]),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "",
            ),
        ]
        for request, code, details in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Ingest(request, timeout=30)
            assert caught.value.code() == code
            assert details in (caught.value.details() or "")

        # A stream stops at an oversized batch, after writing and counting the ones before it.
        async def stream() -> AsyncIterator[pb.IngestRequest]:
            yield pb.IngestRequest(events=[event(i) for i in range(3)])
            yield pb.IngestRequest(events=[event(i) for i in range(101)])

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.IngestStream(stream(), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailer = dict(tuple(caught.value.trailing_metadata() or ()))
        assert trailer[ACKED_TRAILER] == "3"
        # The door still works after refusing.
        assert (await stub.Ingest(pb.IngestRequest(events=[event(1)]), timeout=30)).accepted == 1
    assert await topic_size(kafka_settings, topic) == 4


async def test_repeated_event_ids_are_written_once(kafka_settings: KafkaSettings) -> None:
    topic = new_topic("events.raw")
    batch = [event(i) for i in range(20)]
    async with running(ingestion(kafka_settings, topic)) as channel:
        stub = ingestion_stub(channel)
        first = await stub.Ingest(pb.IngestRequest(events=batch), timeout=30)
        # A client retry of the whole batch, plus a copy of one event inside the same request.
        again = await stub.Ingest(pb.IngestRequest(events=[*batch, batch[0]]), timeout=30)

        async def streamed() -> AsyncIterator[pb.IngestRequest]:
            yield pb.IngestRequest(events=batch[:5])
            yield pb.IngestRequest(events=[event(99), event(99, event_id="")])

        stream = await stub.IngestStream(streamed(), timeout=30)
    assert first.accepted == 20
    assert (again.accepted, again.duplicates) == (0, 21)
    assert all(r.accepted and r.reason == "duplicate" for r in again.results)
    assert (stream.accepted, stream.duplicates) == (2, 5)
    assert [r.index for r in stream.results] == [0, 1, 2, 3, 4]
    assert await topic_size(kafka_settings, topic) == 22


async def test_pseudonymised_entity_ids_never_reach_kafka(kafka_settings: KafkaSettings) -> None:
    topic = new_topic("events.raw")
    key = SecretStr(uuid.uuid4().hex + uuid.uuid4().hex)
    privacy = PrivacySettings(pseudonymise_entity_ids=True, entity_id_key=key)
    raw_ids = ["alice@example.com", "bob@example.com"]
    request = pb.IngestRequest(events=[event(i, entity_id=f" {raw_ids[i % 2]} ") for i in range(4)])
    async with running(ingestion(kafka_settings, topic, privacy=privacy)) as channel:
        reply = await ingestion_stub(channel).Ingest(request, timeout=30)
    assert reply.accepted == 4

    records = await read_all(kafka_settings, topic)
    expected = {
        hmac.new(key.get_secret_value().encode(), raw.encode(), hashlib.sha256).hexdigest()
        for raw in raw_ids
    }
    assert {value["entity_id"] for _, value in records} == expected
    assert {key for key, _ in records} == {pseudonym.encode() for pseudonym in expected}
    for _, value in records:
        assert not any(raw in str(value) for raw in raw_ids)


async def test_grpcurl_style_call_through_reflection(kafka_settings: KafkaSettings) -> None:
    topic = new_topic("events.raw")
    request = {
        "events": [
            {"event_id": "reflected-1", "entity_id": "u1", "event_type": "view"},
            {"event_id": "reflected-2", "entity_id": "", "event_type": "view"},
        ]
    }
    server = ingestion(kafka_settings, topic)
    async with running(server):
        reply = await asyncio.to_thread(
            call_through_reflection, server.address, SERVICE, "Ingest", request
        )
    assert reply["accepted"] == 1 and reply["rejected"] == 1
    assert reply["results"][1]["field"] == "events[1].entity_id"
    assert event_ids(await read_all(kafka_settings, topic)) == ["reflected-1"]


async def test_python_m_services_ingestion_serves_and_stops_on_sigterm(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    topic = new_topic("events.raw")
    port = free_port()
    log = tmp_path / "ingestion.log"
    process = start_process(
        [PYTHON, "-m", "loopmesh.ingestion"],
        {
            "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
            "LOOPMESH_KAFKA__DEFAULT_PARTITIONS": str(kafka_settings.default_partitions),
            "LOOPMESH_INGESTION__SERVER__PORT": str(port),
            "LOOPMESH_INGESTION__TOPIC": topic,
        },
        log,
    )
    try:
        await wait_serving(process, f"127.0.0.1:{port}", SERVICE, log)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await ingestion_stub(channel).Ingest(
                pb.IngestRequest(events=[event(1)]), timeout=30
            )
        assert reply.accepted == 1
        # The process declared its topic itself and wrote there.
        assert await eventually(lambda: topic_size(kafka_settings, topic)) == 1
    finally:
        code = await terminate(process)
    assert code == 0, log.read_text()
