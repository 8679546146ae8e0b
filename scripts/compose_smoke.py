"""The compose smoke (``make compose-test``, issue 21): the stack of compose.yaml, driven only
through its public doors on localhost, as a product app, a backend and an operator would.

1. Bootstrap: a labelled history (the default project's synthetic click-through world, as
   ``loopmesh run`` uses) into ``TrainerService.AddExamples``, then ``TriggerTraining``; the
   rollout controller makes the first version stable.
2. A quick canary policy through ``RolloutService.SetPolicy`` (the defaults want 200 samples
   and 5 minutes a step).
3. Traffic with ``loopmesh.client``: ``Ingest`` -> ``Predict`` -> ``Feedback`` (labels from the
   world's hidden rule); the joiner turns them into training examples.
4. A retrain (``TriggerTraining``) publishes a new version; traffic goes on until the rollout
   controller has run it as a canary and promoted it (asserted).
5. Restarts: events acknowledged by the ingestion door while its container restarts are all
   in ``events.raw``; feedback acknowledged before a restart of the feedback container is all
   in ``feedback``; the trainer's examples and versions survive its container's restart.

Run by scripts/compose-test.sh once the stack is healthy; ``--restart`` is the command that
restarts one service's container (``%s``: the compose service name).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import numpy as np
from aiokafka import AIOKafkaConsumer

from loopmesh.client import Client, Event, Feedback
from loopmesh.client.errors import ClientError
from loopmesh.devstack.worlds import CtrWorld, history
from loopmesh.gen.loopmesh.v1 import (
    rollout_pb2,
    rollout_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

T = TypeVar("T")
HOST = "127.0.0.1"
PORTS = {"ingestion": 50051, "feedback": 50052, "inference": 50054, "trainer": 50055}
ROLLOUT = f"{HOST}:50056"
KAFKA = f"{HOST}:29092"
MODEL = "ctr"
START = time.monotonic()


def say(message: str) -> None:
    print(f"[smoke {time.monotonic() - START:6.1f}s] {message}", flush=True)


def wait_for(what: str, check: Callable[[], T | None], timeout: float, every: float = 2.0) -> T:
    """Poll ``check`` until it returns something other than None (errors count as not yet)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (grpc.RpcError, ClientError) as exc:
            last, value = exc, None
        if value is not None:
            return value
        time.sleep(every)
    raise SystemExit(f"FAIL: {what} not within {timeout:.0f}s (last error: {last})")


