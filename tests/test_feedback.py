"""The feedback door against the real broker: acknowledged by id, exactly once, faults named."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from loopmesh.devstack.process import free_port
from loopmesh.gen.loopmesh.v1 import feedback_pb2 as pb
from loopmesh.mesh.settings import KafkaSettings
from tests.helpers import eventually
from tests.test_ingestion_support import (
    PYTHON,
    call_through_reflection,
    event_ids,
    feedback,
    feedback_stub,
    new_topic,
    read_all,
    running,
    start_process,
    terminate,
    topic_size,
    wait_serving,
)

SERVICE = "loopmesh.v1.FeedbackService"


def item(i: int, **fields: object) -> pb.Feedback:
    values: dict[str, object] = {
        "event_id": uuid.uuid4().hex,
        "prediction_id": f"pred-{i}",
        "label": i % 2,
    }
    values.update(fields)
    return pb.Feedback(**values)  # type: ignore[arg-type]


async def test_ten_thousand_streamed_feedback_acknowledged_by_id_land_once(
    kafka_settings: KafkaSettings,
) -> None:
    topic = new_topic("feedback")
    sent = [item(i) for i in range(10_000)]

    async def stream() -> AsyncIterator[pb.SubmitStreamRequest]:
        for feedback_item in sent:
            yield pb.SubmitStreamRequest(feedback=feedback_item)

    async with running(feedback(kafka_settings, topic)) as channel:
        acks = [
            reply.result
            async for reply in feedback_stub(channel).SubmitStream(stream(), timeout=180)
        ]
    # One ack per item, in stream order, each naming the feedback it acknowledges.
    assert [a.index for a in acks] == list(range(10_000))
    assert [a.event_id for a in acks] == [f.event_id for f in sent]
    assert all(a.accepted and not a.reason for a in acks)

    records = await read_all(kafka_settings, topic)
    counts = Counter(event_ids(records))
    assert len(records) == 10_000
    assert set(counts) == {f.event_id for f in sent}
    assert max(counts.values()) == 1
    assert all(key == value["prediction_id"].encode() for key, value in records)
    # Only the outcome travels: never a prediction payload.
    assert set(records[0][1]) == {
        "event_id",
        "schema",
        "event_time",
        "prediction_id",
        "label",
        "reward",
        "value",
        "attributes",
    }


async def test_stream_refuses_bad_items_with_reasons_and_goes_on(
    kafka_settings: KafkaSettings,
) -> None:
    topic = new_topic("feedback")
    future = Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(days=2))
    stream_items = [
        item(0),
        pb.Feedback(event_id="no-outcome", prediction_id="p"),
        item(2, label=10_000),  # class indices are 0..9999
        item(3, label=None, reward=math.nan),
        item(4, prediction_id=""),
        item(5, event_time=future),
        item(6, label=None, reward=-2.5, attributes={"surface": "  email "}),
        item(7, label=None, reward=1e13),
    ]
    faults = {
        1: "feedback",
        2: "feedback.label",
        3: "feedback.reward",
        4: "feedback.prediction_id",
        5: "feedback.event_time",
        7: "feedback.reward",
    }

    async def stream() -> AsyncIterator[pb.SubmitStreamRequest]:
        for feedback_item in stream_items:
            yield pb.SubmitStreamRequest(feedback=feedback_item)

    async with running(feedback(kafka_settings, topic)) as channel:
        acks = [r.result async for r in feedback_stub(channel).SubmitStream(stream(), timeout=30)]
    assert [a.index for a in acks] == list(range(len(stream_items)))
    assert {a.index: a.field for a in acks if not a.accepted} == faults
    assert "a label, a value or a reward" in acks[1].reason
    assert "finite" in acks[3].reason

    records = await read_all(kafka_settings, topic)
    landed = {value["event_id"]: value for _, value in records}
    assert set(landed) == {stream_items[0].event_id, stream_items[6].event_id}
    assert landed[stream_items[6].event_id]["reward"] == -2.5
    assert landed[stream_items[6].event_id]["attributes"] == {"surface": "email"}


async def test_values_and_class_labels_are_taken_within_the_doors_limits(
    kafka_settings: KafkaSettings,
) -> None:
    """A regression target (``value``) and a multiclass label (a class index 0..9999) are
    outcomes of their own; out-of-range ones are refused naming the field."""
    topic = new_topic("feedback")
    good = [
        item(0, label=None, value=42.5),  # a value alone is an outcome
        item(1, label=9_999),  # the largest class index
        item(2, label=3, value=-7.0, reward=1.0),
        item(3, label=None, value=1e3),  # at the door's max_abs_value
    ]
    bad = [
        (item(4, label=-1), "feedback.label"),
        (item(5, label=10_000), "feedback.label"),
        (item(6, label=None, value=math.nan), "feedback.value"),
        (item(7, label=None, value=-math.inf), "feedback.value"),
        (item(8, label=None, value=1e3 + 1), "feedback.value"),
        (item(9, label=1, value=-2e3), "feedback.value"),
    ]
    limits = {"limits": {"max_abs_value": 1e3}}
    async with running(feedback(kafka_settings, topic, **limits)) as channel:
        stub = feedback_stub(channel)
        for sent in good:
            reply = await stub.Submit(pb.SubmitRequest(feedback=sent), timeout=30)
            assert reply.event_id == sent.event_id and not reply.duplicate
        for sent, field in bad:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Submit(pb.SubmitRequest(feedback=sent), timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (caught.value.details() or "").startswith(f"{field}: "), caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Submit(
                pb.SubmitRequest(feedback=pb.Feedback(event_id="none", prediction_id="p")),
                timeout=30,
            )
        assert "a label, a value or a reward" in (caught.value.details() or "")

    records = await read_all(kafka_settings, topic)
    landed = {value["event_id"]: value for _, value in records}
    assert set(landed) == {f.event_id for f in good}
    outcomes = [
        (landed[f.event_id]["label"], landed[f.event_id]["value"], landed[f.event_id]["reward"])
        for f in good
    ]
    assert outcomes == [(None, 42.5, None), (9_999, None, None), (3, -7.0, 1.0), (None, 1e3, None)]


async def test_submit_names_the_fault_and_drops_a_resend(kafka_settings: KafkaSettings) -> None:
    topic = new_topic("feedback")
    async with running(feedback(kafka_settings, topic)) as channel:
        stub = feedback_stub(channel)
        good = item(1, label=None, reward=0.25)
        first = await stub.Submit(pb.SubmitRequest(feedback=good), timeout=30)
        resend = await stub.Submit(pb.SubmitRequest(feedback=good), timeout=30)
        assigned = await stub.Submit(pb.SubmitRequest(feedback=item(2, event_id="")), timeout=30)
        for bad, field in (
            (pb.Feedback(prediction_id="p"), "feedback: "),
            (item(3, label=-1), "feedback.label: "),
            (item(4, label=None, reward=-math.inf), "feedback.reward: "),
            (item(5, prediction_id="  "), "feedback.prediction_id: "),
            (item(6, attributes={"": "x"}), "feedback.attributes..[key]: "),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Submit(pb.SubmitRequest(feedback=bad), timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (caught.value.details() or "").startswith(field), caught.value.details()
    assert (first.event_id, first.duplicate) == (good.event_id, False)
    assert (resend.event_id, resend.duplicate) == (good.event_id, True)
    assert assigned.event_id and not assigned.duplicate
    assert sorted(event_ids(await read_all(kafka_settings, topic))) == sorted(
        [good.event_id, assigned.event_id]
    )


async def test_each_feedback_is_acknowledged_before_the_client_sends_the_next(
    kafka_settings: KafkaSettings,
) -> None:
    topic = new_topic("feedback")
    async with running(feedback(kafka_settings, topic)) as channel:
        call = feedback_stub(channel).SubmitStream(timeout=30)
        for i in range(3):
            sent = item(i)
            await call.write(pb.SubmitStreamRequest(feedback=sent))
            ack = await call.read()
            assert ack.result.event_id == sent.event_id and ack.result.accepted
            # Acknowledged means durable: it is in Kafka before the next one is sent.
            assert await topic_size(kafka_settings, topic) == i + 1
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_grpcurl_style_submit_through_reflection(kafka_settings: KafkaSettings) -> None:
    topic = new_topic("feedback")
    server = feedback(kafka_settings, topic)
    request = {"feedback": {"event_id": "reflected", "prediction_id": "p-1", "reward": 1.5}}
    async with running(server):
        reply = await asyncio.to_thread(
            call_through_reflection, server.address, SERVICE, "Submit", request
        )
    assert reply == {"event_id": "reflected"}
    assert event_ids(await read_all(kafka_settings, topic)) == ["reflected"]


async def test_loopmesh_serve_feedback_serves_and_stops_on_sigterm(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    topic = new_topic("feedback")
    port = free_port()
    log = tmp_path / "feedback.log"
    process = start_process(
        [PYTHON, "-m", "loopmesh.cli", "serve", "feedback"],
        {
            "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
            "LOOPMESH_KAFKA__DEFAULT_PARTITIONS": str(kafka_settings.default_partitions),
            "LOOPMESH_FEEDBACK__SERVER__PORT": str(port),
            "LOOPMESH_FEEDBACK__TOPIC": topic,
        },
        log,
    )
    try:
        await wait_serving(process, f"127.0.0.1:{port}", SERVICE, log)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await feedback_stub(channel).Submit(
                pb.SubmitRequest(feedback=item(1)), timeout=30
            )
        assert reply.event_id
        assert await eventually(lambda: topic_size(kafka_settings, topic)) == 1
    finally:
        code = await terminate(process)
    assert code == 0, log.read_text()
