"""The controller as its own process: SIGKILL mid-rollout, restart, same step; CLI commands,
also over mutual TLS with a token.

``python -m loopmesh.rollout`` runs with settings from the environment, exactly as deployed.
The trainer and its joiner are simulated by their events (``ModelPublished``, ``VersionMetrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from loopmesh.devstack.process import free_port
from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import rollout_pb2, rollout_pb2_grpc
from loopmesh.mesh.auth import AuthSettings, TokenSpec
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.events import RolloutChanged
from loopmesh.mesh.settings import GrpcServerSettings, KafkaSettings
from loopmesh.rollout.app import RolloutApp
from loopmesh.rollout.cli import add_rollout_commands
from loopmesh.rollout.settings import RolloutScope, RolloutSettings, RolloutTopics
from tests.helpers import eventually
from tests.support.certs import make_pki
from tests.test_rollout_support import (
    Arm,
    ChangeLog,
    MetricsFeeder,
    publish_version,
    unique_model,
    unique_topics,
    unload_models,
)

MIN_STEP = 12.0
"""Longer than OUTAGE plus a restart on a busy 2-core machine (5 s measured), and than the
leader session the restarted controller waits out before it leads."""
OUTAGE = 3.0
LEADER_SESSION = 6.0
"""The broker's smallest session timeout (``group.min.session.timeout.ms``)."""
LEADER_HEARTBEAT = 1.0
ROOT = Path(__file__).resolve().parents[1]


class Controller:
    """``python -m loopmesh.rollout`` as a child process with its log in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.address = f"127.0.0.1:{env['LOOPMESH_ROLLOUT__SERVER__PORT']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loopmesh.rollout"],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=30)

    async def get(self, model: str) -> rollout_pb2.Rollout | None:
        """The rollout over gRPC; None while the controller is not answering (yet)."""
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            async with grpc.aio.insecure_channel(self.address) as channel:
                stub = rollout_pb2_grpc.RolloutServiceStub(channel)
                request = rollout_pb2.GetRolloutRequest(model_name=model)
                return await stub.GetRollout(request, timeout=5)
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                return None
            raise


def cli(*argv: str) -> int:
    """``loopmesh rollout ...`` through the same argparse hook the lead adds to services/cli."""
    parser = argparse.ArgumentParser(prog="loopmesh")
    add_rollout_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["rollout", *argv])
    code: int = args.func(args)
    return code


@pytest.fixture
def topics() -> RolloutTopics:
    return unique_topics()


def controller_env(
    topics: RolloutTopics,
    kafka_settings: KafkaSettings,
    triton: TritonServer,
    model_repository: Path,
    **overrides: str,
) -> dict[str, str]:
    """The environment of ``python -m loopmesh.rollout`` on these topics, on a free port.

    Leader group timing is the broker's minimum session (6 s): a restart after a SIGKILL
    waits out the dead incarnation's session before it leads."""
    return {
        **os.environ,
        "LOOPMESH_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "LOOPMESH_KAFKA__DEFAULT_PARTITIONS": str(kafka_settings.default_partitions),
        "LOOPMESH_TRITON_URL": triton.grpc_url,
        "LOOPMESH_MODEL_REPOSITORY": str(model_repository),
        "LOOPMESH_ROLLOUT__SERVER__PORT": str(free_port()),
        "LOOPMESH_ROLLOUT__TOPICS__MODELS_PUBLISHED": topics.models_published,
        "LOOPMESH_ROLLOUT__TOPICS__METRICS_LIVE": topics.metrics_live,
        "LOOPMESH_ROLLOUT__TOPICS__ROLLOUTS": topics.rollouts,
        "LOOPMESH_ROLLOUT__TOPICS__POLICIES": topics.policies,
        "LOOPMESH_ROLLOUT__CONSUMER_GROUP": f"g-{topics.rollouts}",
        "LOOPMESH_ROLLOUT__LEADER__SESSION_TIMEOUT_SECONDS": str(LEADER_SESSION),
        "LOOPMESH_ROLLOUT__LEADER__HEARTBEAT_INTERVAL_SECONDS": str(LEADER_HEARTBEAT),
        "LOOPMESH_ROLLOUT__TICK_SECONDS": "0.1",
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__MIN_SAMPLES": "30",
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__MIN_STEP_SECONDS": str(MIN_STEP),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__STEP_TIMEOUT_SECONDS": "120",
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__DRAIN_SECONDS": "600",
        **overrides,
    }


