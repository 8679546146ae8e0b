"""Inference gateway faults: a crashed tritonserver, and the rollouts topic as the route source.

The Triton test starts its OWN tritonserver (never the session's) and kills it.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from loopmesh.devstack.process import free_port
from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import inference_pb2, inference_pb2_grpc
from loopmesh.inference.routing import RouteTable, follow_routes
from loopmesh.mesh.bus import EventProducer, declare_topics
from loopmesh.mesh.events import DeadLetter, RolloutChanged
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


async def test_killed_triton_gives_unavailable_and_restart_restores_service(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    publish(repo, "crashy", [1], FEATURES)
    server = TritonServer(repo, tmp_path / "triton")
    await asyncio.to_thread(server.start)
    try:
        await load(server.grpc_url, "crashy")
        # A newer version on disk that nobody loaded (a fresh candidate) must not take traffic.
        publish(repo, "crashy", [2], FEATURES)
        async with feature_server() as (_, features_url):
            settings = settings_for(
                kafka_settings,
                server.grpc_url,
                repo,
                features_url,
                predictions_topic=unique_topic(PREDICTIONS).name,
                rollouts_topic=unique_topic(ROLLOUTS).name,
                default_model="crashy",
            )
            async with (
                running(settings) as gateway,
                grpc.aio.insecure_channel(gateway.address) as channel,
            ):
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                request = inference_pb2.PredictRequest(entity_id="erin")
                before = await stub.Predict(request, timeout=CALL_TIMEOUT)
                assert (before.arm, before.model_version) == ("latest", 1)
                shutil.rmtree(repo / "crashy" / "2")  # withdrawn: the reload below is faster

                await asyncio.to_thread(server.kill)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Predict(request, timeout=CALL_TIMEOUT)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                x = np.zeros((1, len(FEATURES)), dtype=np.float32)
                inp = aioclient.InferInput("INPUT__0", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                async with aioclient.InferenceServerClient(gateway.address) as client:
                    with pytest.raises(InferenceServerException) as oip_error:
                        await client.infer("crashy", [inp], model_version="1", client_timeout=10)
                    assert oip_error.value.status() == "StatusCode.UNAVAILABLE"
                    assert not await client.is_server_ready(client_timeout=10)

                # Same ports, same gateway: service comes back once Triton and the model do.
                await asyncio.to_thread(server.start)
                await load(server.grpc_url, "crashy")

                async def served() -> inference_pb2.PredictResponse | None:
                    try:
                        return await stub.Predict(request, timeout=CALL_TIMEOUT)
                    except grpc.aio.AioRpcError as err:
                        assert err.code() == grpc.StatusCode.UNAVAILABLE
                        return None

                after = await eventually(served, timeout=30)
                assert after.score == pytest.approx(before.score)
                async with aioclient.InferenceServerClient(gateway.address) as client:
                    assert await client.is_server_ready(client_timeout=10)
    finally:
        await asyncio.to_thread(server.stop)


async def test_routes_follow_the_rollouts_topic_from_its_beginning(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    topic = unique_topic(ROLLOUTS)
    await declare_topics(kafka_settings, [topic])
    producer = EventProducer(kafka_settings, "test-rollouts")
    await producer.start()
    try:
        await producer.publish(
            topic, RolloutChanged(model_name="m1", stable_version=1, state="stable")
        )
        await producer.publish(
            topic,
            RolloutChanged(
                model_name="m1",
                stable_version=1,
                canary_version=2,
                canary_weight=0.25,
                state="canary",
                step=1,
            ),
        )
        await producer.publish(
            topic, RolloutChanged(model_name="m2", stable_version=5, state="stable")
        )
        await producer.publish_raw(topic.name, value=b'{"model_name": 7}', key=b"m3", headers=[])

        # Started after the events: it must read them all, keeping the latest per model.
        table = RouteTable()
        follower = follow_routes(kafka_settings, topic, table)  # counts, does not dead-letter
        await follower.follow(catchup_timeout=30)
        try:
            m1, m2 = table.get("m1"), table.get("m2")
            assert m1 is not None and m2 is not None
            assert (m1.stable_version, m1.canary_version, m1.canary_weight) == (1, 2, 0.25)
            assert (m1.state, m1.step, m1.source) == ("canary", 1, "rollouts")
            assert (m2.stable_version, m2.canary_version) == (5, None)
            assert table.get("m3") is None and follower.dead_lettered == 1

            # A change while running replaces the route without a restart.
            await producer.publish(
                topic,
                RolloutChanged(
                    model_name="m1", stable_version=1, canary_version=2, state="rolled_back"
                ),
            )

            async def rolled_back() -> bool:
                route = table.get("m1")
                return route is not None and route.state == "rolled_back"

            await eventually(rolled_back, timeout=20)
            route = table.get("m1")
            assert route is not None and route.choose("anyone") == (1, "stable")
        finally:
            await follower.stop()
    finally:
        await producer.stop()

    # Through the gateway, the malformed event is dead-lettered with its reason.
    settings = settings_for(
        kafka_settings,
        f"127.0.0.1:{free_port()}",  # Triton is not needed to follow routes
        tmp_path,
        f"127.0.0.1:{free_port()}",
        predictions_topic=unique_topic(PREDICTIONS).name,
        rollouts_topic=topic.name,
    )
    async with running(settings) as gateway:
        route = gateway.routes.get("m1")
        assert route is not None and route.state == "rolled_back"
    [(key, value, _)] = await read_topic(kafka_settings, topic.dlq, expect=1)
    letter = DeadLetter.model_validate_json(value or b"")
    assert key == b"m3" and letter.topic == topic.name and letter.value == b'{"model_name": 7}'
    assert "model_name" in letter.reason
    assert uuid.UUID(letter.event_id)  # fixed by the source offset, so replicas' copies dedupe
