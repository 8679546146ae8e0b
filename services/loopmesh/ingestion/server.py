"""The gRPC adapter of ingestion: ``IngestionService`` messages in, intake outcomes out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from loopmesh.gen.loopmesh.v1 import ingestion_pb2, ingestion_pb2_grpc
from loopmesh.ingestion.core import ingestion_intake
from loopmesh.ingestion.settings import IngestionScope, IngestionSettings
from loopmesh.mesh.errors import Unavailable
from loopmesh.mesh.events import InteractionEvent
from loopmesh.mesh.intake import Intake, Item
from loopmesh.mesh.intake_server import (
    ACKED_TRAILER,
    IntakeServer,
    KafkaPublisher,
    StreamTally,
    abort_unavailable,
    count,
    envelope_item,
    item_result,
    none_valid,
)
from loopmesh.mesh.pipeline import pipelined
from loopmesh.mesh.privacy import EntityIdMapper
from loopmesh.mesh.topics import EVENTS_RAW

SERVICE_NAME = ingestion_pb2.DESCRIPTOR.services_by_name["IngestionService"].full_name


class BatchTooLarge(Exception):
    """A request carries more events than the configured limit."""


def event_item(message: ingestion_pb2.InteractionEvent, index: int) -> Item:
    """The model fields of one event message; unset fields are left to the model's defaults."""
    numeric, categorical, entities = message.numeric, message.categorical, message.entities
    data: dict[str, Any] = {
        "entity_id": message.entity_id,
        "event_type": message.event_type,
        # Key lookups: upb maps have no fast dict conversion.
        "numeric": {k: numeric[k] for k in numeric} if numeric else {},
        "categorical": {k: categorical[k] for k in categorical} if categorical else {},
    }
    if entities:
        data["entities"] = {k: entities[k] for k in entities}
    return envelope_item(message, index, data)


class IngestionServicer(ingestion_pb2_grpc.IngestionServiceServicer):
    """Validates through the intake core; answers only after Kafka acknowledged."""

    def __init__(self, intake: Intake[InteractionEvent], scope: IngestionScope) -> None:
        self._intake = intake
        self._scope = scope

    def _items(self, request: ingestion_pb2.IngestRequest, offset: int) -> list[Item]:
        limit = self._scope.limits.max_batch_items
        if len(request.events) > limit:
            raise BatchTooLarge(
                f"events: {len(request.events)} events in one request; the limit is {limit}"
            )
        return [event_item(e, offset + i) for i, e in enumerate(request.events)]

    async def Ingest(
        self, request: ingestion_pb2.IngestRequest, context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.IngestResponse:
        if not request.events:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "events: the batch is empty")
        try:
            outcomes = await self._intake.submit(self._items(request, 0))
        except BatchTooLarge as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except Unavailable as err:
            await abort_unavailable(context, err)
        refused = none_valid(outcomes)
        if refused is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused)
        tally = count(outcomes)
        return ingestion_pb2.IngestResponse(
            accepted=tally.accepted,
            rejected=tally.rejected,
            duplicates=tally.duplicates,
            results=[item_result(o) for o in outcomes],
        )

    async def IngestStream(
        self,
        request_iterator: AsyncIterator[ingestion_pb2.IngestRequest],
        context: grpc.aio.ServicerContext,
    ) -> ingestion_pb2.IngestStreamResponse:
        tally = StreamTally(self._scope.max_reported_results)

        async def batches() -> AsyncIterator[list[Item]]:
            offset = 0
            async for request in request_iterator:
                if request.events:
                    yield self._items(request, offset)
                    offset += len(request.events)

        try:
            async with aclosing(
                pipelined(batches(), self._intake.submit, self._scope.stream_in_flight)
            ) as results:
                async for outcomes in results:
                    tally.add(outcomes)
        except BatchTooLarge as err:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                str(err),
                trailing_metadata=((ACKED_TRAILER, str(tally.handled)),),
            )
        except Unavailable as err:
            await abort_unavailable(context, err, acked=tally.handled)
        return ingestion_pb2.IngestStreamResponse(
            accepted=tally.accepted,
            rejected=tally.rejected,
            duplicates=tally.duplicates,
            results=[item_result(o) for o in tally.results],
            results_truncated=tally.truncated,
        )


def ingestion_server(settings: IngestionSettings) -> IntakeServer:
    """The ingestion door, not yet started."""
    scope = settings.ingestion
    entity_ids = EntityIdMapper(settings.privacy)
    window = scope.dedupe.window()

    def register(publisher: KafkaPublisher, server: grpc.aio.Server) -> None:
        intake = ingestion_intake(publisher, scope.limits, window, entity_ids)
        ingestion_pb2_grpc.add_IngestionServiceServicer_to_server(
            IngestionServicer(intake, scope), server
        )

    return IntakeServer(
        "ingestion",
        settings.kafka,
        scope,
        topic=EVENTS_RAW,
        service_name=SERVICE_NAME,
        register=register,
        role="ingest",
        auth=settings.auth,
        telemetry=settings.telemetry,
    )
