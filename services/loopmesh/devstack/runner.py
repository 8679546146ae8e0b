"""`loopmesh run`: local infrastructure, every service, a seeded model, traffic, a live view.

The runner only uses what a user has: it starts processes, talks to the services over gRPC,
and watches Kafka. Service processes get their configuration through ``LOOPMESH_*``
variables, exactly as in compose.yaml (and every ``LOOPMESH_*`` of the runner's own
environment: TLS, tokens, Kafka security). The runner's own gRPC calls (health probes, the
first training, the simulator) are a client's: ``LOOPMESH_CLIENT__*`` gives their TLS and
token (``ClientConfig``); its Kafka clients take ``LOOPMESH_KAFKA__*`` like the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from rich.console import Console
from rich.live import Live

from loopmesh.client import ClientConfig
from loopmesh.devstack.dashboard import render
from loopmesh.devstack.process import ManagedProcess, free_port
from loopmesh.devstack.report import write_plot, write_summary
from loopmesh.devstack.simulator import SimulatorConfig, TrafficSimulator
from loopmesh.devstack.stack import LocalStack, StackState
from loopmesh.devstack.state import LoopState
from loopmesh.devstack.watch import Watcher
from loopmesh.devstack.worlds import World, history, load_world
from loopmesh.gen.loopmesh.v1 import trainer_pb2, trainer_pb2_grpc
from loopmesh.mesh.channels import aio_channel
from loopmesh.mesh.errors import SetupError
from loopmesh.mesh.feature_repo import project_dir
from loopmesh.mesh.model_spec import load_specs
from loopmesh.mesh.settings import MeshSettings

T = TypeVar("T")
SERVICE_ORDER = ("features", "ingestion", "feedback", "inference", "joiner", "trainer", "rollout")


@dataclass
class RunOptions:
    """What `loopmesh run` does; the defaults show a full cycle within minutes."""

    model_name: str | None = None
    """The model the run watches (and the simulator asks); None: the simulated world's, else
    the project's only model spec."""
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
    shadow_share: float = 1.0
    """Shadow first: every request is also scored by the candidates in shadow (0: none)."""
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
        "LOOPMESH_INFERENCE__DEFAULT_MODEL": options.model_name or "",
        "LOOPMESH_TRAINER__SERVER__PORT": str(ports["trainer"]),
        "LOOPMESH_TRAINER__MODEL_NAME": options.model_name or "",
        "LOOPMESH_TRAINER__DATA_DIR": str(data / "trainer"),
        "LOOPMESH_TRAINER__TRIGGERS__MIN_NEW_EXAMPLES": str(options.retrain_every_examples),
        "LOOPMESH_TRAINER__TRIGGERS__COOLDOWN_SECONDS": "5",
        "LOOPMESH_TRAINER__TRIGGERS__CHECK_INTERVAL_SECONDS": "2",
        "LOOPMESH_JOINER__SERVER__PORT": str(ports["joiner"]),
        "LOOPMESH_JOINER__DATA_DIR": str(data / "joiner"),
        "LOOPMESH_JOINER__METRICS_WINDOW_SECONDS": str(options.metrics_window_seconds),
        "LOOPMESH_JOINER__METRICS_PUBLISH_INTERVAL_SECONDS": "2",
        "LOOPMESH_JOINER__SESSION_TIMEOUT_SECONDS": "10",
        "LOOPMESH_TRAINER__DATASET__WINDOW_ROWS": str(2 * options.retrain_every_examples),
        "LOOPMESH_ROLLOUT__SERVER__PORT": str(ports["rollout"]),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__MIN_SAMPLES": str(options.canary_min_samples),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__GUARD_MIN_REQUESTS": str(options.canary_min_samples),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__MIN_STEP_SECONDS": str(options.canary_step_seconds),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__STEP_TIMEOUT_SECONDS": str(
            options.canary_timeout_seconds
        ),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__DRAIN_SECONDS": "5",
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__WEIGHTS": json.dumps(list(options.canary_weights)),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__METHOD": "fixed",
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__CONFIDENCE": "0.8",
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__MAX_REGRESSION": str(options.canary_max_regression),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__SHADOW_SHARE": str(options.shadow_share),
        "LOOPMESH_ROLLOUT__DEFAULT_POLICY__SHADOW_TIMEOUT_SECONDS": str(
            options.canary_timeout_seconds
        ),
        "LOOPMESH_ROLLOUT__METRICS_LOOKBACK_SECONDS": str(options.metrics_window_seconds),
        "LOOPMESH_ROLLOUT__TICK_SECONDS": "1",
    }
    env.update(options.extra_env)
    return env


