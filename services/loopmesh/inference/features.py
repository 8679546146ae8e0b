"""Online features over the FeatureService gRPC API (the only door to Feast), coalesced.

Concurrent Predict calls that need the same feature refs share one ``GetOnlineFeatures``
request (one entity list), the same way rows share a Triton request. Only PRESENT and STALE
values count; MISSING or an unspecified status is "no value" (the caller then defaults it and
says so). Any failure of the call is ``FeaturesUnavailable``: the caller degrades or fails.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from loopmesh.gen.loopmesh.v1 import features_pb2, features_pb2_grpc
from loopmesh.inference.batching import Coalescer
from loopmesh.inference.core import FeatureReading, FeaturesUnavailable
from loopmesh.inference.triton import RECONNECT_OPTIONS
from loopmesh.mesh.auth import AuthSettings
from loopmesh.mesh.channels import aio_channel
from loopmesh.mesh.settings import GrpcClientSettings

_PRESENT = features_pb2.FEATURE_STATUS_PRESENT
_STALE = features_pb2.FEATURE_STATUS_STALE

Readings = dict[str, FeatureReading]


def _reading(value: features_pb2.FeatureValue) -> FeatureReading:
    if value.status not in (_PRESENT, _STALE):
        return FeatureReading(None)
    kind = value.value.WhichOneof("kind")
    stale = value.status == _STALE
    if kind == "number":
        return FeatureReading(value.value.number, stale=stale)
    if kind == "text":
        return FeatureReading(value.value.text, stale=stale)
    return FeatureReading(None, stale=stale)


class FeatureClient:
    """``FeatureSource`` backed by a FeatureService at ``url``.

    The channel comes from ``loopmesh.mesh.channels``: TLS as ``client`` says, the token of
    ``auth.client_token`` on every call, and a CLIENT span that carries the trace across.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        max_batch: int = 64,
        max_delay_s: float = 0.001,
        max_inflight: int = 2,
        client: GrpcClientSettings | None = None,
        auth: AuthSettings | None = None,
    ) -> None:
        self.url = url
        self._timeout = timeout_s
        self._channel = aio_channel(
            url, client or GrpcClientSettings(), auth=auth, options=RECONNECT_OPTIONS
        )
        self._stub = features_pb2_grpc.FeatureServiceStub(self._channel)
        self._limits = (max_batch, max_delay_s, max_inflight)
        self._coalescers: dict[tuple[str, ...], Coalescer[str, Readings]] = {}
        self.calls = 0

    async def fetch(self, entity_id: str, refs: tuple[str, ...]) -> Readings:
        coalescer = self._coalescers.get(refs)
        if coalescer is None:
            size, delay, inflight = self._limits

            async def flush(entity_ids: Sequence[str]) -> Sequence[Readings]:
                return await self._get(refs, entity_ids)

            coalescer = Coalescer(flush, max_size=size, max_delay_s=delay, max_inflight=inflight)
            self._coalescers[refs] = coalescer
        return await coalescer.submit(entity_id)

    async def _get(self, refs: tuple[str, ...], entity_ids: Sequence[str]) -> list[Readings]:
        unique = list(dict.fromkeys(entity_ids))
        request = features_pb2.GetOnlineFeaturesRequest(entity_ids=unique, feature_refs=refs)
        self.calls += 1
        try:
            response = await self._stub.GetOnlineFeatures(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise FeaturesUnavailable(f"{err.code().name}: {err.details()}") from err
        names = list(response.feature_refs) or list(refs)
        found: dict[str, Readings] = {}
        for entity in response.entities:
            if len(entity.values) != len(names):
                raise FeaturesUnavailable(
                    f"feature service answered {len(entity.values)} values for "
                    f"{len(names)} refs (entity {entity.entity_id!r})"
                )
            found[entity.entity_id] = {
                name: _reading(value) for name, value in zip(names, entity.values, strict=True)
            }
        return [found.get(entity_id, {}) for entity_id in entity_ids]

    async def close(self) -> None:
        for coalescer in list(self._coalescers.values()):
            await coalescer.close()
        await self._channel.close()
