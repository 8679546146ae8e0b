"""A child process with a log file, a readiness probe and a clean or brutal stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from loopmesh.mesh.errors import SetupError

HURRY_GRACE = 1.0
"""Seconds a process group still gets once a stop is hurried (a second Ctrl-C)."""


class StartAborted(SetupError):
    """A start-up was told to stop (``abort`` set) before it finished; nothing was left running."""


def check_abort(abort: threading.Event | None, what: str) -> None:
    """Raise ``StartAborted`` if ``abort`` is set: the caller must start nothing more."""
    if abort is not None and abort.is_set():
        raise StartAborted(f"{what}: start-up stopped")


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a member that is not a zombie.

    ``killpg(pgid, 0)`` also succeeds for zombies, and orphans that died stay zombies where
    PID 1 does not reap them (containers), so the members are read from /proc.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """One long-running child: started in its own session so Ctrl-C in a shell spares it."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        # Set once the whole group is known to be gone: its pgid may then be reused.
        self._group_gone = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            raise SetupError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._group_gone = False
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )

    def wait_ready(
        self,
        probe: Callable[[], bool],
        timeout: float,
        interval: float = 0.2,
        *,
        abort: threading.Event | None = None,
    ) -> None:
        """Poll ``probe`` until it returns True; fail early if the process dies.

        Once ``abort`` is set (from another thread) the process is killed and ``StartAborted``
        raised, so a start-up that is being cleaned up leaves nothing behind.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if abort is not None and abort.is_set():
                self.kill()
                raise StartAborted(f"{self.name}: start-up stopped before it was ready")
            if not self.running:
                code = self._proc.returncode if self._proc else None
                raise SetupError(
                    f"{self.name} exited with code {code} before it was ready; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            with contextlib.suppress(Exception):
                if probe():
                    return
            if abort is not None:
                abort.wait(interval)
            else:
                time.sleep(interval)
        self.kill()
        raise SetupError(
            f"{self.name} was not ready within {timeout:.0f}s; "
            f"log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def stop(self, timeout: float = 20.0, hurry: threading.Event | None = None) -> None:
        """SIGTERM the process group, then SIGKILL it if anything in it outlives ``timeout``.

        The group is signalled even when the leader has exited already: tritonserver's python
        stubs live in its group and outlive it. ``hurry`` (a second Ctrl-C) cuts the wait short.
        """
        self.terminate()
        self.wait_stopped(time.monotonic() + timeout, hurry)

    def terminate(self) -> None:
        """SIGTERM the whole process group (leader alive or not); returns at once."""
        if self._proc is None or self._group_gone:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)

    def wait_stopped(self, deadline: float, hurry: threading.Event | None = None) -> None:
        """Wait until the leader and its group are gone, then SIGKILL what is left.

        The wait ends at ``deadline`` (``time.monotonic``), or ``HURRY_GRACE`` seconds after
        ``hurry`` is set, whichever comes first.
        """
        if self._proc is None or self._group_gone:
            return
        while True:
            if self._proc.poll() is not None and not group_alive(self._proc.pid):
                self._group_gone = True
                return
            now = time.monotonic()
            if hurry is not None and hurry.is_set():
                deadline = min(deadline, now + HURRY_GRACE)
            if now >= deadline:
                break
            time.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, as a fault test wants it)."""
        if self._proc is None or self._group_gone:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    """Stop a process group started by an earlier CLI call, known only by its pid."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The group, not the leader: tritonserver's stubs can outlive it, and a leader whose
        # parent has gone stays a zombie where PID 1 does not reap.
        if not group_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