def bootstrap_request(
    options: RunOptions, world: World, before: datetime
) -> trainer_pb2.AddExamplesRequest:
    """A labelled history of the world for the trainer's public door, ``AddExamples``.

    The set is history, dated before ``before`` (the run's start): the watcher counts only
    what the run itself produced, so freshness and counts stay the run's own.
    """
    rng = np.random.default_rng(options.seed)
    past = history(world, options.bootstrap_examples, rng)
    spacing = timedelta(milliseconds=100)
    start = before - spacing * (len(past) + 10)
    request = trainer_pb2.AddExamplesRequest(model_name=world.model_name)
    for i, (item, outcome) in enumerate(past):
        example = request.examples.add(
            example_id=f"bootstrap-{options.seed}-{i}",
            entity_id=item.entity_id,
            features=item.context,
            categorical=item.categorical,
            target=outcome.target,
        )
        example.event_time.FromDatetime(start + i * spacing)
    return request


class ServiceProcesses:
    """The service processes of one run, with logs under the run's directory.

    Each service runs in its own session (``ManagedProcess``), so a Ctrl-C in the terminal
    reaches the runner only and the runner decides the stop order.
    """

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        argv: Callable[[str], list[str]] | None = None,
    ) -> None:
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.argv = argv or service_argv
        self.children: dict[str, ManagedProcess] = {}

    def start(
        self, name: str, *, service: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        """Start ``service`` (default: ``name``) as ``name``, with ``env`` over the common one."""
        child = ManagedProcess(
            name,
            self.argv(service or name),
            log_path=self.log_dir / f"{name}.log",
            env={**self.env, **(env or {})},
        )
        self.children[name] = child
        child.start()

    def exited(self) -> list[str]:
        return [name for name, child in self.children.items() if not child.running]

    def stop(self, timeout: float = 20.0, hurry: threading.Event | None = None) -> None:
        """SIGTERM every service's process group at once, wait for all of them together, and
        SIGKILL the groups still alive at the deadline (sooner once ``hurry`` is set)."""
        for child in self.children.values():
            child.terminate()
        deadline = time.monotonic() + timeout
        for child in self.children.values():
            child.wait_stopped(deadline, hurry)


def service_argv(name: str) -> list[str]:
    return [sys.executable, "-m", f"loopmesh.{name}"]


async def wait_serving(
    address: str,
    name: str,
    processes: ServiceProcesses,
    timeout: float,
    client: ClientConfig | None = None,
) -> None:
    """Poll ``address``'s gRPC health until SERVING, over the channel ``client`` describes
    (TLS, client certificate; health needs no token)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    settings = (client or ClientConfig()).channel_settings()
    async with aio_channel(address, settings, tracing=False) as channel:
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
    """Bring the loop up, drive it, and return the summary written at the end.

    SIGINT/SIGTERM never raise here: the first ends the current phase and cleans up, the
    second hurries the cleanup; the summary then says ``stopped_by: "signal"``.
    """
    return await LoopRun(options, console).run()


class _Stopped(Exception):
    """A signal ended the phase that was running."""


# Cleanup waits: (graceful, after a second signal).
_TASK_WAIT = (10.0, 1.0)
_SERVICE_STOP_SECONDS = 20.0


class LoopRun:
    """One `loopmesh run`: phases awaited against a stop event, and one cleanup that always runs.

    The run owns SIGINT and SIGTERM while it runs. The first signal sets the stop event: the
    phase in progress (infrastructure start-up, services, training, watching) ends and the
    cleanup starts. A second one hurries the cleanup: short waits, SIGKILL for what remains.
    The cleanup stops, each step on its own: the simulator, the watcher, the service
    processes, the start-up thread (told to start nothing more), then Kafka and tritonserver;
    the summary is written whatever happened. Tests override the phases that need real parts.
    """

    def __init__(self, options: RunOptions, console: Console | None = None) -> None:
        self.console = console or Console()
        self.started_at = datetime.now(UTC)
        # Each run gets its own Kafka data, model repository and service state, so a rollout
        # history or a dataset from an earlier run never leaks into this one.
        run_dir = options.out_dir.resolve() / self.started_at.strftime("%Y%m%dT%H%M%S")
        self.options = replace(options, out_dir=run_dir)
        base = MeshSettings()
        settings = base.model_copy(
            update={
                "infra": base.infra.model_copy(update={"state_dir": run_dir / "infra"}),
                "model_repository": run_dir / "models",
            }
        )
        self.stack = LocalStack(settings)
        self.started = time.monotonic()
        self.notes: list[str] = []
        self.ports = {name: free_port() for name in SERVICE_ORDER}
        self.client = ClientConfig()
        """TLS and token of the runner's own calls (``LOOPMESH_CLIENT__*``)."""
        project = project_dir(base.project)
        # The project's simulated world drives the run; without a simulator the mesh waits for
        # real apps, and no model is seeded: a model serves nothing until its first training.
        self.world: World | None = load_world(project, options.seed) if options.simulator else None
        if options.simulator and self.world is None:
            raise SetupError(
                f"project {project} has no simulator.py (world(seed)); run with --no-simulator "
                "to start the mesh for real apps"
            )
        model_name = options.model_name or (self.world.model_name if self.world else None)
        if model_name is None:
            specs = sorted(load_specs(project))
            if len(specs) != 1:
                raise SetupError(
                    f"project {project} specifies {len(specs)} models ({', '.join(specs)}): "
                    "name the one to run with --model"
                )
            model_name = specs[0]
        self.options = replace(self.options, model_name=model_name)
        self.loop_state = LoopState(model_name=model_name)
        self.other_trainers = {
            model: f"trainer-{model}"
            for model in sorted(load_specs(project))
            if model != model_name
        }
        """Trainer process names of the project's other models, by model."""
        self.ports.update({name: free_port() for name in self.other_trainers.values()})
        self.seeded = 0
        self.processes: ServiceProcesses | None = None
        self.watcher: Watcher | None = None
        self.simulator: TrafficSimulator | None = None
        self.signals = 0
        self._stop = asyncio.Event()  # first signal: end the phase, clean up
        self._hurry = asyncio.Event()  # second signal: short waits
        self._abort = threading.Event()  # the start-up thread starts nothing more
        self._hurry_threads = threading.Event()  # the same, for stops running in threads
        self._sim_stop = asyncio.Event()
        self._sim_task: asyncio.Task[None] | None = None
        self._up: asyncio.Future[StackState] | None = None
        self._cancelled = False

    # -- phases (tests replace the ones that need real Kafka, Triton and services) ------------

    async def prepare(self) -> None:
        """Nothing before the services start (the bootstrap set goes through a door)."""

    def service_argv(self, name: str) -> list[str]:
        return service_argv(name)

    async def bring_up(self) -> None:
        """Wait for every service, train the first version and wait until it is stable."""
        processes = self._services()
        for name in (*SERVICE_ORDER, *self.other_trainers.values()):
            address = f"127.0.0.1:{self.ports[name]}"
            await wait_serving(address, name, processes, timeout=180, client=self.client)
            self.note(f"{name} serving on {address}")
        self.watcher = Watcher(self.stack.kafka_settings, self.loop_state, since=self.started_at)
        await self.watcher.start()
        if self.world is None:
            self.note("no simulator: a model serves once its first training published it")
            return
        trainer = f"127.0.0.1:{self.ports['trainer']}"
        request = bootstrap_request(self.options, self.world, before=self.started_at)
        self.seeded = await _add_examples(trainer, request, self.client)
        self.note(f"added {self.seeded} bootstrap examples through TrainerService.AddExamples")
        await _train_initial(trainer, self.model_name, self.seeded, self.client)
        self.note("initial version trained; waiting for it to serve")
        await _wait_for(lambda: self.loop_state.current_route() is not None, 180, processes)
        self.note("initial version is stable")

    def _trainer_env(self, model: str, name: str) -> dict[str, str]:
        return {
            "LOOPMESH_TRAINER__MODEL_NAME": model,
            "LOOPMESH_TRAINER__SERVER__PORT": str(self.ports[name]),
            "LOOPMESH_TRAINER__DATA_DIR": str(self.options.out_dir.resolve() / name),
        }

    @property
    def model_name(self) -> str:
        assert self.options.model_name is not None  # resolved in __init__
        return self.options.model_name

    async def watch(self) -> str:
        """Drive traffic (unless disabled) and show the loop until it is time to stop."""
        options, ports = self.options, self.ports
        if self.world is not None:

            def on_drift(at: datetime) -> None:
                self.loop_state.drift_at = at
                self.note("concept drift injected: the labelling rule changed")

            self.simulator = TrafficSimulator(
                self.world,
                SimulatorConfig(
                    model_name=self.model_name,
                    requests_per_second=options.requests_per_second,
                ),
                ingestion=f"127.0.0.1:{ports['ingestion']}",
                inference=f"127.0.0.1:{ports['inference']}",
                feedback=f"127.0.0.1:{ports['feedback']}",
                on_drift=on_drift,
                # TLS comes from LOOPMESH_CLIENT__* by itself; a token given as None would
                # override LOOPMESH_CLIENT__TOKEN, so pass it on.
                token=None if self.client.token is None else self.client.token.get_secret_value(),
                seed=options.seed,
            )
            self._sim_task = asyncio.create_task(self.simulator.run(self._sim_stop))
        return await _watch(
            options,
            self.loop_state,
            self._services(),
            self.started,
            self.notes,
            self.console,
            self.simulator,
        )

    # -- the run ------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.notes.append(text)
        if self.options.headless:
            self.console.print(f"[{time.monotonic() - self.started:6.1f}s] {text}")

    def say(self, text: str) -> None:
        """A note printed in every mode (the live view is gone by the time cleanup speaks)."""
        if self.options.headless:
            self.note(text)
        else:
            self.notes.append(text)
            self.console.print(text)

    async def run(self) -> dict[str, object]:
        loop = asyncio.get_running_loop()
        previous: dict[signal.Signals, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (RuntimeError, ValueError):  # not the main thread: signals stay as they are
                break
            previous[sig] = handler
        try:
            return await self._run()
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                with contextlib.suppress(TypeError, ValueError):  # None: not set from Python
                    signal.signal(sig, handler)

    def _on_signal(self, signum: int) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            self.note(f"{name}: stopping")
            self._abort.set()
            self._stop.set()
        elif not self._hurry.is_set():
            self.say(f"{name} again: hurrying (short waits, SIGKILL what remains)")
            self._hurry_threads.set()
            self._hurry.set()

    async def _run(self) -> dict[str, object]:
        stopped_by, error = "error", None
        try:
            stopped_by = await self._phases()
        except _Stopped:
            stopped_by = "signal"
        except Exception as exc:
            # A phase that fails after a signal fails because of the stop: not the run's error.
            stopped_by, error = ("signal" if self.signals else "error"), exc
        except BaseException:  # cancelled from outside: clean up all the same, then go on
            stopped_by = "cancelled"
            raise
        finally:
            summary = await self._cleanup(stopped_by, error)
        if self._cancelled:
            raise asyncio.CancelledError
        if error is not None and stopped_by == "error":
            raise error
        return summary

    async def _phases(self) -> str:
        self.note("starting Kafka, tritonserver and Feast")
        loop = asyncio.get_running_loop()
        # In a thread that checks ``_abort`` between steps: a signal cannot stop a thread, but
        # the thread then starts nothing more, and the cleanup waits for it before stopping
        # the stack. Shielded so that ending the phase does not drop the thread's result.
        up = self._up = loop.run_in_executor(None, self.stack.up, self._abort)
        state = await self._phase(lambda: asyncio.shield(up))
        await self._phase(self.prepare)
        self.processes = ServiceProcesses(
            service_env(state, self.ports, self.options),
            self.options.out_dir / "logs",
            argv=self.service_argv,
        )
        for name in SERVICE_ORDER:
            if self._stop.is_set():
                raise _Stopped
            self.processes.start(name)
        # Every other model of the project gets its own trainer (the run watches one).
        for model, name in self.other_trainers.items():
            self.processes.start(name, service="trainer", env=self._trainer_env(model, name))
        await self._phase(self.bring_up)
        return await self._phase(self.watch)

    async def _phase(self, work: Callable[[], Awaitable[T]]) -> T:
        """Await one phase until it ends or the stop event is set (then raise ``_Stopped``)."""
        if self._stop.is_set():
            raise _Stopped
        task = asyncio.ensure_future(work())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=5)
        # An error raised while being stopped is a consequence of the stop, not the run's.
        if (
            task.done()
            and not task.cancelled()
            and (task.exception() is None or not self._stop.is_set())
        ):
            return task.result()
        raise _Stopped

    def _services(self) -> ServiceProcesses:
        if self.processes is None:
            raise RuntimeError("the service processes have not been started")
        return self.processes

    # -- cleanup ------------------------------------------------------------------------------

    async def _cleanup(self, stopped_by: str, error: BaseException | None) -> dict[str, object]:
        """Stop everything this run started, each step on its own; always write the summary."""
        self._abort.set()
        self._stop.set()
        hint = " (Ctrl-C again to hurry)" if stopped_by == "signal" and self.signals < 2 else ""
        self.say(f"stopping…{hint}")
        problems: list[str] = []
        try:
            await self._step("simulator", self._stop_simulator, problems)
            await self._step("watcher", self._stop_watcher, problems)
            await self._step("service processes", self._stop_services, problems)
            await self._step("infrastructure start-up", self._join_start_up, problems)
            await self._step("Kafka and tritonserver", self._stop_stack, problems)
        finally:
            summary = self._write_summary(stopped_by, error, problems)
        return summary

    async def _step(
        self, name: str, work: Callable[[], Awaitable[None]], problems: list[str]
    ) -> None:
        """Run one cleanup step to its end: its error is logged, not raised, and a
        cancellation of the run hurries the step instead of cutting it short."""
        task = asyncio.ensure_future(work())
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                self._cancelled = True
                self._hurry_threads.set()
                self._hurry.set()
        failure = "cancelled" if task.cancelled() else task.exception()
        if failure is not None:
            problems.append(f"{name}: {failure!r}")
            self.say(f"[red]stopping {name} failed: {failure!r}")

    def _wait_seconds(self) -> float:
        return _TASK_WAIT[1] if self._hurry.is_set() else _TASK_WAIT[0]

    async def _finish(self, task: asyncio.Future[None]) -> None:
        """Let ``task`` end by itself for a while (briefly once hurried), then cancel it."""
        hurry = asyncio.ensure_future(self._hurry.wait())
        either: set[asyncio.Future[Any]] = {task, hurry}
        try:
            await asyncio.wait(
                either, timeout=self._wait_seconds(), return_when=asyncio.FIRST_COMPLETED
            )
            if not task.done() and hurry.done():
                await asyncio.wait({task}, timeout=self._wait_seconds())
        finally:
            hurry.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=_TASK_WAIT[1])
        if task.done() and not task.cancelled() and (failure := task.exception()) is not None:
            raise failure

    async def _stop_simulator(self) -> None:
        self._sim_stop.set()
        if self._sim_task is not None:
            self.say("stopping the simulator")
            await self._finish(self._sim_task)

    async def _stop_watcher(self) -> None:
        if self.watcher is not None:
            self.say("stopping the watcher")
            await self._finish(asyncio.ensure_future(self.watcher.stop()))

    async def _stop_services(self) -> None:
        if self.processes is not None and self.processes.children:
            self.say("stopping the services")
            await asyncio.to_thread(self.processes.stop, _SERVICE_STOP_SECONDS, self._hurry_threads)

    async def _join_start_up(self) -> None:
        if self._up is None:
            return
        if not self._up.done():
            self.say("waiting for the infrastructure start-up to stop")
        await asyncio.wait({self._up})
        if not self._up.cancelled():
            # Retrieved, not raised: a start-up failure already ended the first phase, and
            # StartAborted (or a tool cut short by the same Ctrl-C) is the stop itself.
            self._up.exception()

    async def _stop_stack(self) -> None:
        if self._up is not None:
            self.say("stopping Kafka and tritonserver")
            await asyncio.to_thread(self.stack.stop, self._hurry_threads)
            self.say("stopped Kafka and tritonserver")

    def _write_summary(
        self, stopped_by: str, error: BaseException | None, problems: list[str]
    ) -> dict[str, object]:
        extra: dict[str, object] = {
            "seconds": round(time.monotonic() - self.started, 1),
            "stopped_by": stopped_by,
        }
        if error is not None:
            extra["error"] = f"{type(error).__name__}: {error}"
        if problems:
            extra["cleanup_errors"] = problems
        if self.simulator is not None:
            extra["simulator"] = self.simulator.stats.__dict__
        summary_path = write_summary(self.loop_state, self.options.out_dir / "summary.json", extra)
        try:
            plot = str(
                write_plot(
                    self.loop_state,
                    self.options.out_dir / "live_metrics.png",
                    started_at=self.started_at,
                    ended_at=datetime.now(UTC),
                )
            )
        except Exception as exc:  # the summary matters more than the picture
            plot = f"not written ({exc!r})"
        self.console.print(f"summary: {summary_path}\nplot: {plot}")
        summary = self.loop_state.summary()
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


