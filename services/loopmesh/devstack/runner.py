"""`loopmesh run`: local infrastructure, every service, a seeded model, traffic, a live view.

The runner only uses what a user has: it starts processes, talks to the services over gRPC,
and watches Kafka. Service processes get their configuration through ``LOOPMESH_*``
variables, exactly as in compose.yaml.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.live import Live

from loopmesh.devstack.dashboard import render
from loopmesh.devstack.process import free_port
from loopmesh.devstack.report import write_plot, write_summary
from loopmesh.devstack.simulator import SimulatorConfig, TrafficSimulator
from loopmesh.devstack.stack import LocalStack, StackState
from loopmesh.devstack.state import LoopState
from loopmesh.devstack.synthetic import SyntheticConfig, SyntheticWorld, examples
from loopmesh.devstack.watch import Watcher
from loopmesh.gen.loopmesh.v1 import trainer_pb2, trainer_pb2_grpc
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.settings import KafkaSettings, MeshSettings
from loopmesh.mesh.topics import TRAINING_EXAMPLES

SERVICE_ORDER = ("features", "ingestion", "feedback", "inference", "trainer", "rollout")


@dataclass
class RunOptions:
    """What `loopmesh run` does; the defaults show a full cycle within minutes."""

    model_name: str = "ctr"
    simulator: bool = True
    duration_seconds: float | None = None
    """Stop by itself after this long (headless tests); None runs until Ctrl-C."""
    headless: bool = False
    """Print progress lines instead of the live dashboard."""
    out_dir: Path = Path(".loopmesh/run")
    requests_per_second: float = 50.0
    drift_after_seconds: float | None = 30.0
    """Concept drift this long after the first promotion (so a cycle shows before it)."""
    bootstrap_examples: int = 1500
    retrain_every_examples: int = 1000
    canary_weights: tuple[float, ...] = (0.1, 0.5)
    canary_min_samples: int = 100
    canary_step_seconds: float = 10.0
    canary_timeout_seconds: float = 120.0
    # A demo-sized gate: a fixed 80% bound that tolerates 0.15 nats of log-loss, so a
    # candidate as good as stable advances on ~100 samples while a broken one still fails.
    canary_max_regression: float = 0.15
    metrics_window_seconds: float = 60.0
    seed: int = 7
    extra_env: dict[str, str] = field(default_factory=dict)
    stop_when: Callable[[LoopState], bool] | None = None
    """Stop early once this holds (tests stop as soon as what they assert has happened)."""


def service_env(state: StackState, ports: dict[str, int], options: RunOptions) -> dict[str, str]:
    """The configuration every service process gets (same variables as compose.yaml)."""
    data = options.out_dir.resolve()
    env = {
        **state.env(),
        "LOOPMESH_INGESTION__SERVER__PORT": str(ports["ingestion"]),
        "LOOPMESH_FEEDBACK__SERVER__PORT": str(ports["feedback"]),
        "LOOPMESH_FEATURES__SERVER__PORT": str(ports["features"]),
        "LOOPMESH_FEATURES__DATA_DIR": str(data / "features"),
        "LOOPMESH_INFERENCE__SERVER__PORT": str(ports["inference"]),
        "LOOPMESH_INFERENCE__FEATURES_URL": f"127.0.0.1:{ports['features']}",
        "LOOPMESH_INFERENCE__DEFAULT_MODEL": options.model_name,
        "LOOPMESH_TRAINER__SERVER__PORT": str(ports["trainer"]),
        "LOOPMESH_TRAINER__MODEL_NAME": options.model_name,
        "LOOPMESH_TRAINER__DATA_DIR": str(data / "trainer"),
        "LOOPMESH_TRAINER__TRIGGERS__MIN_NEW_EXAMPLES": str(options.retrain_every_examples),
        "LOOPMESH_TRAINER__TRIGGERS__COOLDOWN_SECONDS": "5",
        "LOOPMESH_TRAINER__TRIGGERS__CHECK_INTERVAL_SECONDS": "2",
        "LOOPMESH_TRAINER__JOINER__METRICS_WINDOW_SECONDS": str(options.metrics_window_seconds),
        "LOOPMESH_TRAINER__JOINER__METRICS_PUBLISH_INTERVAL_SECONDS": "2",
        "LOOPMESH_TRAINER__JOINER__SESSION_TIMEOUT_SECONDS": "10",
        "LOOPMESH_TRAINER__DATASET__WINDOW_ROWS": str(2 * options.retrain_every_examples),
        "LOOPMESH_ROLLOUT__SERVER__PORT": str(ports["rollout"]),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__MIN_SAMPLES": str(options.canary_min_samples),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__MIN_STEP_SECONDS": str(options.canary_step_seconds),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__STEP_TIMEOUT_SECONDS": str(
            options.canary_timeout_seconds
        ),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__DRAIN_SECONDS": "5",
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__WEIGHTS": json.dumps(list(options.canary_weights)),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__METHOD": "fixed",
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__CONFIDENCE": "0.8",
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__MAX_REGRESSION": str(options.canary_max_regression),
        "LOOPMESH_ROLLOUT__METRICS_LOOKBACK_SECONDS": str(options.metrics_window_seconds),
        "LOOPMESH_ROLLOUT__TICK_SECONDS": "1",
    }
    env.update(options.extra_env)
    return env


async def seed_bootstrap_examples(
    options: RunOptions, world: SyntheticWorld, kafka: KafkaSettings
) -> int:
    """Publish a small labelled bootstrap set to ``training.examples``, the trainer's door."""
    rng = np.random.default_rng(options.seed)
    batch = world.sample(options.bootstrap_examples, rng)
    labels = world.draw_labels(batch, rng)
    rows = examples(batch, labels.tolist(), model_name=options.model_name)
    producer = EventProducer(kafka, "devstack")
    await producer.start()
    try:
        await producer.publish_many(TRAINING_EXAMPLES, rows)
    finally:
        await producer.stop()
    return len(rows)


