"""The one error hierarchy of LoopMesh: each error carries its gRPC status and the field at fault.

A core raises these and knows nothing of gRPC; ``ErrorMapping`` (every ``GrpcServer`` installs
it) turns them into the call's status, ``field: message``. Any other exception escaping a
servicer is a bug: it is logged with its traceback and answered INTERNAL, never UNAVAILABLE,
so a client does not retry into it as if it were an outage.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

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


async def _answer(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code, _, details = status_of(exc)
    await context.abort(code, details)


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises AbortError; it already carries the status the servicer chose.
    return isinstance(exc, grpc.aio.AbortError)


def _mapped(inner: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(inner):

        async def stream_out(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for answer in inner(request, context):
                    yield answer
            except Exception as exc:
                if _is_abort(exc):
                    raise
                await _answer(context, exc)

        return stream_out

    async def unary_out(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await inner(request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _answer(context, exc)

    return unary_out


class ErrorMapping(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps ``LoopMeshError`` to its status and anything unexpected to INTERNAL (logged)."""

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        decode, encode = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_mapped(handler.unary_unary), decode, encode)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _mapped(handler.unary_stream), decode, encode
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _mapped(handler.stream_unary), decode, encode
            )
        return grpc.stream_stream_rpc_method_handler(_mapped(handler.stream_stream), decode, encode)
