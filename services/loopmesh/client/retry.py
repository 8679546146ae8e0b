"""When to try a call again, and how long to wait first: the client's retry logic.

``Attempts`` is pure logic (its clock and random source are parameters): it counts the
attempts of one call and, after a failure, says how long to wait before the next one, or
that there is none (a final status, ``max_attempts`` reached, or ``total_timeout_s`` spent).
``call`` runs an attempt function under it, turning the last ``grpc.aio.AioRpcError`` into
the client's ``CallError``.

What is retried: UNAVAILABLE always (the door answers it when Kafka did not acknowledge,
and the transport when a connection drops or cannot be made); DEADLINE_EXCEEDED only when
the call is *resendable*, i.e. carries event ids the doors deduplicate (ingest, feedback), and
the policy allows it. Predict is not resendable: a repeat may log a second prediction.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from loopmesh.client.config import RetryPolicy
from loopmesh.client.errors import CallError, from_rpc_error
from loopmesh.client.types import ItemOutcome

log = logging.getLogger(__name__)

T = TypeVar("T")


def retryable(code: grpc.StatusCode, policy: RetryPolicy, *, resendable: bool) -> bool:
    """Whether a failure with ``code`` may be tried again."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return resendable and policy.retry_deadline_exceeded
    return False


class Attempts:
    """The attempts of one call under a ``RetryPolicy``."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        resendable: bool,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.resendable = resendable
        self._clock = clock
        self._rand = rand
        self._started: float | None = None
        self.number = 0
        """Attempts begun so far."""

    def begin(self) -> int:
        """Count an attempt that starts now; returns its number (1 = the first)."""
        if self._started is None:
            self._started = self._clock()
        self.number += 1
        return self.number

    def next_delay(self, code: grpc.StatusCode) -> float | None:
        """After the current attempt failed with ``code``: seconds to wait before the next
        one, or None when there is to be none."""
        policy = self.policy
        if not retryable(code, policy, resendable=self.resendable):
            return None
        if self.number >= policy.max_attempts:
            return None
        delay = policy.backoff(self.number, self._rand)
        budget, started = policy.total_timeout_s, self._started
        if budget is not None and started is not None and self._clock() - started + delay > budget:
            return None
        return delay


async def call(
    policy: RetryPolicy,
    attempt: Callable[[], Awaitable[T]],
    *,
    method: str,
    resendable: bool,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> tuple[T, int]:
    """``(answer, attempts)`` of ``attempt()`` tried under ``policy``; the last failure is
    raised as a ``CallError`` (naming the field the server named)."""
    attempts = Attempts(policy, resendable=resendable)
    while True:
        number = attempts.begin()
        try:
            return await attempt(), number
        except grpc.aio.AioRpcError as err:
            delay = attempts.next_delay(err.code())
            if delay is None:
                raise from_rpc_error(err, method=method, attempts=number) from err
            log.info(
                "%s attempt %d failed %s (%s); retrying in %.2fs",
                method,
                number,
                err.code().name,
                err.details(),
                delay,
            )
            await sleep(delay)


def with_context(
    err: CallError,
    *,
    field: str | None = None,
    results: Sequence[ItemOutcome] | None = None,
    handled: int | None = None,
) -> CallError:
    """``err`` again (same class) with the field, results or handled count of a batch call."""
    copy = type(err)(
        err.code,
        err.message,
        field=err.field if field is None else field,
        method=err.method,
        attempts=err.attempts,
        results=err.results if results is None else results,
        handled=err.handled if handled is None else handled,
    )
    copy.__cause__ = err.__cause__
    return copy