class Smoke:
    def __init__(self, restart: str, seed: int = 7) -> None:
        self.restart_command = restart
        self.world = CtrWorld(MODEL, seed=seed)
        self.rng = np.random.default_rng(seed)
        # The token (LOOPMESH_CLIENT__TOKEN, which Client reads too) when the stack runs with
        # auth on, as scripts/compose-test.sh starts it: roles ingest, feedback, predict and
        # operator (TrainerService and RolloutService).
        token = os.environ.get("LOOPMESH_CLIENT__TOKEN") or None
        self.client = Client(
            ingestion_url=f"{HOST}:{PORTS['ingestion']}",
            feedback_url=f"{HOST}:{PORTS['feedback']}",
            inference_url=f"{HOST}:{PORTS['inference']}",
        )
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(
            operator_channel(f"{HOST}:{PORTS['trainer']}", token)
        )
        self.rollout = rollout_pb2_grpc.RolloutServiceStub(operator_channel(ROLLOUT, token))
        self.arms: dict[tuple[int, str], int] = {}
        self.example_seq = 0

    # -- doors ---------------------------------------------------------------------------

    def add_history(self, n: int) -> int:
        """``n`` labelled examples of history into the trainer's AddExamples; accepted count."""
        past = history(self.world, n, self.rng)
        start = datetime.now(UTC) - timedelta(seconds=n + 60)
        request = trainer_pb2.AddExamplesRequest(model_name=MODEL)
        for i, (item, outcome) in enumerate(past):
            example = request.examples.add(
                example_id=f"compose-smoke-{self.example_seq + i}",
                entity_id=item.entity_id,
                features=item.context,
                categorical=item.categorical,
                target=outcome.target,
            )
            example.event_time.FromDatetime(start + timedelta(seconds=i))
        self.example_seq += n
        taken = 0
        for first in range(0, n, 5000):
            chunk = trainer_pb2.AddExamplesRequest(
                model_name=MODEL, examples=request.examples[first : first + 5000]
            )
            taken += self.trainer.AddExamples(chunk, timeout=60).accepted
        return taken

    def status(self) -> trainer_pb2.GetStatusResponse:
        return self.trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)

    def get_rollout(self) -> rollout_pb2.Rollout:
        return self.rollout.GetRollout(rollout_pb2.GetRolloutRequest(model_name=MODEL), timeout=10)

    def train(self, reason: str) -> trainer_pb2.TrainingRun:
        reply = self.trainer.TriggerTraining(
            trainer_pb2.TriggerTrainingRequest(model_name=MODEL, reason=reason, wait=True),
            timeout=900,
        )
        run = reply.run
        if not reply.started:  # an automatic run was under way: wait for it to finish
            say(f"a run was already in progress ({run.run_id}); waiting for it")
            run = wait_for(
                "the run in progress to finish",
                lambda: self.status().last_run if not self.status().HasField("running") else None,
                900,
            )
        status = trainer_pb2.RunStatus.Name(run.status).removeprefix("RUN_STATUS_").lower()
        say(f"run {run.run_id}: {status} version={run.version} {run.error or ''}".rstrip())
        return run

    def traffic(self, n: int) -> int:
        """``n`` requests as an app and a backend make them: events, predictions, feedback.
        Returns the feedback the door acknowledged."""
        requests = self.world.sample(n, self.rng)
        events = [r.event for r in requests if r.event is not None]
        ingested = self.client.ingest(events, timeout=30)
        assert ingested.rejected == 0, ingested.refused
        predictions = []
        for r in requests:
            p = self.client.predict(
                r.entity_id, context=r.context, categorical=r.categorical, timeout=10
            )
            predictions.append(p)
            key = (p.model_version, p.arm)
            self.arms[key] = self.arms.get(key, 0) + 1
        outcomes = self.world.outcomes(requests, self.rng)
        result = self.client.submit_many(
            [
                Feedback(p.prediction_id, label=o.label)
                for p, o in zip(predictions, outcomes, strict=True)
            ],
            timeout=30,
        )
        assert result.rejected == 0, result.refused
        return result.accepted

    # -- steps ---------------------------------------------------------------------------

    def bootstrap(self) -> int:
        say("bootstrap: 1500 labelled examples into TrainerService.AddExamples")
        taken = self.add_history(1500)
        assert taken == 1500, f"AddExamples accepted {taken} of 1500"
        status = wait_for(
            "the trainer to store the bootstrap set",
            lambda: s if (s := self.status()).dataset_rows >= taken or s.runs_total else None,
            120,
        )
        # As `loopmesh run` does: the trainer's own trigger (1000 new examples) may have
        # taken the bootstrap set already; no second run on it then.
        if status.HasField("running") or self.published():
            say("the trainer's own trigger took the bootstrap set")
            wait_for("that run to publish", lambda: self.published() or None, 600)
        else:
            run = self.train("compose smoke: bootstrap set")
            assert run.version > 0, f"the bootstrap run published nothing: {run}"
        stable = wait_for(
            "a first version to become stable",
            lambda: r if (r := self.get_rollout()).HasField("stable_version") else None,
            300,
        )
        say(f"v{stable.stable_version} stable: {stable.state} ({stable.reason})")
        return stable.stable_version

    def quick_policy(self) -> None:
        policy = rollout_pb2.RolloutPolicy(
            weights=[0.5],
            method="fixed",
            confidence=0.8,
            max_regression=0.15,
            min_samples=60,
            min_step_seconds=5,
            step_timeout_seconds=600,
            drain_seconds=5,
            guard_min_requests=50,
        )
        # Two busy cores: a canary's p99 against stable's says nothing here.
        reply = self.rollout.SetPolicy(
            rollout_pb2.SetPolicyRequest(
                model_name=MODEL, policy=policy, disable_guards=["max_latency_ratio"]
            ),
            timeout=10,
        )
        say(f"policy: weights={list(reply.weights)} min_samples={reply.min_samples}")

    def published(self) -> list[int]:
        """Versions the trainer has published (ListVersions), oldest first."""
        reply = self.trainer.ListVersions(
            trainer_pb2.ListVersionsRequest(model_name=MODEL), timeout=10
        )
        return sorted(v.version for v in reply.versions)

    def history(self) -> list[rollout_pb2.RolloutChange]:
        """The model's rollout changes, oldest first."""
        reply = self.rollout.ListRollouts(
            rollout_pb2.ListRolloutsRequest(model_name=MODEL, limit=200), timeout=10
        )
        return sorted(reply.history, key=lambda c: c.event_time.ToDatetime())

    def retrain_and_promote(self, stable: int) -> int:
        say("traffic: ingest -> predict -> feedback, 1200 requests")
        acked = sum(self.traffic(200) for _ in range(6))
        say(f"feedback acknowledged: {acked}; arms {self.arms}")
        before = self.status()
        wait_for(
            "joined feedback to reach the trainer",
            lambda: (
                (s := self.status()).new_examples >= 600 or s.runs_total > before.runs_total or None
            ),
            300,
        )
        # The trainer's own trigger (1000 new examples) on the joined feedback, or the smoke's
        # TriggerTraining: whichever publishes a version newer than the stable one.
        newest = max(self.published())
        for attempt in range(3):
            if self.status().HasField("running"):
                say("the trainer's own trigger is retraining; waiting for that run")
                wait_for(
                    "the run to finish",
                    lambda: None if self.status().HasField("running") else True,
                    900,
                )
            newest = max(self.published())
            if newest > stable:
                break
            run = self.train(f"compose smoke: retrain {attempt + 1}")
            newest = max([run.version, *self.published()])
            if newest > stable:
                break
            say("not published (the gate); more history, then again")
            self.add_history(3000)
        assert newest > stable, f"no retrain published a version newer than v{stable}"
        say(f"v{newest} published; traffic until a canary is promoted")
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            r = self.get_rollout()
            if r.state == "stable" and r.stable_version > stable:
                return self.check_promotion(stable, r)
            latest = max(self.published())
            if r.state in ("rolled_back", "aborted") and r.canary_version == latest:
                raise SystemExit(f"FAIL: v{latest} {r.state}: {r.reason}")
            self.traffic(100)
        raise SystemExit(
            f"FAIL: no version newer than v{stable} promoted in 900 s: {self.get_rollout()}"
        )

    def check_promotion(self, stable: int, r: rollout_pb2.Rollout) -> int:
        """The new stable version went through a canary step that served live traffic."""
        version = r.stable_version
        changes = self.history()
        canary = [c for c in changes if c.state == "canary" and c.canary_version == version]
        assert canary, f"v{version} became stable without a canary step: " + "; ".join(
            f"{c.state} s={c.stable_version} c={c.canary_version}" for c in changes
        )
        promoted = [c for c in changes if c.state == "stable" and c.stable_version == version]
        assert (
            promoted and promoted[-1].event_time.ToDatetime() >= canary[0].event_time.ToDatetime()
        )
        served = sum(n for (v, _arm), n in self.arms.items() if v == version)
        assert served > 0, f"v{version} served no prediction of the smoke before its promotion"
        weights = sorted({round(c.canary_weight, 3) for c in canary})
        say(
            f"v{version} promoted: v{stable} stable -> v{version} canary at {weights} "
            f"({served} smoke predictions) -> v{version} stable: {promoted[-1].reason}"
        )
        return version

    # -- restarts ------------------------------------------------------------------------

    def restart(self, service: str) -> None:
        command = self.restart_command.replace("%s", service)
        say(f"restart {service}: {command}")
        subprocess.run(shlex.split(command), check=True, stdout=subprocess.DEVNULL)

    def ingest_through_restart(self) -> None:
        acked: list[str] = []
        stop = threading.Event()

        def send() -> None:
            i = 0
            while not stop.is_set():
                batch = [
                    Event(f"restart-{i}-{k}", "view", numeric={"value": 1.0}) for k in range(20)
                ]
                i += 1
                try:
                    result = self.client.ingest(batch, timeout=60)
                except ClientError:
                    continue  # not acknowledged: nothing promised
                acked.extend(o.event_id for o in result.results if o.accepted)
                time.sleep(0.05)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        time.sleep(3)
        self.restart("ingestion")
        count = len(acked)
        wait_for(
            "ingestion to acknowledge again", lambda: True if len(acked) > count else None, 180
        )
        time.sleep(2)
        stop.set()
        sender.join(90)
        found = read_ids("events.raw")
        missing = set(acked) - found
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged events lost"
        say(f"ingestion restart: all {len(acked)} acknowledged events in events.raw")

    def feedback_through_restart(self) -> None:
        acked = [
            o.event_id
            for o in self.client.submit_many(
                [Feedback(f"restart-prediction-{i}", label=i % 2) for i in range(50)], timeout=30
            ).results
            if o.accepted
        ]
        self.restart("feedback")
        wait_for(
            "feedback to acknowledge again",
            lambda: self.client.submit(Feedback("restart-probe", label=1), timeout=10),
            180,
        )
        missing = set(acked) - read_ids("feedback")
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged feedback lost"
        say(f"feedback restart: all {len(acked)} acknowledged feedback in the feedback topic")

    def trainer_through_restart(self) -> None:
        before = self.status()
        versions = [
            v.version
            for v in self.trainer.ListVersions(
                trainer_pb2.ListVersionsRequest(model_name=MODEL), timeout=10
            ).versions
        ]
        self.restart("trainer")
        after = wait_for("the trainer to answer again", self.status, 240)
        again = [
            v.version
            for v in self.trainer.ListVersions(
                trainer_pb2.ListVersionsRequest(model_name=MODEL), timeout=10
            ).versions
        ]
        assert after.dataset_rows >= before.dataset_rows, (before.dataset_rows, after.dataset_rows)
        # Every version kept; the trainer's own trigger may have published one more meanwhile.
        assert set(versions) <= set(again), (versions, again)
        say(f"trainer restart: {after.dataset_rows} examples and versions {versions} kept")


