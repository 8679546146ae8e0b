"""The one life cycle of every deployable (mesh/app.py): signals, crashes, a Kafka not up yet."""

from __future__ import annotations

import asyncio
import os
import signal

from aiokafka.errors import KafkaConnectionError

from loopmesh.mesh.app import run


class Part:
    """A deployable that records what happened to it."""

    def __init__(self, failing_starts: int = 0) -> None:
        self.name = "part"
        self.crashed = asyncio.Event()
        self.events: list[str] = []
        self._failing_starts = failing_starts

    async def start(self) -> None:
        if self._failing_starts:
            self._failing_starts -= 1
            self.events.append("start failed")
            raise KafkaConnectionError("no broker yet")
        self.events.append("started")

    async def stop(self) -> None:
        self.events.append("stopped")


async def _when(check: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.01)


async def test_a_signal_stops_it_gracefully_with_status_0() -> None:
    part = Part()
    serving = asyncio.create_task(run(part))
    await _when(lambda: part.events == ["started"])
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(serving, 10) == 0
    assert part.events == ["started", "stopped"]


async def test_a_crashed_part_ends_it_with_status_1_after_stopping() -> None:
    part = Part()
    serving = asyncio.create_task(run(part))
    await _when(lambda: part.events == ["started"])
    part.crashed.set()
    assert await asyncio.wait_for(serving, 10) == 1
    assert part.events == ["started", "stopped"]


async def test_a_kafka_not_up_yet_is_waited_out_when_asked() -> None:
    part = Part(failing_starts=2)
    serving = asyncio.create_task(run(part, retry_start_s=0.05))
    await _when(lambda: "started" in part.events)
    part.crashed.set()
    assert await asyncio.wait_for(serving, 10) == 1
    # Each failed start is cleaned up before the next try.
    assert part.events == ["start failed", "stopped"] * 2 + ["started", "stopped"]

    impatient = Part(failing_starts=1)
    try:
        await run(impatient)
    except KafkaConnectionError:
        pass
    else:
        raise AssertionError("without retry_start_s a failed start must fail the process")
