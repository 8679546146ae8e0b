"""The rollout controller against the real Kafka broker and tritonserver.

Peers are simulated by their events only: ``ModelPublished`` after writing the version into the
model repository (what the trainer does) and ``VersionMetrics`` per version on ``metrics.live``
(exactly what the trainer's joiner produces). The gateway's view is the ``rollouts`` topic.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc.aio as triton_aio

from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import rollout_pb2, rollout_pb2_grpc
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.events import DeadLetter, RolloutChanged
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.rollout.app import RolloutApp
from loopmesh.rollout.policy import RolloutPolicy
from tests.helpers import eventually, read_topic
from tests.test_rollout_support import (
    Arm,
    ChangeLog,
    MetricsFeeder,
    onnx_model,
    publish_version,
    quick_policy,
    rollout_settings,
    unique_model,
    unload_models,
)

pytestmark = pytest.mark.e2e  # assembles the mesh: several services on real parts

PROBE = 10.0


@pytest.fixture
async def triton_client(triton: TritonServer) -> AsyncIterator[triton_aio.InferenceServerClient]:
    client = triton_aio.InferenceServerClient(triton.grpc_url)
    yield client
    await client.close()


class Rig:
    """A controller in this process with its own topics, plus the peers' producer."""

    def __init__(self, app: RolloutApp, producer: EventProducer, repo: Path) -> None:
        self.app = app
        self.producer = producer
        self.repo = repo
        self.topics = app.settings.rollout.topics.table()
        self.models: set[str] = set()

    async def publish(self, model: str, version: int) -> None:
        self.models.add(model)
        await self.producer.publish(self.topics[0], publish_version(self.repo, model, version))

    def feeder(self, model: str) -> MetricsFeeder:
        return MetricsFeeder(self.producer, self.topics[1], model)

    def changes(self, **kwargs: object) -> ChangeLog:
        return ChangeLog(self.app.settings.kafka, self.topics[2].name, **kwargs)  # type: ignore[arg-type]

    async def get(self, model: str) -> rollout_pb2.Rollout:
        async with grpc.aio.insecure_channel(self.app.address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            return await stub.GetRollout(
                rollout_pb2.GetRolloutRequest(model_name=model), timeout=10
            )

    async def history(self, model: str) -> rollout_pb2.ListRolloutsResponse:
        async with grpc.aio.insecure_channel(self.app.address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            request = rollout_pb2.ListRolloutsRequest(model_name=model, limit=50)
            return await stub.ListRollouts(request, timeout=10)


async def start_rig(
    kafka_settings: KafkaSettings, triton: TritonServer, repo: Path, policy: RolloutPolicy
) -> tuple[RolloutApp, EventProducer]:
    app = RolloutApp(rollout_settings(kafka_settings, triton.grpc_url, repo, policy))
    await app.start()
    producer = EventProducer(kafka_settings, "rollout-test")
    await producer.start()
    return app, producer


@pytest.fixture
async def make_rig(
    kafka_settings: KafkaSettings, triton: TritonServer, model_repository: Path
) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    """Starts a controller with ``quick_policy(**overrides)``; stops it after the test."""
    rigs: list[Rig] = []

    async def make(**overrides: Any) -> Rig:
        app, producer = await start_rig(
            kafka_settings, triton, model_repository, quick_policy(**overrides)
        )
        rigs.append(Rig(app, producer, model_repository))
        return rigs[-1]

    yield make
    for rig in rigs:
        await rig.producer.stop()
        await rig.app.stop()
        await unload_models(triton.grpc_url, rig.models)


async def bootstrap(rig: Rig, model: str, log: ChangeLog) -> None:
    """v1 becomes stable (no canary: nothing to compare it with)."""
    await rig.publish(model, 1)
    await log.wait_for(lambda e: e.state == "stable" and e.stable_version == 1)


async def test_better_candidate_is_promoted_through_every_step(
    make_rig: Callable[..., Awaitable[Rig]], triton_client: triton_aio.InferenceServerClient
) -> None:
    rig = await make_rig(drain_seconds=2.0)
    model = unique_model()
    ready_at_first_weight: list[bool] = []
    v1_ready_when_retired: list[bool] = []

    async def probe(event: RolloutChanged) -> None:
        # Runs the moment the gateway could see the event: the canary must already be ready,
        # and the retired stable must still be (its in-flight requests drain).
        if event.canary_version == 2 and event.canary_weight > 0 and not ready_at_first_weight:
            ready = await triton_client.is_model_ready(model, "2", client_timeout=PROBE)
            ready_at_first_weight.append(ready)
        if event.state == "stable" and event.stable_version == 2:
            ready = await triton_client.is_model_ready(model, "1", client_timeout=PROBE)
            v1_ready_when_retired.append(ready)

    async with rig.changes(on_event=probe) as log, rig.feeder(model) as feeder:
        feeder.arms[1] = Arm(log_loss=0.60, per_tick=40)
        await bootstrap(rig, model, log)
        assert await triton_client.is_model_ready(model, "1", client_timeout=PROBE)
        feeder.arms[2] = Arm(log_loss=0.40, per_tick=40)
        await rig.publish(model, 2)
        await log.wait_for(lambda e: e.state == "stable" and e.stable_version == 2)

        journey = [(e.state, e.canary_weight) for e in log.of(2)]
        assert journey == [
            ("candidate", 0.0),
            ("canary", 0.05),
            ("canary", 0.25),
            ("canary", 0.5),
            ("stable", 0.0),
        ]
        assert ready_at_first_weight == [True]
        stable = log.of(2)[-1]
        assert stable.canary_version is None and "promoted to stable" in stable.reason
        # Each step lasted at least the policy's minimum.
        times = [e.event_time for e in log.of(2)[1:]]
        assert all((b - a).total_seconds() >= 0.5 for a, b in itertools.pairwise(times))

    status = await rig.get(model)
    assert (status.state, status.stable_version, status.HasField("canary_version")) == (
        "stable",
        2,
        False,
    )
    history = await rig.history(model)
    advances = [h for h in history.history if h.state == "canary" and h.step >= 2]
    assert advances and all("no worse" in h.reason for h in advances)
    assert all(h.figures["upper"] <= 0.005 and h.figures["canary_count"] >= 30 for h in advances)

    # v1 lost its traffic with the last change; it is unloaded after the drain, v2 stays.
    assert v1_ready_when_retired == [True]

    async def v1_unloaded() -> bool:
        return not await triton_client.is_model_ready(model, "1", client_timeout=PROBE)

    await eventually(v1_unloaded, timeout=120)
    assert await triton_client.is_model_ready(model, "2", client_timeout=PROBE)


async def test_worse_candidate_is_rolled_back_before_half_the_traffic(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await make_rig()
    model = unique_model()
    async with rig.changes() as log, rig.feeder(model) as feeder:
        feeder.arms[1] = Arm(log_loss=0.50, per_tick=40)
        await bootstrap(rig, model, log)
        feeder.arms[2] = Arm(log_loss=0.90, per_tick=20)
        await rig.publish(model, 2)
        rolled = await log.wait_for(lambda e: e.state == "rolled_back")
        served_counts = list(feeder.arms[2].published)

    assert rolled.canary_version == 2 and rolled.stable_version == 1
    assert rolled.canary_weight == 0.0 and 1 <= rolled.step < 3
    assert max(e.canary_weight for e in log.of(2)) < 0.5
    match = re.search(r"canary served ~(\d+) requests", rolled.reason)
    assert match, rolled.reason
    served = int(match.group(1))
    # Each snapshot's window covers the whole rollout: the estimate is one of the counts sent.
    assert served > 0 and served in served_counts
    assert "loss is higher" in rolled.reason
    status = await rig.get(model)
    assert status.state == "rolled_back" and status.canary_requests_estimate == served
    history = await rig.history(model)
    [entry] = [h for h in history.history if h.state == "rolled_back"]
    assert entry.figures["canary_requests_estimate"] == served
    assert entry.figures["lower"] > 0.005


async def test_candidate_without_traffic_is_aborted_after_the_timeout(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await make_rig(step_timeout_seconds=3.0)
    model = unique_model()
    async with rig.changes() as log, rig.feeder(model) as feeder:
        feeder.arms[1] = Arm(log_loss=0.50, per_tick=40)
        await bootstrap(rig, model, log)
        feeder.arms[2] = Arm(log_loss=0.40, per_tick=0)  # the canary gets no joined feedback
        await rig.publish(model, 2)
        canary = await log.wait_for(lambda e: e.state == "canary")

        async def holding() -> str:
            status = await rig.get(model)
            reason = status.analysis.reason if status.state == "canary" else ""
            return reason if "too little traffic" in reason else ""

        # While it waits it says so and when it will give up (never a silent stall).
        assert "aborting in" in await eventually(holding, timeout=30)
        aborted = await log.wait_for(lambda e: e.state == "aborted")

    assert aborted.canary_version == 2 and aborted.stable_version == 1
    assert aborted.canary_weight == 0.0
    assert "too little traffic" in aborted.reason and "canary 0/30" in aborted.reason
    assert (aborted.event_time - canary.event_time).total_seconds() >= 3.0


async def test_tampered_version_is_refused_and_bad_metrics_are_dead_lettered(
    make_rig: Callable[..., Awaitable[Rig]], triton_client: triton_aio.InferenceServerClient
) -> None:
    rig = await make_rig()
    model = unique_model()
    rig.models.add(model)
    event = publish_version(rig.repo, model, 1)
    # Swapped after publication: the file no longer matches what metadata and event vouch for.
    (rig.repo / model / "1" / "model.onnx").write_bytes(onnx_model(99))
    async with rig.changes() as log:
        await rig.producer.publish(rig.topics[0], event)
        aborted = await log.wait_for(lambda e: e.state == "aborted")
    assert aborted.canary_version is None and aborted.stable_version is None
    assert "loading v1 failed" in aborted.reason and "does not match the sha256" in aborted.reason
    assert not await triton_client.is_model_ready(model, "1", client_timeout=PROBE)

    metrics = rig.topics[1]
    await rig.producer.publish_raw(metrics.name, b"{not json", model.encode(), [])
    [(key, value, _)] = await read_topic(rig.app.settings.kafka, metrics.dlq, expect=1)
    letter = DeadLetter.model_validate_json(value or b"")
    assert key == model.encode() and letter.value == b"{not json" and letter.topic == metrics.name


async def test_policies_over_grpc_are_validated_and_survive_a_restart(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await make_rig()
    model = unique_model()
    async with grpc.aio.insecure_channel(rig.app.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        bad = rollout_pb2.SetPolicyRequest(
            model_name=model, policy=rollout_pb2.RolloutPolicy(min_samples=0)
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SetPolicy(bad, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "policy.min_samples" in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetRollout(rollout_pb2.GetRolloutRequest(model_name="../etc"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("model_name:")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Promote(rollout_pb2.PromoteRequest(model_name=model), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        good = rollout_pb2.SetPolicyRequest(
            model_name=model,
            policy=rollout_pb2.RolloutPolicy(weights=[0.1, 0.6], min_samples=500),
            disable_guards=["max_latency_ratio"],
        )
        set_to = await stub.SetPolicy(good, timeout=10)
    assert list(set_to.weights) == pytest.approx([0.1, 0.6]) and set_to.min_samples == 500
    assert not set_to.HasField("max_latency_ratio") and set_to.HasField("max_error_rate")

    await rig.app.stop()
    again = RolloutApp(rig.app.settings)  # same topics: the override is read back
    await again.start()
    try:
        async with grpc.aio.insecure_channel(again.address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            kept = await stub.GetPolicy(rollout_pb2.GetPolicyRequest(model_name=model), timeout=10)
            other = await stub.GetPolicy(rollout_pb2.GetPolicyRequest(model_name="x"), timeout=10)
    finally:
        await again.stop()
    assert (kept.min_samples, len(kept.weights)) == (500, 2)
    assert other.min_samples == 30  # the settings' policy for everyone else
