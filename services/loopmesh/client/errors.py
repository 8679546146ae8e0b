"""The client's one exception hierarchy: every failed call carries its gRPC code, the field
the server named, and what is known of each item of a batch.

The doors answer a refused request with ``field: message`` (``events[3].numeric.price: not
a finite number``); ``CallError.field`` and ``.message`` are those two parts. Batch calls
(``ingest``, ``ingest_stream``, ``submit_many``) that stop part-way attach the per-item
outcomes of what the servers had answered before (``results``) and how many items were sent
before the failure (``handled``), so a caller knows which items landed::

    try:
        await client.ingest(events)
    except InvalidArgumentError as err:
        print(err.code.name, err.field, err.message)      # INVALID_ARGUMENT events[3].… …
    except CallError as err:                               # any other final status
        ...

``error_for`` picks the subclass of a status code; codes without one are plain
``CallError``. ``UnavailableError`` and ``DeadlineExceededError`` are raised only once the
retry policy gave up (``attempts`` says how many were made).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from loopmesh.client.types import ItemOutcome

# A field path as the doors write it: a name, then ``[index]`` or ``.anything`` parts
# (``events[3].numeric.price``, ``feedback.attributes..[key]``); never ``: `` inside.
_FIELD = re.compile(r"[A-Za-z_]\w*(?:\[\d+\]|\.[^:]*)*")


class ClientError(Exception):
    """Base of every error the LoopMesh client raises on purpose."""


class ClientClosedError(ClientError, RuntimeError):
    """The client or sender was closed; nothing more can be sent through it."""


class CallError(ClientError):
    """A call that failed with a final status (after retries, where they apply)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field: str = "",
        method: str = "",
        attempts: int = 1,
        results: Sequence[ItemOutcome] = (),
        handled: int = 0,
    ) -> None:
        where = f"{field}: " if field else ""
        super().__init__(f"{method or 'call'} failed {code.name}: {where}{message}")
        self.code = code
        """The gRPC status code of the last attempt."""
        self.field = field
        """The request field the server named (``events[3].entity_id``), else ``""``."""
        self.message = message
        """What the server said about it (without the field)."""
        self.method = method
        """The RPC, e.g. ``Ingest``."""
        self.attempts = attempts
        """Attempts made, the first included."""
        self.results: tuple[ItemOutcome, ...] = tuple(results)
        """Per-item outcomes the servers reported before the failure (batch calls), with
        indexes into the caller's items."""
        self.handled = handled
        """Items, from the start of the caller's batch, durably handled before the failure
        (written, refused or duplicate); the rest may be resent as they are."""


class InvalidArgumentError(CallError, ValueError):
    """The request is wrong (INVALID_ARGUMENT); resending it unchanged cannot help."""


class RejectedItemsError(InvalidArgumentError):
    """Raised by ``raise_for_rejected``: some items of an answered batch were refused."""


class NotFoundError(CallError, LookupError):
    """NOT_FOUND: the request names something that does not exist (e.g. an unknown model)."""


class UnauthenticatedError(CallError):
    """UNAUTHENTICATED: no token, or one the server does not know."""


class PermissionDeniedError(CallError):
    """PERMISSION_DENIED: the token lacks the role this door needs."""


class ResourceExhaustedError(CallError):
    """RESOURCE_EXHAUSTED: too much at once (a batch over the server's limit, a message too
    large, or the server's concurrent-call bound)."""


class FailedPreconditionError(CallError):
    """FAILED_PRECONDITION: valid, but the server is not in a state to do it."""


class UnavailableError(CallError):
    """UNAVAILABLE after every retry: the door or its Kafka did not answer."""


class DeadlineExceededError(CallError, TimeoutError):
    """DEADLINE_EXCEEDED on the last attempt."""


class DeliveryError(ClientError):
    """A buffered sender could not deliver some items (raised by ``flush`` and ``close``)."""

    def __init__(self, first: Exception, undelivered: int, event_ids: Sequence[str]) -> None:
        super().__init__(f"{undelivered} items were not delivered; first error: {first}")
        self.error = first
        """The first failure since the last flush (a ``CallError`` after its retries, unless
        something else went wrong, e.g. the client was closed under the sender)."""
        self.undelivered = undelivered
        """Items that failed since the last flush."""
        self.event_ids = tuple(event_ids)
        """Event ids of the undelivered items (the first ones, when there are very many)."""


_BY_CODE: dict[grpc.StatusCode, type[CallError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def split_details(details: str) -> tuple[str, str]:
    """``(field, message)`` of a status message ``field: message``; ``("", details)`` when
    it does not start with a field path."""
    head, sep, tail = details.partition(": ")
    if sep and _FIELD.fullmatch(head):
        return head, tail
    return "", details


def error_for(
    code: grpc.StatusCode,
    details: str,
    *,
    method: str = "",
    attempts: int = 1,
    results: Sequence[ItemOutcome] = (),
    handled: int = 0,
    field: str | None = None,
) -> CallError:
    """The error of a final status: the class of ``code`` with field and message parsed
    from ``details`` (unless ``field`` is given)."""
    parsed, message = split_details(details)
    kind = _BY_CODE.get(code, CallError)
    return kind(
        code,
        message,
        field=parsed if field is None else field,
        method=method,
        attempts=attempts,
        results=results,
        handled=handled,
    )


def from_rpc_error(err: Any, **context: Any) -> CallError:
    """``error_for`` of a ``grpc.aio.AioRpcError`` (or anything with code() and details())."""
    return error_for(err.code(), err.details() or "", **context)
