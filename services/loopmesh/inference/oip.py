"""The Open Inference Protocol (KServe V2) in front of Triton, with canary routing.

``ModelInfer`` is a bytes-in, bytes-out handler: the caller's serialized request goes to
Triton as it came, and Triton's serialized answer comes back untouched. When the request
names no version and the model has a route, the chosen version is *appended* to the bytes as
a second ``model_version`` field: protobuf keeps the last value of a singular field, so this
re-targets the request without re-encoding its tensors. The routing key is the request's
``routing_key`` string parameter, else its ``id`` (a request with neither is spread at random).

Health: ServerLive is the gateway's own liveness; ServerReady needs Triton ready and the
routes caught up. ModelReady with no version asks about the routed stable version.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2, service_pb2_grpc

from loopmesh.inference import instruments
from loopmesh.inference.catalog import ModelCatalog
from loopmesh.inference.core import Counters
from loopmesh.inference.routing import RouteTable
from loopmesh.inference.tensors import TensorError, check_infer_inputs
from loopmesh.inference.triton import TritonPool
from loopmesh.mesh import model_repo
from loopmesh.mesh.telemetry import tracer

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "loopmesh-inference"
ROUTING_KEY = "routing_key"
_tracer = tracer("loopmesh.inference.oip")


def override_version(request: bytes, version: int) -> bytes:
    """``request`` with ``model_version`` (field 2) set to ``version``, by appending it."""
    text = str(version).encode()
    # Tag 0x12 = field 2, length-delimited; a version is at most 18 digits, so one length byte.
    return request + bytes((0x12, len(text))) + text


class OpenInferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Health, metadata and inference of the Open Inference Protocol, routed to Triton."""

    def __init__(
        self,
        triton: TritonPool,
        routes: RouteTable,
        catalog: ModelCatalog,
        counters: Counters,
        routes_ready: Callable[[], bool],
    ) -> None:
        self._triton = triton
        self._routes = routes
        self._catalog = catalog
        self._counters = counters
        self._routes_ready = routes_ready

    # -- inference ----------------------------------------------------------------------------

    async def ModelInferRaw(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            parsed = service_pb2.ModelInferRequest.FromString(request)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: not ModelInferRequest")
        name = parsed.model_name
        if not name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model_name: required")
        try:
            model_repo.validate_model_name(name)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model_name: {exc}")
        pinned = None
        if parsed.model_version:
            try:
                pinned = model_repo.validate_version(parsed.model_version)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model_version: {exc}")
        try:
            check_infer_inputs(parsed)
        except TensorError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with _tracer.start_as_current_span("ModelInfer", attributes={"model.name": name}):
            if pinned is not None:
                return await self._forward(context, parsed, request, pinned, None)
            route = self._routes.get(name)
            choice = route.choose(self._key(parsed)) if route is not None else None
            if choice is None:
                # No rollout known: Triton's own version policy picks (the latest loaded).
                return await self._forward(context, parsed, request, None, None)
            version, arm = choice
            stable = route.stable_version if route is not None and arm == "canary" else None
            return await self._forward(
                context, parsed, override_version(request, version), version, stable, request
            )

    async def _forward(
        self,
        context: grpc.aio.ServicerContext,
        parsed: Any,
        request: bytes,
        version: int | None,
        fallback: int | None,
        original: bytes | None = None,
    ) -> bytes:
        name = parsed.model_name
        timeout = self._triton.timeout(context.time_remaining())
        started = time.perf_counter()
        try:
            answer = await self._triton.forward_infer(request, timeout)
        except grpc.aio.AioRpcError as err:
            # A malformed request is the caller's fault, not the version's: no blame, no retry.
            client_error = err.code() == grpc.StatusCode.INVALID_ARGUMENT
            if not client_error:
                instruments.record_triton_error(name, version, err.code().name)
            # A version that does not exist at all is the caller's mistake too (NOT_FOUND).
            if (
                version is not None
                and not client_error
                and (err.code() != grpc.StatusCode.NOT_FOUND or self._known(name, version))
            ):
                self._counters.failed(name, version, (time.perf_counter() - started) * 1000.0)
            if fallback is None or fallback == version or original is None or client_error:
                await self._abort(context, err, name, version)
                raise  # unreachable: abort raises
            # A failing canary: stable answers this request instead.
            return await self._forward(
                context, parsed, override_version(original, fallback), fallback, None
            )
        if version is not None:
            self._counters.succeeded(name, version, (time.perf_counter() - started) * 1000.0)
        instruments.record_prediction(name, version, arm="oip", degraded=False)
        return answer

    @staticmethod
    def _key(parsed: Any) -> str | None:
        param = parsed.parameters.get(ROUTING_KEY)
        if param is not None and param.WhichOneof("parameter_choice") == "string_param":
            return str(param.string_param)
        return str(parsed.id) or None

    async def _abort(
        self,
        context: grpc.aio.ServicerContext,
        err: grpc.aio.AioRpcError,
        name: str,
        version: int | None,
    ) -> None:
        code = err.code()
        # Published but not loaded is "not ready" (retry later), not "no such thing".
        if code == grpc.StatusCode.NOT_FOUND and version is not None and self._known(name, version):
            code = grpc.StatusCode.UNAVAILABLE
        await context.abort(code, f"triton: {err.details() or code.name}")

    def _known(self, name: str, version: int) -> bool:
        try:
            return self._catalog.has_version(name, version)
        except ValueError:
            return False

    # -- health and metadata ------------------------------------------------------------------

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not self._routes_ready():
            return service_pb2.ServerReadyResponse(ready=False)
        try:
            answer = await self._triton.stub().ServerReady(
                request, timeout=self._triton.timeout(context.time_remaining())
            )
        except grpc.aio.AioRpcError:
            return service_pb2.ServerReadyResponse(ready=False)
        return answer

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        answer = await self._call(context, "ServerMetadata", request)
        answer.name = SERVER_NAME
        return answer

    @staticmethod
    async def _check_model(request: Any, context: grpc.aio.ServicerContext) -> None:
        """Names and versions that are not a repository's are refused here, naming the field,
        instead of travelling on to Triton."""
        try:
            model_repo.validate_model_name(request.name)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"name: {exc}")
        if request.version:
            try:
                model_repo.validate_version(request.version)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"version: {exc}")

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check_model(request, context)
        if not request.version:
            route = self._routes.get(request.name)
            stable = route.stable_version if route is not None else None
            if stable is not None:
                request.version = str(stable)
        return await self._call(context, "ModelReady", request)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check_model(request, context)
        return await self._call(context, "ModelMetadata", request)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check_model(request, context)
        return await self._call(context, "ModelConfig", request)

    async def _call(self, context: grpc.aio.ServicerContext, method: str, request: Any) -> Any:
        timeout = self._triton.timeout(context.time_remaining())
        try:
            return await getattr(self._triton.stub(), method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            await self._abort(context, err, getattr(request, "name", ""), None)
            raise


def add_to_server(servicer: OpenInferenceServicer, server: grpc.aio.Server) -> None:
    """Register the methods the gateway serves (others answer UNIMPLEMENTED)."""

    def typed(method: Any, name: str) -> grpc.RpcMethodHandler:
        request_type = getattr(service_pb2, f"{name}Request")
        response_type = getattr(service_pb2, f"{name}Response")
        return grpc.unary_unary_rpc_method_handler(
            method,
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )

    handlers = {
        name: typed(getattr(servicer, name), name)
        for name in (
            "ServerLive",
            "ServerReady",
            "ServerMetadata",
            "ModelReady",
            "ModelMetadata",
            "ModelConfig",
        )
    }
    # Bytes in, bytes out: no decode/encode of tensors on the way through.
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(servicer.ModelInferRaw)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
