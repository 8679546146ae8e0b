"""gRPC adapter of ``loopmesh.v1.InferenceService``: converts messages, calls the Predictor.

Errors are the kernel's (``loopmesh.mesh.errors``), mapped to a status by the server's one
``ErrorMapping``. On PredictStream a failed item becomes a response with ``error`` set (the
same code, field and message) and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from loopmesh.gen.loopmesh.v1 import inference_pb2, inference_pb2_grpc
from loopmesh.inference.core import Counters, PredictInput, Predictor, PredictOutput
from loopmesh.inference.routing import Route, RouteTable
from loopmesh.mesh import model_repo
from loopmesh.mesh.auth import Role
from loopmesh.mesh.errors import InvalidArgument, status_of
from loopmesh.mesh.telemetry import tracer

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
OIP_SERVICE_NAME = "inference.GRPCInferenceService"
"""The Open Inference Protocol: served by the data plane, which checks its tokens itself."""
METHOD_ROLES: dict[str, Role] = {
    f"/{SERVICE_NAME}/Predict": "predict",
    f"/{SERVICE_NAME}/PredictStream": "predict",
    f"/{SERVICE_NAME}/SetRoute": "operator",
    f"/{SERVICE_NAME}/GetRoute": "operator",
}
"""Who may call what when token auth is on (``LOOPMESH_AUTH__TOKENS``)."""
_tracer = tracer("loopmesh.inference")
log = logging.getLogger(__name__)


def _input(request: inference_pb2.PredictRequest) -> PredictInput:
    return PredictInput.parse(
        entity_id=request.entity_id,
        context=dict(request.context),
        categorical=dict(request.categorical),
        model_name=request.model_name,
        model_version=request.model_version,
        request_id=request.request_id,
    )


def _response(out: PredictOutput) -> inference_pb2.PredictResponse:
    return inference_pb2.PredictResponse(
        prediction_id=out.prediction_id,
        score=out.score,
        model_name=out.model_name,
        model_version=out.model_version,
        degraded=out.degraded,
        defaulted_features=out.defaulted_features,
        arm=out.arm,
        request_id=out.request_id,
        task=out.task,
        probabilities=out.probabilities,
        predicted_class=out.predicted_class or 0,
    )


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Predict, PredictStream and the routing admin calls."""

    def __init__(
        self,
        predictor: Predictor,
        routes: RouteTable,
        counters: Counters,
        *,
        stream_max_inflight: int = 256,
        on_route_set: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._predictor = predictor
        self._routes = routes
        self._counters = counters
        self._stream_max_inflight = stream_max_inflight
        self._on_route_set = on_route_set

    async def Predict(
        self, request: inference_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.PredictResponse:
        with _tracer.start_as_current_span("Predict"):
            return _response(await self._predictor.predict(_input(request)))

    async def PredictStream(
        self,
        request_iterator: AsyncIterator[inference_pb2.PredictRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference_pb2.PredictResponse]:
        # A slot is held from reading a request until its answer has been handed to gRPC
        # (the yield returns once the write is done, and a write waits on the client's HTTP/2
        # window): a client that sends and never reads stops being read after
        # stream_max_inflight requests instead of growing the answers kept here.
        answers: asyncio.Queue[inference_pb2.PredictResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self._stream_max_inflight)
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: inference_pb2.PredictRequest) -> None:
            try:
                answer = _response(await self._predictor.predict(_input(request)))
            except Exception as exc:
                code, field, message = status_of(exc)
                answer = inference_pb2.PredictResponse(
                    request_id=request.request_id,
                    error=inference_pb2.PredictError(
                        code=code.value[0], field=field, message=message
                    ),
                )
            answers.put_nowait(answer)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks))
            finally:
                # Also when reading failed (an undecodable message): the stream ends, and
                # `await reader` below re-raises instead of the answers loop waiting forever.
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
                slots.release()
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def SetRoute(
        self, request: inference_pb2.SetRouteRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.RouteStatus:
        route = _route(request)
        self._routes.set(route)
        if self._on_route_set is not None:
            # Answered once the data plane routes by it: the caller's next ModelInfer does.
            await self._on_route_set()
        return self._status_of(route.model_name)

    async def GetRoute(
        self, request: inference_pb2.GetRouteRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.RouteStatus:
        try:
            model_repo.validate_model_name(request.model_name)
        except ValueError as exc:
            raise InvalidArgument("model_name", str(exc)) from None
        return self._status_of(request.model_name)

    def _status_of(self, model_name: str) -> inference_pb2.RouteStatus:
        status = inference_pb2.RouteStatus(model_name=model_name)
        route = self._routes.get(model_name)
        if route is not None:
            status.stable_version = route.stable_version or 0
            status.canary_version = route.canary_version or 0
            status.canary_weight = route.canary_weight
            status.source = route.source
            status.state = route.state
            status.step = route.step
        for version, stats in self._counters.for_model(model_name).items():
            status.versions.add(
                model_version=version, answered=stats.answered, failures=stats.failures
            )
        return status


def _route(request: inference_pb2.SetRouteRequest) -> Route:
    try:
        name = model_repo.validate_model_name(request.model_name)
    except ValueError as exc:
        raise InvalidArgument("model_name", str(exc)) from None
    versions: dict[str, int | None] = {}
    for field in ("stable_version", "canary_version"):
        value = getattr(request, field)
        if value < 0:
            raise InvalidArgument(field, "must be a positive version, or 0 for none")
        versions[field] = value or None
    weight = request.canary_weight
    if not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
        raise InvalidArgument("canary_weight", "must be a number in [0, 1]")
    if versions["stable_version"] is None and versions["canary_version"] is None:
        raise InvalidArgument("stable_version", "a route needs a stable or a canary version")
    if versions["canary_version"] is None and weight > 0:
        raise InvalidArgument("canary_weight", "must be 0 without a canary_version")
    return Route(
        model_name=name,
        stable_version=versions["stable_version"],
        canary_version=versions["canary_version"],
        canary_weight=weight,
        source="admin",
    )
