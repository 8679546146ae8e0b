"""gRPC adapter of ``loopmesh.v1.FeatureService``: converts messages, calls the core and Feast.

Errors map once, here: ``RequestError`` -> INVALID_ARGUMENT with the field at fault first in
the message; a failing online store -> UNAVAILABLE; a failing erasure publish -> UNAVAILABLE
(nothing was deleted, the caller retries).

``DeleteEntity`` takes the raw entity id, as the app knows it, and maps it the way ingestion
does (``entity_ids``: the keyed-HMAC pseudonym when ``LOOPMESH_PRIVACY__*`` enables it,
services/loopmesh/mesh/privacy.py), so it erases what ingestion stored. ``GetOnlineFeatures`` is
called by services that already hold the stored id (inference maps it) and maps nothing.
``DeleteEntity`` first records the erasure (``EntityErased`` on the
erasures topic: the trainer excludes the entity, the agents drop its state and never recreate
it from older events), then deletes the online rows; the agents delete them again when they
handle the erasure, so a delete that fails here still happens. Erasure is complete once the
agents have handled it (their lag on the erasures topic, normally well under a second): an
event folded before that may briefly push the old state back, which that handling removes.

Values carry the event time of their row (the newest event folded in), to the second: Feast
keeps no finer timestamps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

import grpc
from pydantic import ValidationError

from loopmesh.features.core import (
    FeatureSpec,
    FeatureStatus,
    RequestError,
    StoredValue,
    status_of,
    validate_entity_id,
    validate_entity_ids,
)
from loopmesh.features.store import FeastGateway
from loopmesh.gen.loopmesh.v1 import common_pb2, features_pb2, features_pb2_grpc
from loopmesh.mesh.auth import Role
from loopmesh.mesh.bus import describe_validation_error
from loopmesh.mesh.events import PRIMARY_JOIN_KEY, EntityErased
from loopmesh.mesh.model_repo import shown
from loopmesh.mesh.telemetry import tracer

SERVICE_NAME = features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name
# Reads are for services that need features (the gateway); erasure is an operator's act.
METHOD_ROLES: dict[str, Role] = {
    f"/{SERVICE_NAME}/GetOnlineFeatures": "features",
    f"/{SERVICE_NAME}/GetFeatureSchema": "features",
    f"/{SERVICE_NAME}/DeleteEntity": "operator",
}
_tracer = tracer("loopmesh.features")

_STATUS = {
    FeatureStatus.PRESENT: features_pb2.FEATURE_STATUS_PRESENT,
    FeatureStatus.MISSING: features_pb2.FEATURE_STATUS_MISSING,
    FeatureStatus.STALE: features_pb2.FEATURE_STATUS_STALE,
}

PublishErasure = Callable[[EntityErased], Awaitable[None]]
"""Writes an EntityErased event and returns once Kafka acknowledged it."""


def _value(stored: StoredValue, status: FeatureStatus) -> features_pb2.FeatureValue:
    value = stored.value
    if value is None:
        out = features_pb2.FeatureValue(status=_STATUS[status])
    elif isinstance(value, str):
        out = features_pb2.FeatureValue(value=common_pb2.Value(text=value), status=_STATUS[status])
    else:
        out = features_pb2.FeatureValue(
            value=common_pb2.Value(number=float(value)), status=_STATUS[status]
        )
    if stored.event_time is not None:
        seconds = math.floor(stored.event_time)
        out.event_time.seconds = seconds
        out.event_time.nanos = round((stored.event_time - seconds) * 1e9) % 1_000_000_000
    return out


def _spec(spec: FeatureSpec, max_age: float) -> features_pb2.FeatureSpec:
    return features_pb2.FeatureSpec(
        ref=spec.ref,
        dtype=spec.dtype,
        view=spec.view,
        description=spec.description,
        stale_after_seconds=max_age,
        join_key=spec.join_key,
    )


class FeatureServicer(features_pb2_grpc.FeatureServiceServicer):
    """FeatureService over a ``FeastGateway``."""

    def __init__(
        self,
        store: FeastGateway,
        publish_erasure: PublishErasure,
        *,
        max_entities: int,
        stale_after_s: float | None = None,
        entity_ids: Callable[[str], str] | None = None,
    ) -> None:
        """``entity_ids`` maps DeleteEntity's raw id to the stored one (default: unchanged)."""
        self._store = store
        self._publish_erasure = publish_erasure
        self._max_entities = max_entities
        self._stale_after = stale_after_s
        self._entity_ids = entity_ids

    async def GetOnlineFeatures(
        self,
        request: features_pb2.GetOnlineFeaturesRequest,
        context: grpc.aio.ServicerContext[
            features_pb2.GetOnlineFeaturesRequest, features_pb2.GetOnlineFeaturesResponse
        ],
    ) -> features_pb2.GetOnlineFeaturesResponse:
        with _tracer.start_as_current_span("FeatureService/GetOnlineFeatures") as span:
            try:
                entity_ids = validate_entity_ids(request.entity_ids, limit=self._max_entities)
                join_key = request.join_key or PRIMARY_JOIN_KEY
                specs = self._store.schema.resolve(request.feature_refs, join_key)
            except RequestError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            span.set_attribute("loopmesh.features.entities", len(entity_ids))
            span.set_attribute("loopmesh.features.refs", len(specs))
            # Each feature read once: Feast refuses a ref asked twice ("Duplicate features").
            distinct = list(dict.fromkeys(specs))
            try:
                stored = await self._store.read(entity_ids, distinct, join_key)
            except Exception as err:
                span.record_exception(err)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"online store: {err}")
            if len(distinct) != len(specs):
                column = {spec: i for i, spec in enumerate(distinct)}
                stored = [[values[column[spec]] for spec in specs] for values in stored]
            now = time.time()
            bounds = [self._max_age(spec) for spec in specs]
            return features_pb2.GetOnlineFeaturesResponse(
                feature_refs=[spec.ref for spec in specs],
                entities=[
                    features_pb2.EntityFeatures(
                        entity_id=entity_id,
                        values=[
                            _value(value, status_of(value, max_age=bound, now=now))
                            for value, bound in zip(values, bounds, strict=True)
                        ],
                    )
                    for entity_id, values in zip(entity_ids, stored, strict=True)
                ],
            )

    def _max_age(self, spec: FeatureSpec) -> float:
        return spec.max_age_seconds if self._stale_after is None else self._stale_after

    async def GetFeatureSchema(
        self,
        request: features_pb2.GetFeatureSchemaRequest,
        context: grpc.aio.ServicerContext[
            features_pb2.GetFeatureSchemaRequest, features_pb2.GetFeatureSchemaResponse
        ],
    ) -> features_pb2.GetFeatureSchemaResponse:
        return features_pb2.GetFeatureSchemaResponse(
            features=[_spec(spec, self._max_age(spec)) for spec in self._store.schema.features]
        )

    async def DeleteEntity(
        self,
        request: features_pb2.DeleteEntityRequest,
        context: grpc.aio.ServicerContext[
            features_pb2.DeleteEntityRequest, features_pb2.DeleteEntityResponse
        ],
    ) -> features_pb2.DeleteEntityResponse:
        with _tracer.start_as_current_span("FeatureService/DeleteEntity"):
            try:
                entity_id = validate_entity_id(request.entity_id)
                join_key = request.join_key or PRIMARY_JOIN_KEY
                if join_key not in self._store.schema.join_keys | {PRIMARY_JOIN_KEY}:
                    raise RequestError("join_key", f"no view has join key {shown(join_key)}")
                if self._entity_ids is not None:
                    entity_id = self._entity_ids(entity_id)
                erasure = EntityErased(
                    entity_id=entity_id, join_key=join_key, reason=request.reason
                )
            except RequestError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            except ValidationError as err:  # e.g. a reason over the length limit
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, describe_validation_error(err)
                )
            try:
                # Asked before the erasure is published: the agents may delete first.
                existed = await self._store.exists(entity_id, join_key)
                await self._publish_erasure(erasure)
            except Exception as err:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, f"recording the erasure failed: {err}"
                )
            try:
                await self._store.delete(entity_id, join_key)
            except Exception as err:
                # Recorded: the agents delete the rows when they handle the erasure.
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"erasure {erasure.event_id} recorded; deleting online rows failed: {err}",
                )
            return features_pb2.DeleteEntityResponse(
                existed=existed, erasure_event_id=erasure.event_id
            )
