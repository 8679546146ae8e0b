"""The inference gateway assembled: Kafka (routes in, predictions out), Triton, features, gRPC.

``InferenceGateway.start`` declares its topics, catches up with ``rollouts`` (so the first
request already sees the routes in force), then opens one gRPC port serving both APIs.
``stop`` lets in-flight calls finish, then flushes the prediction log. Unless disabled, a
task publishes each served version's request count, error rate and p99 latency over a sliding
window to ``metrics.live`` every ``operational_publish_s`` (loopmesh.inference.operational).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace

import grpc

from loopmesh.gen.loopmesh.v1 import inference_pb2_grpc
from loopmesh.inference import oip
from loopmesh.inference.catalog import ModelCatalog
from loopmesh.inference.core import Counters, Predictor
from loopmesh.inference.features import FeatureClient
from loopmesh.inference.operational import OperationalWindows, to_events
from loopmesh.inference.prediction_log import PredictionLogger
from loopmesh.inference.routing import RouteTable, follow_routes
from loopmesh.inference.server import METHOD_ROLES, SERVICE_NAME, InferenceServicer
from loopmesh.inference.settings import InferenceSettings
from loopmesh.inference.triton import TritonPool
from loopmesh.mesh.bus import (
    EventProducer,
    declare_topics,
)
from loopmesh.mesh.privacy import EntityIdMapper
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.mesh.topics import METRICS_LIVE, PREDICTIONS, ROLLOUTS

log = logging.getLogger(__name__)


class InferenceGateway:
    """One gateway process' worth of parts, started and stopped together."""

    def __init__(
        self,
        settings: InferenceSettings,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.name = "inference"
        self.settings = settings
        scope = settings.inference
        self.predictions_topic = replace(PREDICTIONS, name=scope.predictions_topic)
        self.rollouts_topic = replace(ROLLOUTS, name=scope.rollouts_topic)
        self.metrics_topic = replace(METRICS_LIVE, name=scope.metrics_topic)
        self.routes = RouteTable()
        self.windows = (
            OperationalWindows(scope.operational_window_s) if scope.operational_metrics else None
        )
        self.counters = Counters(windows=self.windows)
        self.catalog = ModelCatalog(
            settings.model_repository,
            refresh_s=scope.catalog_refresh_s,
            defaults=scope.feature_defaults,
            default_value=scope.default_feature_value,
        )
        self.producer = EventProducer(settings.kafka, "inference")
        self.logger = PredictionLogger(
            self.producer,
            self.predictions_topic,
            queue_size=scope.log_queue_size,
            batch_size=scope.log_batch_size,
            linger_s=scope.log_linger_ms / 1000.0,
        )
        self.follower = follow_routes(
            settings.kafka, self.rollouts_topic, self.routes, dlq=self.producer
        )
        self.triton = TritonPool(
            settings.triton_url,
            size=scope.triton_channels,
            timeout_s=scope.triton_timeout_s,
            client=settings.triton_client,
        )
        self.features = FeatureClient(
            scope.features_url,
            timeout_s=scope.features_timeout_s,
            max_batch=scope.batch_max_size,
            max_delay_s=scope.batch_max_delay_ms / 1000.0,
            max_inflight=scope.batch_max_inflight,
            client=scope.features_client,
            auth=settings.auth,
        )
        self.predictor = Predictor(
            catalog=self.catalog,
            routes=self.routes,
            features=self.features,
            backend=self.triton,
            sink=self.logger,
            counters=self.counters,
            default_model=scope.default_model,
            on_features_unavailable=scope.on_features_unavailable,
            batch_max_size=scope.batch_max_size,
            batch_max_delay_s=scope.batch_max_delay_ms / 1000.0,
            batch_max_inflight=scope.batch_max_inflight,
            entity_ids=EntityIdMapper(settings.privacy),
        )
        self.grpc = GrpcServer(
            "inference",
            scope.server,
            auth=settings.auth,
            method_roles=METHOD_ROLES,
            interceptors=interceptors,
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(
                self.predictor,
                self.routes,
                self.counters,
                stream_max_inflight=scope.stream_max_inflight,
            ),
            self.grpc.server,
        )
        oip.add_to_server(
            oip.OpenInferenceServicer(
                self.triton,
                self.routes,
                self.catalog,
                self.counters,
                routes_ready=self.follower.caught_up.is_set,
            ),
            self.grpc.server,
        )
        self._stack = contextlib.AsyncExitStack()

    @property
    def address(self) -> str:
        return self.grpc.address

    @property
    def crashed(self) -> asyncio.Event:
        """Set when the routes follower died: serving on would route by stale weights."""
        return self.follower.crashed

    async def start(self) -> None:
        scope = self.settings.inference
        async with contextlib.AsyncExitStack() as stack:
            topics = [self.predictions_topic, self.rollouts_topic]
            if self.windows is not None:
                topics.append(self.metrics_topic)
            await declare_topics(self.settings.kafka, topics)
            await self.producer.start()
            stack.push_async_callback(self.producer.stop)
            if self.windows is not None:
                publisher = asyncio.create_task(
                    self._publish_periodically(scope.operational_publish_s),
                    name="inference-operational-metrics",
                )
                stack.push_async_callback(_cancel, publisher)
            self.logger.start()
            stack.push_async_callback(self.logger.stop)
            await self.follower.follow(scope.routes_catchup_timeout_s)
            stack.push_async_callback(self.follower.stop)
            stack.push_async_callback(self.triton.close)
            stack.push_async_callback(self.features.close)
            stack.push_async_callback(self.predictor.close)
            await self.grpc.start([SERVICE_NAME, oip.SERVICE_NAME])
            stack.push_async_callback(self.grpc.stop)
            self._stack = stack.pop_all()

    async def stop(self) -> None:
        """Stop serving (in-flight calls finish), then flush the log and close clients."""
        await self._stack.aclose()
        requests, rows = self.predictor.batch_stats()
        log.info(
            "stopped: Predict sent %d rows in %d Triton requests; %d predictions logged, "
            "%d dropped",
            rows,
            requests,
            self.logger.logged,
            self.logger.dropped,
        )

    async def publish_operational(self) -> int:
        """Publish the current window's figures now; how many versions were published."""
        if self.windows is None:
            return 0
        events = to_events(self.windows.snapshot(), self.windows.window_s)
        await self.producer.publish_many(self.metrics_topic, events)
        return len(events)

    async def _publish_periodically(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.publish_operational()
            except Exception:
                # Kafka may be briefly away: the next interval publishes fresh figures anyway.
                log.warning("operational metrics not published", exc_info=True)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
