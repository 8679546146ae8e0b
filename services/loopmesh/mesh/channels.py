"""The one factory of gRPC client channels: TLS, the service token and trace context.

Every client channel a service opens to another (inference → features, inference and
rollout → Triton, ``loopmesh rollout``, the health probe) comes from here::

    channel = aio_channel(scope.features_url, scope.features_client, auth=settings.auth)

What a ``GrpcClientSettings`` adds to the channel:

- TLS when configured (``tls`` or a ``tls_*`` file), mutual TLS with a client certificate;
  a half-configured pair (certificate without key) is refused naming the setting.
- The service's bearer token (``AuthSettings.client_token``) on every call, by a client
  interceptor: gRPC refuses call credentials on plaintext channels, and loopback meshes
  often run plaintext with token auth on.
- The OpenTelemetry client interceptor, so each call is a CLIENT span whose ``traceparent``
  reaches the server and one trace covers the hop.
- A default deadline (``timeout_s``) for calls that set none, and the message size limits.

OpenTelemetry is imported only when a traced channel is built (the health probe is not).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from loopmesh.mesh.auth import AuthSettings
from loopmesh.mesh.errors import InvalidArgument, SetupError
from loopmesh.mesh.settings import GrpcClientSettings

Options = Sequence[tuple[str, Any]]

AUTHORIZATION = "authorization"


def _read(settings: GrpcClientSettings, field: str) -> bytes | None:
    path: Path | None = getattr(settings, field)
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise SetupError(field, f"cannot read {path}: {err.strerror or err}") from err


def check(settings: GrpcClientSettings) -> None:
    """Refuse a half-configured TLS setting (``InvalidArgument`` naming the setting)."""
    if (settings.tls_certfile is None) != (settings.tls_keyfile is None):
        missing, given = (
            ("tls_keyfile", "tls_certfile")
            if settings.tls_keyfile is None
            else ("tls_certfile", "tls_keyfile")
        )
        raise InvalidArgument(missing, f"mutual TLS needs {missing} as well as {given}")
    if settings.server_name_override is not None and not settings.tls_enabled:
        raise InvalidArgument(
            "server_name_override", "applies to TLS only: set tls or tls_cafile as well"
        )


def channel_credentials(settings: GrpcClientSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials (mutual when a client certificate is set); None for plaintext."""
    check(settings)
    if not settings.tls_enabled:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings, "tls_cafile"),
        private_key=_read(settings, "tls_keyfile"),
        certificate_chain=_read(settings, "tls_certfile"),
    )


def channel_options(settings: GrpcClientSettings, extra: Options = ()) -> list[tuple[str, Any]]:
    """gRPC channel arguments: the message limits, the TLS name override, then ``extra``."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
    ]
    if settings.server_name_override is not None:
        options.append(("grpc.ssl_target_name_override", settings.server_name_override))
    options.extend(extra)
    return options


def _metadata(auth: AuthSettings | None) -> tuple[tuple[str, str], ...]:
    return auth.client_metadata() if auth is not None else ()


def _with_metadata(
    current: Any, added: tuple[tuple[str, str], ...]
) -> list[tuple[str, str | bytes]]:
    pairs: list[tuple[str, str | bytes]] = list(current or ())
    # A token the caller set on the call itself wins over the service's own.
    if any(key == AUTHORIZATION for key, _ in pairs):
        return pairs
    return [*pairs, *added]


# -- grpc.aio ------------------------------------------------------------------------------


class _AioCallDefaults:
    """Adds the token metadata and the default deadline to a grpc.aio call's details."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], timeout_s: float | None) -> None:
        self._metadata = metadata
        self._timeout_s = timeout_s

    def details(self, details: Any) -> Any:
        timeout = details.timeout if details.timeout is not None else self._timeout_s
        metadata = grpc.aio.Metadata(*_with_metadata(details.metadata, self._metadata))
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )


class _AioUnaryUnary(_AioCallDefaults, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.details(details), request)


class _AioUnaryStream(_AioCallDefaults, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.details(details), request)


class _AioStreamUnary(_AioCallDefaults, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self.details(details), requests)


class _AioStreamStream(_AioCallDefaults, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self.details(details), requests)


def aio_interceptors(
    settings: GrpcClientSettings, *, auth: AuthSettings | None = None, tracing: bool = True
) -> list[Any]:
    """The client interceptors of a grpc.aio channel: tracing (outermost), then the token
    and default deadline (left out when there is neither)."""
    chain: list[Any] = []
    if tracing:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        chain.extend(aio_client_interceptors())  # type: ignore[no-untyped-call]
    metadata = _metadata(auth)
    if metadata or settings.timeout_s is not None:
        chain.extend(
            kind(metadata, settings.timeout_s)
            for kind in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
        )
    return chain


def aio_channel(
    target: str,
    settings: GrpcClientSettings,
    *,
    auth: AuthSettings | None = None,
    options: Options = (),
    tracing: bool = True,
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target`` set up by ``settings``; ``auth`` gives the token.

    ``options`` are extra channel arguments (reconnect backoff, keepalive). Raises
    ``InvalidArgument`` or ``SetupError`` naming the setting at fault.
    """
    credentials = channel_credentials(settings)
    interceptors = aio_interceptors(settings, auth=auth, tracing=tracing)
    args = channel_options(settings, options)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=args, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=args, interceptors=interceptors)


# -- sync grpc (CLI, health probe) ---------------------------------------------------------


class _SyncCallDetails(
    collections.namedtuple(
        "_SyncCallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


class _SyncCallDefaults(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the token metadata and the default deadline to a sync call's details."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], timeout_s: float | None) -> None:
        self._metadata = metadata
        self._timeout_s = timeout_s

    def details(self, details: Any) -> _SyncCallDetails:
        timeout = details.timeout if details.timeout is not None else self._timeout_s
        return _SyncCallDetails(
            details.method,
            timeout,
            _with_metadata(details.metadata, self._metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self.details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self.details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self.details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self.details(details), requests)


def sync_channel(
    target: str,
    settings: GrpcClientSettings,
    *,
    auth: AuthSettings | None = None,
    options: Options = (),
    tracing: bool = True,
) -> grpc.Channel:
    """A blocking channel, set up like ``aio_channel`` (for the CLI and the health probe)."""
    credentials = channel_credentials(settings)
    args = channel_options(settings, options)
    if credentials is None:
        channel = grpc.insecure_channel(target, options=args)
    else:
        channel = grpc.secure_channel(target, credentials, options=args)
    metadata = _metadata(auth)
    if metadata or settings.timeout_s is not None:
        channel = grpc.intercept_channel(channel, _SyncCallDefaults(metadata, settings.timeout_s))
    if tracing:
        from opentelemetry.instrumentation.grpc import client_interceptor
        from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

        channel = intercept_channel(channel, client_interceptor())  # type: ignore[no-untyped-call]
    return channel
