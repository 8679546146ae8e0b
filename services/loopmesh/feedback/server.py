"""The gRPC adapter of feedback: ``FeedbackService`` messages in, intake outcomes out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from loopmesh.feedback.core import feedback_intake
from loopmesh.feedback.settings import FeedbackScope, FeedbackSettings
from loopmesh.gen.loopmesh.v1 import feedback_pb2, feedback_pb2_grpc
from loopmesh.mesh.errors import Unavailable
from loopmesh.mesh.events import FeedbackEvent
from loopmesh.mesh.intake import Intake, Item
from loopmesh.mesh.intake_server import (
    IntakeServer,
    KafkaPublisher,
    abort_unavailable,
    envelope_item,
    item_result,
    none_valid,
)
from loopmesh.mesh.pipeline import micro_batches, pipelined
from loopmesh.mesh.topics import FEEDBACK

SERVICE_NAME = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name


def feedback_item(message: feedback_pb2.Feedback, index: int) -> Item:
    """The model fields of one feedback message; unset fields are left to the model."""
    data: dict[str, Any] = {
        "prediction_id": message.prediction_id,
        "attributes": dict(message.attributes),
    }
    if message.HasField("label"):
        data["label"] = message.label
    if message.HasField("reward"):
        data["reward"] = message.reward
    if message.HasField("value"):
        data["value"] = message.value
    return envelope_item(message, index, data)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    """Validates through the intake core; answers only after Kafka acknowledged."""

    def __init__(self, intake: Intake[FeedbackEvent], scope: FeedbackScope) -> None:
        self._intake = intake
        self._scope = scope

    async def Submit(
        self, request: feedback_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitResponse:
        try:
            outcomes = await self._intake.submit([feedback_item(request.feedback, 0)])
        except Unavailable as err:
            await abort_unavailable(context, err)
        refused = none_valid(outcomes)
        if refused is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused)
        (outcome,) = outcomes
        return feedback_pb2.SubmitResponse(
            event_id=outcome.event_id, duplicate=outcome.status == "duplicate"
        )

    async def SubmitStream(
        self,
        request_iterator: AsyncIterator[feedback_pb2.SubmitStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[feedback_pb2.SubmitStreamResponse]:
        async def items() -> AsyncIterator[Item]:
            index = 0
            async for request in request_iterator:
                yield feedback_item(request.feedback, index)
                index += 1

        batches = micro_batches(items(), self._scope.stream_batch_items)
        try:
            async with aclosing(
                pipelined(batches, self._intake.submit, self._scope.stream_in_flight)
            ) as results:
                async for outcomes in results:
                    for outcome in outcomes:
                        yield feedback_pb2.SubmitStreamResponse(result=item_result(outcome))
        except Unavailable as err:
            await abort_unavailable(context, err)


def feedback_server(settings: FeedbackSettings) -> IntakeServer:
    """The feedback door, not yet started."""
    scope = settings.feedback
    window = scope.dedupe.window()

    def register(publisher: KafkaPublisher, server: grpc.aio.Server) -> None:
        servicer = FeedbackServicer(feedback_intake(publisher, scope.limits, window), scope)
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(servicer, server)

    return IntakeServer(
        "feedback",
        settings.kafka,
        scope,
        topic=FEEDBACK,
        service_name=SERVICE_NAME,
        register=register,
        role="feedback",
        auth=settings.auth,
        telemetry=settings.telemetry,
    )
