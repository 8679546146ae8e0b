"""One rollout controller acts at a time; the others wait as standbys and one takes over.

Controllers run as their own processes (``python -m loopmesh.rollout``, as deployed) on the
session's Kafka and Triton, on the same topics and so in the same leader group. A leader says
so on its Prometheus endpoint (``loopmesh_rollout_leader`` 1) and serves
``loopmesh.v1.RolloutService`` health; a standby reports 0 and NOT_SERVING and answers the
service UNAVAILABLE. Leader group timing is the broker's minimum session (6 s), so a takeover
after a SIGKILL is bounded by ``TAKEOVER_BOUND`` (docs: session + heartbeat + the state
re-read).
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from aiokafka.partitioner import DefaultPartitioner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loopmesh.devstack.process import free_port
from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import rollout_pb2, rollout_pb2_grpc
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.events import ModelPublished, RolloutChanged
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.rollout.server import SERVICE_NAME
from loopmesh.rollout.settings import RolloutTopics
from tests.helpers import eventually
from tests.test_rollout_restart import (
    LEADER_HEARTBEAT,
    LEADER_SESSION,
    Controller,
    controller_env,
)
from tests.test_rollout_support import (
    ChangeLog,
    publish_version,
    unique_model,
    unique_topics,
    unload_models,
)

REREAD = 3.0
"""The new leader's re-read of its (small) state topics, as a restart does (1-2 s measured)."""
TAKEOVER_BOUND = LEADER_SESSION + LEADER_HEARTBEAT + REREAD
"""The documented bound on a takeover after the leader died without leaving the group."""
LEFT_BOUND = LEADER_HEARTBEAT + REREAD
"""The bound after a leader left the group (SIGTERM), counted from its exit."""
SLACK = 20.0
"""A busy 2-core machine: process scheduling, the Triton client, Kafka's own timers."""
STARTED = 90.0
"""Deadline for a controller process to start (imports, Kafka, group join)."""

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{.*\})?\s+(\S+)$")


class Replica(Controller):
    """One controller process with a Prometheus endpoint of its own."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.metrics_port = free_port()
        super().__init__({**env, "LOOPMESH_TELEMETRY__METRICS_PORT": str(self.metrics_port)}, log)

    def alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def _metrics(self) -> dict[str, float] | None:
        """Totals per sample name; None while the endpoint is not up."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                text = reply.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None
        totals: dict[str, float] = {}
        for line in text.splitlines():
            if (match := _SAMPLE.match(line)) is not None:
                totals[match[1]] = totals.get(match[1], 0.0) + float(match[2])
        return totals

    async def metric(self, name: str) -> float | None:
        """A sample's total on this process' endpoint; None when it is not exported."""
        metrics = await asyncio.to_thread(self._metrics)
        return None if metrics is None else metrics.get(name)

    async def changes(self) -> float:
        """RolloutChanged events this process published."""
        return await self.metric("loopmesh_rollout_changes_total") or 0.0

    async def ask(self, model: str) -> rollout_pb2.Rollout:
        """GetRollout, errors raised as they come."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            request = rollout_pb2.GetRolloutRequest(model_name=model)
            reply: rollout_pb2.Rollout = await stub.GetRollout(request, timeout=5)
            return reply

    async def health(self, service: str) -> int | None:
        try:
            async with grpc.aio.insecure_channel(self.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.aio.AioRpcError:
            return None
        return int(reply.status)

    async def role(self) -> str | None:
        """ "leader" or "standby" when the gauge and health agree on it; None otherwise."""
        self.alive()
        leader, alive, service = (
            await self.metric("loopmesh_rollout_leader"),
            await self.health(""),
            await self.health(SERVICE_NAME),
        )
        if leader == 1 and alive == SERVING and service == SERVING:
            return "leader"
        if leader == 0 and alive == SERVING and service == NOT_SERVING:
            return "standby"
        return None

    async def until(self, role: str, timeout: float = STARTED) -> None:
        async def there() -> bool:
            return await self.role() == role

        await eventually(there, timeout=timeout, interval=0.1)


@pytest.fixture
def topics() -> RolloutTopics:
    return unique_topics()


@pytest.fixture
def replicas(
    topics: RolloutTopics,
    kafka_settings: KafkaSettings,
    triton: TritonServer,
    model_repository: Path,
    tmp_path: Path,
) -> Iterator[Callable[..., Replica]]:
    """Starts controllers on ``topics`` (one leader group); kills what is left at the end."""
    started: list[Replica] = []

    def start(name: str, **overrides: str) -> Replica:
        env = controller_env(topics, kafka_settings, triton, model_repository, **overrides)
        replica = Replica(env, tmp_path / f"{name}.log")
        replica.start()
        started.append(replica)
        return replica

    yield start
    for replica in started:
        if replica.proc is not None and replica.proc.poll() is None:
            replica.resume()
            replica.proc.kill()
            replica.proc.wait(timeout=10)


@pytest.fixture
async def model(triton: TritonServer) -> AsyncIterator[str]:
    name = unique_model()
    yield name
    await unload_models(triton.grpc_url, [name])


async def leader_and_standby(start: Callable[..., Replica], **env: str) -> tuple[Replica, Replica]:
    """The first controller leads; the second, started next to it, stands by (and the
    rebalance its joining causes leaves the leadership where it was)."""
    first = start("first", **env)
    await first.until("leader")
    second = start("second", **env)
    await second.until("standby")
    await first.until("leader")
    return first, second


def models_on_every_partition(partitions: int) -> list[str]:
    """Model names whose keys spread over every partition of ``models.published``: without a
    fence each controller's consumer takes a share of the partitions, and both act."""
    names: dict[int, str] = {}
    every = list(range(partitions))
    while len(names) < partitions:
        name = unique_model()
        names.setdefault(DefaultPartitioner()(name.encode(), every, every), name)
    return list(names.values())


