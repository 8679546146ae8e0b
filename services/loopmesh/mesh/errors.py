"""The one error hierarchy of LoopMesh: each error carries its gRPC status and the field at fault.

A core raises these and knows nothing of gRPC; ``rpc_guards.ErrorMapping`` (every
``GrpcServer`` installs it) turns them into the call's status, ``field: message``. Any other
exception escaping a servicer is a bug: it is logged with its traceback and answered INTERNAL,
never UNAVAILABLE, so a client does not retry into it as if it were an outage.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import grpc

log = logging.getLogger(__name__)


MAX_DETAILS = 1024
"""Longest error text a caller receives."""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LoopMeshError(Exception):
    """Base of every error LoopMesh raises on purpose."""

    status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, field: str, message: str | None = None) -> None:
        """``Error(message)``, or ``Error(field, message)`` when a request field is at fault."""
        if message is None:
            field, message = "", field
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message

    def details(self) -> str:
        """What a caller reads: ``field: message``, kept short whatever the request held.

        Details travel in trailing metadata (16 KiB hard limit) and echo what a client sent.
        """
        field = _cut(self.field, 200)
        return _cut(f"{field}: {self.message}" if field else self.message, MAX_DETAILS)


class InvalidArgument(LoopMeshError, ValueError):
    """The request (or event) itself is wrong; retrying it unchanged cannot help."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LoopMeshError, LookupError):
    """The request names something that does not exist."""

    status = grpc.StatusCode.NOT_FOUND


class UnknownModel(NotFound):
    """No such model (or version) here."""


class FailedPrecondition(LoopMeshError):
    """The request is valid but the system is not in a state to do it."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(LoopMeshError):
    """Too much at once: a batch, a message or a queue over its bound."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LoopMeshError):
    """A dependency (Kafka, Triton, the feature service) is down; the caller may retry."""

    status = grpc.StatusCode.UNAVAILABLE


class SetupError(LoopMeshError, RuntimeError):
    """A component failed to start or to become ready (local infrastructure, Feast apply)."""


# -- the server interceptor -----------------------------------------------------------------


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str, str]:
    """(code, field, details) of an error; anything not a ``LoopMeshError`` is logged INTERNAL.

    Used by ``ErrorMapping`` and by streams that answer each item's error in-band.
    """
    if isinstance(exc, LoopMeshError):
        return exc.status, _cut(exc.field, 200), exc.details()
    log.error("unexpected error in a gRPC method", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "", f"internal error: {type(exc).__name__}"