async def _add_examples(
    address: str, request: trainer_pb2.AddExamplesRequest, client: ClientConfig
) -> int:
    """Send ``request`` to the trainer in chunks of the door's limit; how many it took."""
    async with aio_channel(
        address, client.channel_settings(), auth=client.auth(), tracing=False
    ) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        taken = 0
        for first in range(0, len(request.examples), 5000):
            chunk = trainer_pb2.AddExamplesRequest(
                model_name=request.model_name, examples=request.examples[first : first + 5000]
            )
            reply = await stub.AddExamples(chunk, timeout=60)
            taken += reply.accepted
    return taken


async def _train_initial(
    address: str, model_name: str, seeded: int, client: ClientConfig | None = None
) -> None:
    """Train the first version once the trainer has stored the bootstrap set (TLS and the
    token, which needs role ``operator``, from ``client``)."""
    config = client or ClientConfig()
    async with aio_channel(
        address, config.channel_settings(), auth=config.auth(), tracing=False
    ) as channel:
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
        taken = status.HasField("running") or (
            status.HasField("last_run")
            and status.last_run.status == trainer_pb2.RUN_STATUS_PUBLISHED
        )
        if taken:
            return  # the trainer's own trigger took the bootstrap set: no second run on it
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
) -> str:
    """Show the loop until ``stop_when`` holds or the duration is up; returns which."""
    deadline = None if options.duration_seconds is None else started + options.duration_seconds
    reason = ""

    def finished() -> bool:
        nonlocal reason
        if exited := processes.exited():
            raise RuntimeError(f"services exited: {', '.join(exited)}")
        _maybe_drift(options, loop_state, simulator)
        if options.stop_when is not None and options.stop_when(loop_state):
            reason = "stop_when"
        elif deadline is not None and time.monotonic() >= deadline:
            reason = "duration"
        return bool(reason)

    if options.headless:
        seen = 0
        while not finished():
            marks = loop_state.rollout_marks
            for mark in marks[seen:]:
                shadows = f" shadow {list(mark.shadows)}" if mark.shadows else ""
                console.print(
                    f"[{time.monotonic() - started:6.1f}s] rollout {mark.state} stable "
                    f"v{mark.stable} canary v{mark.canary}{shadows} weight {mark.weight:.0%} "
                    f"{mark.reason}"
                )
            seen = len(marks)
            await asyncio.sleep(1.0)
        return reason
    with Live(render(loop_state, started=started, notes=notes), console=console) as live:
        while not finished():
            live.update(render(loop_state, started=started, notes=notes))
            await asyncio.sleep(1.0)
    return reason