class ServiceProcesses:
    """The service processes of one run, with logs under the run's directory."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("ab") as log:
            self.children[name] = subprocess.Popen(
                [sys.executable, "-m", f"loopmesh.{name}"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def exited(self) -> list[str]:
        return [name for name, p in self.children.items() if p.poll() is not None]

    def stop(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        for child in self.children.values():
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()


async def wait_serving(
    address: str, name: str, processes: ServiceProcesses, timeout: float
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if name in processes.exited():
                raise RuntimeError(f"{name} exited; see {processes.log_dir / (name + '.log')}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{name} did not report SERVING on {address} within {timeout:.0f}s")


async def run_loop(options: RunOptions, console: Console | None = None) -> dict[str, object]:
    """Bring the loop up, drive it, and return the summary written at the end."""
    console = console or Console()
    started_at = datetime.now(UTC)
    # Each run gets its own Kafka data, model repository and service state, so a rollout
    # history or a dataset from an earlier run never leaks into this one.
    run_dir = options.out_dir.resolve() / started_at.strftime("%Y%m%dT%H%M%S")
    options = replace(options, out_dir=run_dir)
    base = MeshSettings()
    settings = base.model_copy(
        update={
            "infra": base.infra.model_copy(update={"state_dir": run_dir / "infra"}),
            "model_repository": run_dir / "models",
        }
    )
    stack = LocalStack(settings)
    started = time.monotonic()
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if options.headless:
            console.print(f"[{time.monotonic() - started:6.1f}s] {text}")

    note("starting Kafka, tritonserver and Feast")
    state_info = await asyncio.to_thread(stack.up)
    ports = {name: free_port() for name in SERVICE_ORDER}
    world = SyntheticWorld(SyntheticConfig(seed=options.seed, sharpness=2.0))
    seeded = await seed_bootstrap_examples(options, world, stack.kafka_settings)
    note(f"seeded {seeded} bootstrap examples")
    processes = ServiceProcesses(service_env(state_info, ports, options), options.out_dir / "logs")
    loop_state = LoopState(model_name=options.model_name)
    watcher = Watcher(stack.kafka_settings, loop_state, since=started_at)
    stop = asyncio.Event()
    simulator: TrafficSimulator | None = None
    sim_task: asyncio.Task[None] | None = None
    try:
        for name in SERVICE_ORDER:
            processes.start(name)
        for name in SERVICE_ORDER:
            await wait_serving(f"127.0.0.1:{ports[name]}", name, processes, timeout=180)
            note(f"{name} serving on 127.0.0.1:{ports[name]}")
        await watcher.start()
        await _train_initial(f"127.0.0.1:{ports['trainer']}", options.model_name, seeded)
        note("initial version trained; waiting for it to serve")
        await _wait_for(lambda: loop_state.current_route() is not None, 180, processes)
        note("initial version is stable")

        if options.simulator:

            def on_drift(at: datetime) -> None:
                loop_state.drift_at = at
                note("concept drift injected: the labelling rule changed")

            simulator = TrafficSimulator(
                world,
                SimulatorConfig(
                    model_name=options.model_name,
                    requests_per_second=options.requests_per_second,
                ),
                ingestion=f"127.0.0.1:{ports['ingestion']}",
                inference=f"127.0.0.1:{ports['inference']}",
                feedback=f"127.0.0.1:{ports['feedback']}",
                on_drift=on_drift,
                seed=options.seed,
            )
            sim_task = asyncio.create_task(simulator.run(stop))
        try:
            await _watch(options, loop_state, processes, started, notes, console, simulator)
        except asyncio.CancelledError:
            note("stopping (Ctrl-C)")  # still write the plot and summary below
    finally:
        stop.set()
        if sim_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sim_task, timeout=10)
        await watcher.stop()
        processes.stop()
        await asyncio.to_thread(stack.stop)
    extra: dict[str, object] = {"seconds": round(time.monotonic() - started, 1)}
    if simulator is not None:
        extra["simulator"] = simulator.stats.__dict__
    summary_path = write_summary(loop_state, options.out_dir / "summary.json", extra)
    plot_path = write_plot(loop_state, options.out_dir / "live_metrics.png")
    console.print(f"summary: {summary_path}\nplot: {plot_path}")
    summary = loop_state.summary()
    summary.update(extra)
    return summary


def _maybe_drift(
    options: RunOptions, loop_state: LoopState, simulator: TrafficSimulator | None
) -> None:
    if simulator is None or options.drift_after_seconds is None or loop_state.drift_at:
        return
    promotions = loop_state.promotions()
    if promotions:
        since = (datetime.now(UTC) - promotions[0].at).total_seconds()
        if since >= options.drift_after_seconds:
            simulator.inject_drift()


async def _train_initial(address: str, model_name: str, seeded: int) -> None:
    """Train the first version once the trainer has stored the bootstrap set."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        deadline = time.monotonic() + 120
        status = await stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
        while status.dataset_rows < seeded and status.runs_total == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"trainer stored {status.dataset_rows} of {seeded} bootstrap examples in 120 s"
                )
            await asyncio.sleep(0.5)
            status = await stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
        await stub.TriggerTraining(
            trainer_pb2.TriggerTrainingRequest(
                model_name=model_name, reason="bootstrap set", wait=True
            ),
            timeout=300,
        )