class _Bearer(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """``authorization: Bearer <token>`` on every unary call."""

    def __init__(self, token: str) -> None:
        self.metadata = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), self.metadata]
        return continuation(details._replace(metadata=metadata), request)


def operator_channel(address: str, token: str | None) -> grpc.Channel:
    channel = grpc.insecure_channel(address)
    return grpc.intercept_channel(channel, _Bearer(token)) if token else channel


def read_ids(topic: str) -> set[str]:
    """Every ``event_id`` in ``topic``, read from the beginning through the host listener."""
    import asyncio

    async def read() -> set[str]:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=KAFKA,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            ids: set[str] = set()
            idle = 0
            while idle < 3:  # 6 s with nothing new: the end (the writes were acknowledged)
                batches = await consumer.getmany(timeout_ms=2000)
                idle = 0 if batches else idle + 1
                for records in batches.values():
                    for record in records:
                        value: Any = json.loads(record.value) if record.value else {}
                        if isinstance(value, dict) and "event_id" in value:
                            ids.add(value["event_id"])
            return ids
        finally:
            await consumer.stop()

    return asyncio.run(read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--restart", default="podman restart loopmesh_%s_1", help="restart one service (%%s)"
    )
    parser.add_argument("--skip-restarts", action="store_true")
    parser.add_argument(
        "--doors-only",
        action="store_true",
        help="only Ingest and Feedback and their restarts (a stack of ingestion and feedback)",
    )
    args = parser.parse_args(argv)
    smoke = Smoke(args.restart)
    if args.doors_only:
        try:
            smoke.ingest_through_restart()
            smoke.feedback_through_restart()
        finally:
            smoke.client.close()
        say("PASS (doors only): ingestion and feedback restarts lost nothing acknowledged")
        return 0
    try:
        smoke.quick_policy()
        stable = smoke.bootstrap()
        promoted = smoke.retrain_and_promote(stable)
        if not args.skip_restarts:
            smoke.ingest_through_restart()
            smoke.feedback_through_restart()
            smoke.trainer_through_restart()
    finally:
        smoke.client.close()
    say(f"PASS: v{stable} -> canary -> v{promoted} promoted; arms served {smoke.arms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