@pytest.fixture
def controller(
    topics: RolloutTopics,
    kafka_settings: KafkaSettings,
    triton: TritonServer,
    model_repository: Path,
    tmp_path: Path,
) -> Iterator[Controller]:
    env = controller_env(topics, kafka_settings, triton, model_repository)
    ctl = Controller(env, tmp_path / "rollout.log")
    ctl.start()
    yield ctl
    if ctl.proc is not None and ctl.proc.poll() is None:
        ctl.proc.kill()
        ctl.proc.wait(timeout=10)


@pytest.fixture
async def model(triton: TritonServer) -> AsyncIterator[str]:
    name = unique_model()
    yield name
    await unload_models(triton.grpc_url, [name])


async def test_killed_controller_resumes_at_the_same_step_and_obeys_the_cli(
    model: str,  # first: unloaded from Triton after the controller process is gone
    controller: Controller,
    topics: RolloutTopics,
    producer: EventProducer,
    kafka_settings: KafkaSettings,
    model_repository: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    published, metrics, rollouts, _ = topics.table()
    feeder = MetricsFeeder(producer, metrics, model)
    async with ChangeLog(kafka_settings, rollouts.name) as log, feeder:
        feeder.arms[1] = Arm(log_loss=0.60, per_tick=40)
        await producer.publish(published, publish_version(model_repository, model, 1))
        await log.wait_for(lambda e: e.state == "stable" and e.stable_version == 1)
        feeder.arms[2] = Arm(log_loss=0.40, per_tick=40)
        await producer.publish(published, publish_version(model_repository, model, 2))
        step1 = await log.wait_for(lambda e: e.canary_version == 2 and e.step == 1)

        controller.kill()
        # An outage, not a synchronisation: the controller stays down for a while, so a timer
        # restarted with the process would fire OUTAGE seconds later than the continued one.
        await asyncio.sleep(OUTAGE)
        relaunched = datetime.now(UTC)
        controller.start()

        async def answering() -> rollout_pb2.Rollout | None:
            return await controller.get(model)

        status = await eventually(answering, timeout=60)
        # Rebuilt from the rollouts topic: same step, and the step timer still counts from
        # the event time of the last change, not from the restart.
        assert (status.state, status.step, status.canary_version) == ("canary", 1, 2)
        assert status.canary_weight == pytest.approx(0.05)
        assert status.changed_at.ToDatetime(tzinfo=UTC) == step1.event_time
        step2 = await log.wait_for(lambda e: e.canary_version == 2 and e.step == 2)
        assert (step2.event_time - step1.event_time).total_seconds() >= MIN_STEP
        assert step2.event_time < relaunched + timedelta(seconds=MIN_STEP), (
            "the step timer restarted with the process"
        )
        assert [e.step for e in log.of(2)] == [0, 1, 2], "a step was repeated after the restart"

        # Manual promotion (one step up, before the timer would) and rollback, from the CLI.
        promote = ("promote", model, "--reason", "ship it", "--address", controller.address)
        assert await asyncio.to_thread(cli, *promote) == 0
        step3 = await log.wait_for(lambda e: e.canary_version == 2 and e.step == 3)
        assert "manual promote: ship it" in step3.reason and step3.canary_weight == 0.5
        assert await asyncio.to_thread(cli, "pause", model, "--address", controller.address) == 0
        await log.wait_for(lambda e: e.state == "paused" and e.canary_weight == 0.5)
        assert await asyncio.to_thread(cli, "resume", model, "--address", controller.address) == 0
        await log.wait_for(lambda e: e.state == "canary" and e.reason == "resumed")
        rollback = (
            "rollback",
            model,
            "--reason",
            "pager went off",
            "--address",
            controller.address,
        )
        assert await asyncio.to_thread(cli, *rollback) == 0
        rolled = await log.wait_for(lambda e: e.state == "rolled_back")
        assert (rolled.canary_version, rolled.stable_version, rolled.step) == (2, 1, 3)
        assert "manual rollback: pager went off" in rolled.reason

    # A command that does not apply is refused with a non-zero exit; status tells the story.
    assert await asyncio.to_thread(cli, "rollback", model, "--address", controller.address) == 1
    capsys.readouterr()
    assert (
        await asyncio.to_thread(cli, "status", model, "--json", "--address", controller.address)
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    [current] = report["rollouts"]
    assert (current["state"], current["stable_version"], current["canary_version"]) == (
        "rolled_back",
        "1",
        "2",
    )
    steps = [(h["state"], h.get("step", 0)) for h in reversed(report["history"])]
    assert steps == [
        ("stable", 0),
        ("candidate", 0),
        ("canary", 1),
        ("canary", 2),
        ("canary", 3),
        ("paused", 3),
        ("canary", 3),
        ("rolled_back", 3),
    ]
    assert controller.terminate() == 0, controller.log.read_text()[-3000:]


async def test_the_cli_calls_a_controller_over_mutual_tls_with_its_token(
    kafka_settings: KafkaSettings,
    producer: EventProducer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``loopmesh rollout`` builds its channel with the mesh's factory: TLS from its flags or
    ``LOOPMESH_ROLLOUT__CLIENT__*``, the token of ``LOOPMESH_AUTH__CLIENT_TOKEN``."""
    pki = make_pki(tmp_path)
    token = "operator-token-0123456789"
    topics = unique_topics()
    model = unique_model()
    # A rollout to read back: the controller restores it from its topic at start.
    seeded = RolloutChanged(model_name=model, stable_version=3, state="stable")
    await producer.publish(topics.table()[2], seeded)
    app = RolloutApp(
        RolloutSettings(
            kafka=kafka_settings,
            triton_url="127.0.0.1:1",  # unreachable: its reconcile only logs a warning
            model_repository=tmp_path / "models",
            auth=AuthSettings(tokens=[TokenSpec(name="ops", token=token, roles=["operator"])]),
            rollout=RolloutScope(
                server=GrpcServerSettings(
                    port=0,
                    grace_seconds=0,
                    tls_certfile=pki.server_cert,
                    tls_keyfile=pki.server_key,
                    tls_client_cafile=pki.ca,  # mutual: a client certificate is required
                ),
                topics=topics,
                consumer_group=f"rollout-tls-{uuid.uuid4().hex[:8]}",
            ),
        )
    )
    await app.start()
    try:
        where = ("--address", app.address, "--timeout", "10")
        mutual = ("--ca-file", str(pki.ca), "--cert-file", str(pki.client_cert))
        key = ("--key-file", str(pki.client_key))

        async def status(*argv: str) -> tuple[int, str]:
            capsys.readouterr()
            code = await asyncio.to_thread(cli, "status", model, "--json", *where, *argv)
            return code, capsys.readouterr().out

        code, out = await status()  # plaintext to a TLS port
        assert code == 1 and "UNAVAILABLE" in out, out
        code, out = await status(*mutual, *key)  # no token
        assert code == 1 and "UNAUTHENTICATED" in out, out

        monkeypatch.setenv("LOOPMESH_AUTH__CLIENT_TOKEN", token)
        code, out = await status(*mutual, *key)
        assert code == 0, out
        [current] = json.loads(out)["rollouts"]
        assert (current["state"], current["stable_version"]) == ("stable", "3")
        # The same with TLS from the settings instead of the flags.
        monkeypatch.setenv("LOOPMESH_ROLLOUT__CLIENT__TLS_CAFILE", str(pki.ca))
        monkeypatch.setenv("LOOPMESH_ROLLOUT__CLIENT__TLS_CERTFILE", str(pki.client_cert))
        monkeypatch.setenv("LOOPMESH_ROLLOUT__CLIENT__TLS_KEYFILE", str(pki.client_key))
        code, out = await status()
        assert code == 0 and json.loads(out)["rollouts"][0]["model_name"] == model, out
    finally:
        await app.stop()
