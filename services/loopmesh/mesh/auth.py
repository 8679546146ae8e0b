"""Token auth with roles for every gRPC server: UNAUTHENTICATED without a valid token,
PERMISSION_DENIED with the wrong role; health and reflection stay open.

Clients send ``authorization: Bearer <token>`` metadata. Tokens are compared in constant
time against every configured token so timing does not reveal which prefix matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import grpc
from pydantic import BaseModel, SecretStr, field_validator

Role = Literal["ingest", "feedback", "predict", "operator", "features"]
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


MIN_TOKEN_LENGTH = 16
"""Shortest token accepted (a server's or a client's): short tokens are guessable."""


def _long_enough(token: SecretStr, what: str) -> SecretStr:
    if len(token.get_secret_value()) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"{what} has {len(token.get_secret_value())} characters; at least "
            f"{MIN_TOKEN_LENGTH} are required (use a long random string)"
        )
    return token


class TokenSpec(BaseModel):
    """One credential: who it is for and what it may do."""

    name: str
    """Who holds the token (logged, never the token itself)."""
    token: SecretStr
    """The bearer token; give it through the environment or a secret store."""
    roles: list[Role]
    """Roles granted: ingest, feedback, predict, operator, features."""

    @field_validator("token")
    @classmethod
    def _token_length(cls, token: SecretStr) -> SecretStr:
        return _long_enough(token, "token")


class AuthSettings(BaseModel):
    """Token auth; off when no tokens are configured."""

    tokens: list[TokenSpec] = []
    """JSON list, e.g. ``[{"name":"app","token":"...","roles":["ingest","feedback"]}]``."""
    client_token: SecretStr | None = None
    """Token this service presents when it calls another service (e.g. inference → features)."""

    @field_validator("client_token", mode="before")
    @classmethod
    def _unset_when_empty(cls, token: object) -> object:
        # compose passes `${LOOPMESH_AUTH__CLIENT_TOKEN:-}`: an empty value means none.
        return None if token == "" else token

    @field_validator("client_token")
    @classmethod
    def _client_token_length(cls, token: SecretStr | None) -> SecretStr | None:
        return None if token is None else _long_enough(token, "client_token")

    def client_metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata for service-to-service calls; empty when no client token is set."""
        if self.client_token is None:
            return ()
        return bearer(self.client_token.get_secret_value())

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks the bearer token of every call against the role its method needs.

    ``method_roles`` maps a full method name (``/pkg.Service/Method``) or a service prefix
    (``/pkg.Service/``) to its role; a method matched by neither is refused, so a new RPC
    is closed until someone decides who may call it.
    """

    def __init__(self, settings: AuthSettings, method_roles: Mapping[str, Role]) -> None:
        self._tokens = [
            (spec.token.get_secret_value().encode(), frozenset(spec.roles))
            for spec in settings.tokens
        ]
        self._method_roles = dict(method_roles)

    def role_for(self, method: str) -> Role | None:
        if method in self._method_roles:
            return self._method_roles[method]
        service = method[: method.rfind("/") + 1]
        return self._method_roles.get(service)

    def _roles_of(self, metadata: tuple[tuple[str, str | bytes], ...]) -> frozenset[str] | None:
        presented = b""
        for key, value in metadata:
            if key == "authorization":
                raw = value if isinstance(value, bytes) else value.encode()
                if raw[:7].lower() == b"bearer ":
                    presented = raw[7:].strip()
        if not presented:
            return None
        found: frozenset[str] | None = None
        for token, roles in self._tokens:
            # No early exit: every configured token is compared.
            if hmac.compare_digest(token, presented):
                found = roles
        return found

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        method: str = handler_call_details.method
        if method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        roles = self._roles_of(tuple(handler_call_details.invocation_metadata or ()))
        if roles is None:
            return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid token")
        needed = self.role_for(method)
        if needed is None or needed not in roles:
            return _refusing(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"role {needed or 'unassigned'!r} is needed for {method}",
            )
        return handler


def _refusing(handler: Any, code: grpc.StatusCode, details: str) -> Any:
    """A handler of the same kind as ``handler`` that fails the call with ``code``."""

    async def abort_unary(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details)

    async def abort_stream(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort_unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token`` (for clients and tests)."""
    return (("authorization", f"Bearer {token}"),)
