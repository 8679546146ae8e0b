"""grpc.aio server bootstrap: health, reflection, TLS, interceptors and graceful shutdown.

Every service builds its server the same way::

    server = GrpcServer("ingestion", settings.server, auth=settings.auth, method_roles=ROLES)
    add_IngestionServiceServicer_to_server(servicer, server.server)
    await server.start([INGESTION_SERVICE_NAME])
    await server.wait()
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from loopmesh.mesh.auth import AuthSettings, Role, TokenAuthInterceptor
from loopmesh.mesh.rpc_guards import DecodeGuard, ErrorMapping
from loopmesh.mesh.settings import GrpcServerSettings
from loopmesh.mesh.telemetry import RpcMetricsInterceptor

log = logging.getLogger(__name__)


def server_credentials(settings: GrpcServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured; mutual TLS when a client CA is too."""
    if settings.tls_certfile is None and settings.tls_keyfile is None:
        if settings.tls_client_cafile is not None:
            raise ValueError("tls_client_cafile needs tls_certfile and tls_keyfile as well")
        return None
    if settings.tls_certfile is None or settings.tls_keyfile is None:
        raise ValueError("TLS needs both tls_certfile and tls_keyfile")
    key = settings.tls_keyfile.read_bytes()
    cert = settings.tls_certfile.read_bytes()
    client_ca = settings.tls_client_cafile.read_bytes() if settings.tls_client_cafile else None
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class GrpcServer:
    """A grpc.aio server with the standard health and reflection services."""

    def __init__(
        self,
        name: str,
        settings: GrpcServerSettings,
        *,
        auth: AuthSettings | None = None,
        method_roles: Mapping[str, Role] | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.name = name
        self.settings = settings
        self.auth_enabled = auth is not None and auth.enabled
        # Tracing outermost so refused calls are traced too; then metrics, then auth.
        chain: list[grpc.aio.ServerInterceptor] = [
            aio_server_interceptor(),  # type: ignore[no-untyped-call]
            RpcMetricsInterceptor(name),
        ]
        if auth is not None and auth.enabled:
            if method_roles is None:
                raise ValueError(f"{name}: auth is configured but no method roles are declared")
            chain.append(TokenAuthInterceptor(auth, method_roles))
        chain.extend(interceptors)
        # Then errors to status codes (one mapping for every service); innermost: a request
        # that does not decode is INVALID_ARGUMENT, not UNKNOWN.
        chain.extend([ErrorMapping(), DecodeGuard()])
        self.server = grpc.aio.server(
            interceptors=chain,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self._services: list[str] = []

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self, service_names: Sequence[str]) -> None:
        """Bind, start serving, and mark every named service SERVING."""
        self._services = [*service_names, "grpc.health.v1.Health"]
        reflection.enable_server_reflection([*self._services, reflection.SERVICE_NAME], self.server)
        bind = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(bind)
        else:
            self.port = self.server.add_secure_port(bind, credentials)
        if self.port == 0:
            raise RuntimeError(f"{self.name}: could not bind {bind}")
        await self.server.start()
        for service in ("", *service_names):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s serving gRPC on %s", self.name, self.address)
        if not self.auth_enabled:
            # Said at every start: an empty token list must never pass for a secured mesh.
            log.warning(
                "%s: token auth is OFF on %s (LOOPMESH_AUTH__TOKENS is empty): every caller "
                "may call every method",
                self.name,
                self.address,
            )

    async def stop(self) -> None:
        """Report NOT_SERVING, then let in-flight calls finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_seconds)

    async def wait(self) -> None:
        await self.server.wait_for_termination()
