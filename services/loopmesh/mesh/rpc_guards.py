"""The guards every ``GrpcServer`` installs innermost: decoding, then errors to status codes.

``ErrorMapping`` answers a kernel error (``mesh.errors``) with its status and ``field:
message``, and anything unexpected INTERNAL (logged), once for every method of every service.

Requests that do not decode answer INVALID_ARGUMENT, not UNKNOWN.

grpc-python (aio) decodes a request before any servicer code runs. When that fails (bytes
that are not the method's protobuf message, or a string field that is not valid UTF-8) it
logs a traceback and answers UNKNOWN "Unexpected DecodeError", which reads as a server bug.
``DecodeGuard``, the innermost interceptor of every ``GrpcServer``, swaps each method's
deserializer for one that cannot raise: an undecodable message becomes ``Undecodable`` and
the call fails INVALID_ARGUMENT (on a request stream: the stream ends at that message, the
servicer finishes with what came before, then the call fails).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from loopmesh.mesh.errors import status_of


class Undecodable:
    """Stands for a request message that failed to decode."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "the request message")
    message = f"request: not a valid {name} (malformed protobuf, or a string that is not UTF-8)"

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:
            return Undecodable(message)

    return decode


async def _refuse(context: grpc.aio.ServicerContext, bad: Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)


def _checked(requests: AsyncIterator[Any], bad: list[Undecodable]) -> AsyncIterator[Any]:
    """The stream up to its first undecodable message, which ends it and is kept in ``bad``.

    The call is refused after the servicer finished with what came before: aborting from
    inside the iterator would happen in whatever task reads it, which a servicer may not
    expect (an answers loop then waits forever).
    """

    async def messages() -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Undecodable):
                bad.append(request)
                return
            yield request

    return messages()


def _guard_unary_in(inner: Any) -> Any:
    if inspect.isasyncgenfunction(inner):

        async def stream_out(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            async for answer in inner(request, context):
                yield answer

        return stream_out

    async def unary_out(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(context, request)
        return await inner(request, context)

    return unary_out


def _guard_stream_in(inner: Any) -> Any:
    if inspect.isasyncgenfunction(inner):

        async def stream_out(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            bad: list[Undecodable] = []
            async for answer in inner(_checked(requests, bad), context):
                yield answer
            if bad:
                await _refuse(context, bad[0])

        return stream_out

    async def unary_out(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        bad: list[Undecodable] = []
        answer = await inner(_checked(requests, bad), context)
        if bad:
            await _refuse(context, bad[0])
        return answer

    return unary_out


def rebuilt(
    handler: Any,
    wrap: Callable[[Callable[..., Any], bool], Callable[..., Any]],
    decode: Callable[[bytes], Any] | None = None,
) -> Any:
    """``handler`` with its method wrapped (``wrap(method, streams_in)``), same kind and codecs
    (or the deserializer ``decode``)."""
    decode = decode or handler.request_deserializer
    encode = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), decode, encode)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, False), decode, encode
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, True), decode, encode
        )
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), decode, encode)


class DecodeGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Makes every method's request decoding fail as INVALID_ARGUMENT (install innermost)."""

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler  # unknown method, or one that takes raw bytes itself

        def guard(method: Callable[..., Any], streams_in: bool) -> Callable[..., Any]:
            guarded: Callable[..., Any] = (
                _guard_stream_in(method) if streams_in else _guard_unary_in(method)
            )
            return guarded

        return rebuilt(handler, guard, _safe(handler.request_deserializer))


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
        return rebuilt(handler, lambda method, _: _mapped(method))
