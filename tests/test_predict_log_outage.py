"""Kafka away while the data plane serves Predict and produces the prediction log itself
(issue 19): every Predict is still answered at once, the records wait in the producer's
bounded buffer, and once the broker is back every one of them is in ``predictions``, none
dropped.

Runs its own broker (the session broker is shared and never killed), killed with SIGKILL
mid-run and restarted on the same port and data.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from loopmesh.devstack.kafka import KafkaBroker
from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import inference_pb2, inference_pb2_grpc
from loopmesh.mesh.events import PredictionLogged
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import PREDICTIONS, ROLLOUTS
from tests.helpers import eventually, read_topic, unique_topic
from tests.test_inference_support import (
    CALL_TIMEOUT,
    FEATURES,
    feature_server,
    load,
    publish,
    running,
    settings_for,
)

MODEL = "outage"
BEFORE, DURING = 10, 40
OUTAGE_S = 2.0  # dead time before the restart begins (the JVM start adds seconds more)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[KafkaBroker]:
    own = KafkaBroker(tmp_path / "kafka")
    await asyncio.to_thread(own.start)
    try:
        yield own
    finally:
        await asyncio.to_thread(own.stop)


async def test_predictions_wait_out_a_broker_outage_and_all_reach_the_log(
    broker: KafkaBroker, triton: TritonServer, model_repository: Path
) -> None:
    publish(model_repository, MODEL, [1], FEATURES)
    await load(triton.grpc_url, MODEL)
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    topic = unique_topic(PREDICTIONS).name
    async with feature_server() as (_, features_url):
        settings = settings_for(
            kafka,
            triton.grpc_url,
            model_repository,
            features_url,
            predictions_topic=topic,
            rollouts_topic=unique_topic(ROLLOUTS).name,
            default_model=MODEL,
        )
        async with (
            running(settings) as gateway,
            grpc.aio.insecure_channel(gateway.address) as channel,
        ):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            async def predict(i: int) -> str:
                answer = await stub.Predict(
                    inference_pb2.PredictRequest(entity_id=f"o-{i}", context={"hour": i}),
                    timeout=CALL_TIMEOUT,
                )
                return str(answer.prediction_id)

            ids = await asyncio.gather(*(predict(i) for i in range(BEFORE)))
            await asyncio.to_thread(broker.kill)
            # No broker: the answers do not wait for Kafka (CALL_TIMEOUT bounds each).
            ids += await asyncio.gather(*(predict(i) for i in range(BEFORE, BEFORE + DURING)))
            await asyncio.sleep(OUTAGE_S)  # the outage itself, not a wait for a condition
            await asyncio.to_thread(broker.restart)

            records = await read_topic(kafka, topic, expect=len(ids), timeout=120)
            events = [PredictionLogged.model_validate_json(v) for _, v, _ in records if v]
            assert sorted(e.prediction_id for e in events) == sorted(ids)  # each once

            # None dropped: the data plane's counts reach the log's with its stats drains.
            async def counted() -> bool:
                await gateway.dataplane.drain_stats()
                return gateway.logger.logged >= len(ids)

            assert await eventually(counted, timeout=30)
            assert gateway.logger.dropped == 0
