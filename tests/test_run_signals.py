"""Ctrl-C and `loopmesh run`: one or two SIGINTs at any moment stop every process the run
started, grandchildren in their process groups included, and the summary is still written.

The unit tests run the real runner (signals, phases, cleanup, ``LocalStack``, the service
processes) on ``sleep`` stand-ins; the e2e test interrupts the real CLI on the real stack.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from loopmesh.devstack import stack as stack_module
from loopmesh.devstack.process import ManagedProcess
from loopmesh.devstack.runner import LoopRun, RunOptions
from loopmesh.mesh.errors import SetupError

MARK = "LOOPMESH_TEST_MARK"


def alive(pid: int) -> bool:
    """Running and not a zombie (PID 1 here may never reap orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def marked(mark: str) -> list[int]:
    """Live processes whose environment carries ``MARK=mark``: all a test started."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return [pid for pid in found if alive(pid)]


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.05)


# A child whose own child stays in its process group, as tritonserver's python stub does.
FAMILY = ["sh", "-c", "sleep 600 & wait"]


class Scenario:
    """Where a run gets interrupted, how often, and how many stand-ins must be up by then."""

    def __init__(self, moment: str, count: int, expect: int) -> None:
        self.moment, self.count, self.expect = moment, count, expect
        self.mark = uuid.uuid4().hex
        self.seen: list[int] = []
        self.run: LoopRun | None = None

    def interrupt(self, moment: str) -> None:
        if moment != self.moment:
            return
        wait_until(lambda: len(marked(self.mark)) >= self.expect, 20, "stand-ins up")
        self.seen = marked(self.mark)
        for sent in range(1, self.count + 1):
            os.kill(os.getpid(), signal.SIGINT)
            if threading.current_thread() is not threading.main_thread():
                # Pending twice before the main thread runs would be one signal: a person
                # pressing Ctrl-C twice is never that fast.
                wait_until(lambda n=sent: self.run and self.run.signals >= n, 5, "signal seen")


def fake_component(scenario: Scenario, argv: list[str]) -> type[Any]:
    """Stands in for KafkaBroker or TritonServer inside the real ``LocalStack``."""

    class Component:
        bootstrap_servers = grpc_url = http_url = metrics_url = "127.0.0.1:1"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.proc = ManagedProcess(argv[0], argv, log_path=Path(os.devnull))
            self.pid: int | None = None

        def start(self, abort: threading.Event | None = None) -> None:
            self.proc.start()
            self.pid = self.proc.pid
            scenario.interrupt("infra")  # from the start-up thread, in the readiness wait
            self.proc.wait_ready(lambda: scenario.moment != "infra", 60, abort=abort)

        def stop(self, hurry: threading.Event | None = None) -> None:
            self.proc.stop(20, hurry)

    return Component


class InterruptedRun(LoopRun):
    """The real run on stand-ins: 5 services `sleep`, the trainer has a grandchild."""

    scenario: Scenario

    async def prepare(self) -> None:
        pass

    def service_argv(self, name: str) -> list[str]:
        return FAMILY if name == "trainer" else ["sleep", "600"]

    async def bring_up(self) -> None:
        self.scenario.interrupt("services")
        if self.scenario.moment == "services":
            await asyncio.Event().wait()  # like waiting for SERVING: only the stop ends it

    async def watch(self) -> str:
        self.scenario.interrupt("running")
        return await super().watch()


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize(("moment", "expect"), [("infra", 2), ("services", 11), ("running", 11)])
async def test_sigint_stops_every_process_and_writes_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str, expect: int, count: int
) -> None:
    scenario = Scenario(moment, count, expect)
    monkeypatch.setenv(MARK, scenario.mark)  # children inherit it; /proc/self/environ does not
    monkeypatch.setattr(stack_module, "KafkaBroker", fake_component(scenario, FAMILY))
    monkeypatch.setattr(stack_module, "TritonServer", fake_component(scenario, FAMILY))

    async def no_topics(*args: object) -> None:
        return None

    monkeypatch.setattr(stack_module, "declare_topics", no_topics)
    monkeypatch.setattr(stack_module, "prepare_repo", lambda path, **_: path)
    monkeypatch.setattr(stack_module, "apply_repo", lambda path: None)
    run = InterruptedRun(RunOptions(simulator=False, headless=True, out_dir=tmp_path), Console())
    run.scenario, scenario.run = scenario, run
    handler = signal.getsignal(signal.SIGINT)

    summary = await run.run()

    assert len(scenario.seen) >= expect, "the scenario did not start its stand-ins"
    assert run.signals == count
    wait_until(lambda: not marked(scenario.mark), 10, f"stopped: {marked(scenario.mark)}")
    assert summary["stopped_by"] == "signal"
    written = json.loads((run.options.out_dir / "summary.json").read_text())
    assert written["stopped_by"] == "signal" and "error" not in written
    assert signal.getsignal(signal.SIGINT) is handler  # the run's handlers are gone


@pytest.mark.parametrize("trap", ["", "trap '' TERM; "], ids=["plain", "ignores-sigterm"])
def test_stop_reaps_the_group_after_its_leader_exited(tmp_path: Path, trap: str) -> None:
    """tritonserver can die before its python stub: the stub, in its group, is still stopped."""
    pid_file = tmp_path / "grandchild.pid"
    argv = ["sh", "-c", f"{trap}sleep 600 & echo $! > {pid_file}"]
    proc = ManagedProcess("family", argv, log_path=tmp_path / "family.log")
    proc.start()
    wait_until(lambda: not proc.running and pid_file.read_text().strip(), 10, "leader gone")
    grandchild = int(pid_file.read_text())
    assert alive(grandchild)

    proc.stop(timeout=1.0)  # SIGTERM to the group; SIGKILL once the timeout is up

    wait_until(lambda: not alive(grandchild), 5, f"grandchild {grandchild} stopped")


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            found |= {child} | descendants(child)
    return found


def cmdline_mentions(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return [pid for pid in pids if alive(pid)]


@pytest.mark.e2e
def test_cli_run_stops_everything_on_two_sigints(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "loopmesh.cli", "run", "--no-simulator", "--headless"]
    cli = subprocess.Popen(
        [*argv, "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert cli.stdout is not None
    stdout = cli.stdout
    reader = threading.Thread(
        target=lambda: [lines.put(line.decode(errors="replace")) for line in stdout], daemon=True
    )
    reader.start()
    output: list[str] = []
    deadline = time.monotonic() + 300
    try:
        while not any("serving on" in line for line in output):
            assert cli.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "".join(output)
            try:
                output.append(lines.get(timeout=0.5))
            except queue.Empty:
                continue
        tree = descendants(cli.pid)
        assert len(tree) >= 8, tree  # Kafka, tritonserver, six services
        os.killpg(cli.pid, signal.SIGINT)
        time.sleep(0.3)  # the scenario: a second Ctrl-C shortly after the first
        os.killpg(cli.pid, signal.SIGINT)
        code = cli.wait(timeout=150)
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
    reader.join(timeout=10)  # the pipe closes with the runner: its children log to files
    output.extend(lines.queue)
    log = "".join(output)
    assert code == 0, log
    assert "stopped" in log
    summaries = list(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 1, log
    assert json.loads(summaries[0].read_text())["stopped_by"] == "signal"
    wait_until(lambda: not [p for p in tree if alive(p)], 10, f"tree gone: {tree}")
    assert not cmdline_mentions(str(tmp_path)), log


def test_every_model_of_the_project_gets_its_own_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18: one trainer per model spec; the run watches the one it is told to."""
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "features.py").write_text("# the project's Feast definitions\n")
    spec = (
        "name: {}\ntask: regression\ninputs: {{context: [{{name: x}}]}}\nlabel: {{source: value}}\n"
    )
    for model in ("eta", "price"):
        (project / "models" / f"{model}.yaml").write_text(spec.format(model))
    monkeypatch.setenv("LOOPMESH_PROJECT", str(project))

    with pytest.raises(SetupError, match=r"specifies 2 models .*--model"):
        LoopRun(RunOptions(simulator=False, out_dir=tmp_path), Console())
    run = LoopRun(RunOptions(model_name="eta", simulator=False, out_dir=tmp_path), Console())
    assert run.model_name == "eta"
    assert run.other_trainers == {"price": "trainer-price"}
    env = run._trainer_env("price", "trainer-price")
    assert env["LOOPMESH_TRAINER__MODEL_NAME"] == "price"
    assert env["LOOPMESH_TRAINER__SERVER__PORT"] == str(run.ports["trainer-price"])
    assert run.ports["trainer-price"] != run.ports["trainer"]
    assert env["LOOPMESH_TRAINER__DATA_DIR"].endswith("trainer-price")