async def _wait_for(check: object, timeout: float, processes: ServiceProcesses) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        if exited := processes.exited():
            raise RuntimeError(f"services exited: {', '.join(exited)}")
        await asyncio.sleep(0.5)
    raise RuntimeError(f"condition not met within {timeout:.0f}s")


async def _watch(
    options: RunOptions,
    loop_state: LoopState,
    processes: ServiceProcesses,
    started: float,
    notes: list[str],
    console: Console,
    simulator: TrafficSimulator | None,
) -> None:
    deadline = None if options.duration_seconds is None else started + options.duration_seconds

    def finished() -> bool:
        if exited := processes.exited():
            raise RuntimeError(f"services exited: {', '.join(exited)}")
        _maybe_drift(options, loop_state, simulator)
        if options.stop_when is not None and options.stop_when(loop_state):
            return True
        return deadline is not None and time.monotonic() >= deadline

    if options.headless:
        seen = 0
        while not finished():
            marks = loop_state.rollout_marks
            for mark in marks[seen:]:
                console.print(
                    f"[{time.monotonic() - started:6.1f}s] rollout {mark.state} stable "
                    f"v{mark.stable} canary v{mark.canary} weight {mark.weight:.0%} {mark.reason}"
                )
            seen = len(marks)
            await asyncio.sleep(1.0)
        return
    with Live(render(loop_state, started=started, notes=notes), console=console) as live:
        while not finished():
            live.update(render(loop_state, started=started, notes=notes))
            await asyncio.sleep(1.0)
