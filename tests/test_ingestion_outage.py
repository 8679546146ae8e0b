"""Kafka dying under open streams: clients get UNAVAILABLE and nothing acknowledged is lost.

Runs its own broker (the shared session broker is never stopped): kills it while an
IngestStream and a SubmitStream are writing, then brings it back on the same port and data.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Iterator
from pathlib import Path

import grpc
import pytest

from loopmesh.devstack.kafka import KafkaBroker
from loopmesh.gen.loopmesh.v1 import feedback_pb2 as fpb
from loopmesh.gen.loopmesh.v1 import feedback_pb2_grpc as fpb_grpc
from loopmesh.gen.loopmesh.v1 import ingestion_pb2 as ipb
from loopmesh.gen.loopmesh.v1 import ingestion_pb2_grpc as ipb_grpc
from loopmesh.mesh.intake_server import ACKED_TRAILER
from loopmesh.mesh.settings import KafkaSettings
from tests.helpers import eventually
from tests.test_ingestion_support import (
    event_ids,
    feedback,
    feedback_stub,
    ingestion,
    ingestion_stub,
    new_topic,
    read_all,
    running,
    topic_size,
)


@pytest.fixture(scope="module")
def own_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(Path(tmp_path_factory.mktemp("own-kafka")))
    broker.start()
    yield broker
    broker.stop()


ACK_TIMEOUT = 5.0  # short, to keep the test short; generous enough for a loaded machine


def event(i: int) -> ipb.InteractionEvent:
    return ipb.InteractionEvent(
        event_id=uuid.uuid4().hex, entity_id=f"user-{i % 31}", event_type="click"
    )


def feedback_item(i: int) -> fpb.Feedback:
    return fpb.Feedback(event_id=uuid.uuid4().hex, prediction_id=f"pred-{i}", label=i % 2)


async def accepted(call: Awaitable[object]) -> bool:
    """True when the call succeeded, False when it was UNAVAILABLE (retry)."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        return False
    return True


@pytest.mark.integration  # starts its own broker
async def test_broker_death_mid_stream_is_unavailable_and_loses_no_acknowledged_event(
    own_kafka: KafkaBroker,
) -> None:
    kafka = KafkaSettings(
        bootstrap_servers=own_kafka.bootstrap_servers,
        default_partitions=2,
        request_timeout_ms=3000,
    )
    events_topic, feedback_topic = new_topic("events.raw"), new_topic("feedback")
    sent_events: list[str] = []  # in stream order
    sent_feedback: list[str] = []
    acked_feedback: list[str] = []

    def endless_events() -> Iterator[ipb.IngestRequest]:
        # Paced by the server: it reads on only while its batches in flight get acknowledged.
        while True:
            batch = [event(len(sent_events) + j) for j in range(100)]
            sent_events.extend(e.event_id for e in batch)
            yield ipb.IngestRequest(events=batch)

    def endless_feedback() -> Iterator[fpb.SubmitStreamRequest]:
        while True:
            item = feedback_item(len(sent_feedback))
            sent_feedback.append(item.event_id)
            yield fpb.SubmitStreamRequest(feedback=item)

    # The streams use grpc's synchronous client: grpc.aio's client, while it is still writing
    # when the server ends a stream, may report INTERNAL instead of the server's status, or
    # hang (grpc/grpc#36066); the server's answer is UNAVAILABLE either way.
    def ingest_stream(address: str) -> grpc.RpcError:
        with grpc.insecure_channel(address) as channel:
            try:
                ipb_grpc.IngestionServiceStub(channel).IngestStream(endless_events(), timeout=180)
            except grpc.RpcError as err:
                return err
        raise AssertionError("the event stream ended without an error")

    def feedback_stream(address: str) -> grpc.RpcError:
        with grpc.insecure_channel(address) as channel:
            stub = fpb_grpc.FeedbackServiceStub(channel)
            try:
                for reply in stub.SubmitStream(endless_feedback(), timeout=180):
                    assert reply.result.accepted
                    acked_feedback.append(reply.result.event_id)
            except grpc.RpcError as err:
                return err
        raise AssertionError("the feedback stream ended without an error")

    ingestion_door = ingestion(kafka, events_topic, ack_timeout_seconds=ACK_TIMEOUT)
    feedback_door = feedback(kafka, feedback_topic, ack_timeout_seconds=ACK_TIMEOUT)
    async with running(ingestion_door) as events_channel, running(feedback_door) as fb_channel:
        ingest, submit = ingestion_stub(events_channel), feedback_stub(fb_channel)
        # New topics on a new broker: wait until both doors have written once.
        warm_event = event(0)
        await eventually(lambda: accepted(ingest.Ingest(ipb.IngestRequest(events=[warm_event]))))
        warm_feedback = feedback_item(0)
        await eventually(lambda: accepted(submit.Submit(fpb.SubmitRequest(feedback=warm_feedback))))

        ingest_call = asyncio.create_task(asyncio.to_thread(ingest_stream, ingestion_door.address))
        feedback_call = asyncio.create_task(
            asyncio.to_thread(feedback_stream, feedback_door.address)
        )

        async def both_writing() -> bool:
            if ingest_call.done() or feedback_call.done():
                raise AssertionError("a stream ended before the broker was killed")
            sizes = [await topic_size(kafka, t) for t in (events_topic, feedback_topic)]
            return min(sizes) >= 1000

        await eventually(both_writing, timeout=60)
        await asyncio.to_thread(own_kafka.kill)

        failed_events, failed_feedback = await asyncio.gather(ingest_call, feedback_call)
        assert failed_events.code() == grpc.StatusCode.UNAVAILABLE, failed_events.details()
        assert failed_feedback.code() == grpc.StatusCode.UNAVAILABLE, failed_feedback.details()
        trailer = dict(failed_events.trailing_metadata() or ())
        acked_events = int(trailer[ACKED_TRAILER])
        assert 0 < acked_events < len(sent_events)
        assert 0 < len(acked_feedback) < len(sent_feedback)

        # While Kafka is away, unary calls fail the same retryable way.
        for call in (
            ingest.Ingest(ipb.IngestRequest(events=[event(0)]), timeout=30),
            submit.Submit(fpb.SubmitRequest(feedback=feedback_item(0)), timeout=30),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        await asyncio.to_thread(own_kafka.restart)

        # The same service processes recover by themselves once the broker is back.
        late = event(1)

        await eventually(
            lambda: accepted(ingest.Ingest(ipb.IngestRequest(events=[late]), timeout=30)),
            timeout=90,
        )
        late_feedback = feedback_item(1)
        await eventually(
            lambda: accepted(submit.Submit(fpb.SubmitRequest(feedback=late_feedback), timeout=30)),
            timeout=90,
        )

    landed_events = set(event_ids(await read_all(kafka, events_topic)))
    missing = set(sent_events[:acked_events]) - landed_events
    assert not missing, f"{len(missing)} acknowledged events missing"
    assert late.event_id in landed_events
    landed_feedback = set(event_ids(await read_all(kafka, feedback_topic)))
    assert set(acked_feedback) <= landed_feedback
    assert late_feedback.event_id in landed_feedback