async def test_of_two_controllers_one_acts_and_the_other_stands_by(
    replicas: Callable[..., Replica],
    topics: RolloutTopics,
    producer: EventProducer,
    kafka_settings: KafkaSettings,
) -> None:
    first, second = await leader_and_standby(replicas)
    published = topics.table()[0]
    models = models_on_every_partition(kafka_settings.default_partitions)
    async with ChangeLog(kafka_settings, topics.rollouts) as log:
        for name in models:
            # Not in the model repository: its load fails at once and the version is aborted,
            # a published RolloutChanged without the cost of a Triton load.
            event = ModelPublished(
                model_name=name, model_version=1, sha256="0" * 64, feature_names=["f0"]
            )
            await producer.publish(published, event)
        for name in models:
            aborted = await log.wait_for(lambda e, name=name: e.model_name == name)
            assert aborted.state == "aborted"

        async def all_from_the_leader() -> bool:
            return await first.changes() == len(models)

        await eventually(all_from_the_leader, timeout=30)
        assert await second.changes() == 0
        mine: list[RolloutChanged] = [e for e in log.events if e.model_name in models]
        assert len(mine) == len(models), mine

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await second.ask(models[0])  # the standby has no state to answer from
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "standby" in (refused.value.details() or "")
    assert (await first.ask(models[0])).state == "aborted"
    assert "standby in leader group" in second.log.read_text()
    assert "rollout: leading" in first.log.read_text()
    assert await second.role() == "standby" and await first.role() == "leader"

    # A leader that stops drains its calls, stops acting and leaves: no session to wait out.
    assert first.terminate() == 0, first.log.read_text()[-3000:]
    stopped = time.monotonic()
    await second.until("leader", timeout=LEFT_BOUND + SLACK)
    print(f"takeover after SIGTERM: {time.monotonic() - stopped:.1f}s")
    assert (await second.ask(models[0])).state == "aborted"
    assert second.terminate() == 0, second.log.read_text()[-3000:]


async def test_the_standby_takes_over_a_killed_leader_and_carries_the_rollout_on(
    model: str,  # first: unloaded from Triton after the controller processes are gone
    replicas: Callable[..., Replica],
    topics: RolloutTopics,
    producer: EventProducer,
    kafka_settings: KafkaSettings,
    model_repository: Path,
) -> None:
    first, second = await leader_and_standby(replicas)
    published = topics.table()[0]
    async with ChangeLog(kafka_settings, topics.rollouts) as log:
        await producer.publish(published, publish_version(model_repository, model, 1))
        await log.wait_for(lambda e: e.state == "stable" and e.stable_version == 1)
        first.kill()
        killed = time.monotonic()
        await second.until("leader", timeout=TAKEOVER_BOUND + SLACK)
        takeover = time.monotonic() - killed
        print(f"takeover after SIGKILL: {takeover:.1f}s (bound {TAKEOVER_BOUND:.0f}s)")
        assert takeover < TAKEOVER_BOUND + SLACK

        # Rebuilt from the rollouts topic: v1 is stable, so v2 is a canary beside it, not a
        # first version (which is what a controller without that state would make of it).
        status = await second.ask(model)
        assert (status.state, status.stable_version) == ("stable", 1)
        await producer.publish(published, publish_version(model_repository, model, 2))
        canary = await log.wait_for(lambda e: e.canary_version == 2 and e.step == 1)
        assert (canary.state, canary.stable_version) == ("canary", 1)
        assert await second.changes() == 2  # candidate and canary: the new leader's
    assert second.terminate() == 0, second.log.read_text()[-3000:]


async def test_a_paused_leader_finds_itself_fenced_when_it_wakes(
    model: str,
    replicas: Callable[..., Replica],
    topics: RolloutTopics,
    producer: EventProducer,
    kafka_settings: KafkaSettings,
    model_repository: Path,
) -> None:
    """A leader frozen past its session (SIGSTOP: a long GC pause, a cut-off node) is replaced.
    When it wakes, its step timer is overdue and would fire before any word from Kafka
    arrives; its lease has expired, so it publishes nothing and turns standby."""
    # The step times out while the leader is frozen (no metrics); the new leader acts on it.
    policy = {
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__MIN_STEP_SECONDS": "4",
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__STEP_TIMEOUT_SECONDS": "8",
    }
    first, second = await leader_and_standby(replicas, **policy)
    published = topics.table()[0]
    async with ChangeLog(kafka_settings, topics.rollouts) as log:
        await producer.publish(published, publish_version(model_repository, model, 1))
        await log.wait_for(lambda e: e.state == "stable" and e.stable_version == 1)
        await producer.publish(published, publish_version(model_repository, model, 2))
        await log.wait_for(lambda e: e.canary_version == 2 and e.step == 1)
        first.pause()
        before = len(log.events)
        # No metrics: the canary's step times out; the new leader aborts it.
        await second.until("leader", timeout=TAKEOVER_BOUND + SLACK)
        aborted = await log.wait_for(lambda e: e.state == "aborted" and e.canary_version == 2)
        first.resume()
        await first.until("standby", timeout=LEADER_SESSION + SLACK)
        await second.until("leader")
        assert await first.changes() == 3  # stable v1, candidate v2, canary v2: all before
        assert [e.state for e in log.events[before:]] == ["aborted"], log.events[before:]
        assert aborted.stable_version == 1
    log_text = first.log.read_text()
    assert "leadership lost" in log_text, log_text[-3000:]
    assert second.terminate() == 0, second.log.read_text()[-3000:]
    assert first.terminate() == 0, first.log.read_text()[-3000:]
