"""The inference gateway assembled: Kafka (routes in, predictions out), Triton, features, gRPC,
and the native data plane in front of it all.

``InferenceGateway.start`` declares its topics, catches up with ``rollouts`` (so the first
request already sees the routes in force), opens this process' gRPC server on a loopback port
(Predict, SetRoute, health), then starts the data plane on the public port: it serves the Open
Inference Protocol and Predict itself and proxies the rest here
(``loopmesh.inference.dataplane``). ``stop`` stops the data plane first (its in-flight calls
finish and it flushes the predictions it produces to Kafka itself), then this server, then
flushes this process' prediction log (the Predicts answered here). Unless disabled, a task
publishes each served version's request count, error rate and p99 latency over a sliding
window (Predict's and ModelInfer's calls alike) to ``metrics.live`` every
``operational_publish_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace

import grpc

from loopmesh.gen.loopmesh.v1 import inference_pb2_grpc
from loopmesh.inference.catalog import ModelCatalog
from loopmesh.inference.core import Counters, Predictor
from loopmesh.inference.dataplane import DataPlane
from loopmesh.inference.features import FeatureClient
from loopmesh.inference.operational import OperationalWindows, to_events
from loopmesh.inference.prediction_log import PredictionLogger
from loopmesh.inference.routing import RouteTable, follow_routes
from loopmesh.inference.server import (
    METHOD_ROLES,
    OIP_SERVICE_NAME,
    SERVICE_NAME,
    InferenceServicer,
)
from loopmesh.inference.settings import InferenceSettings
from loopmesh.inference.triton import TritonPool
from loopmesh.mesh.bus import (
    EventProducer,
    declare_topics,
)
from loopmesh.mesh.errors import LoopMeshError
from loopmesh.mesh.events import Task
from loopmesh.mesh.privacy import EntityIdMapper
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.mesh.settings import GrpcServerSettings
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
            shadow_max_inflight=scope.shadow_max_inflight,
            shadow_timeout_s=scope.shadow_timeout_ms / 1000.0,
            entity_ids=EntityIdMapper(settings.privacy),
        )
        # Reached only through the data plane, on loopback: no TLS on this hop, but the
        # callers' tokens travel with each call and are checked here as on the public port.
        backend = GrpcServerSettings(
            host="127.0.0.1",
            port=scope.dataplane.backend_port,
            max_message_bytes=scope.server.max_message_bytes,
            grace_seconds=scope.server.grace_seconds,
        )
        self.grpc = GrpcServer(
            "inference",
            backend,
            auth=settings.auth,
            method_roles=METHOD_ROLES,
            interceptors=interceptors,
        )
        self.dataplane = DataPlane(
            settings,
            routes=self.routes,
            catalog=self.catalog,
            counters=self.counters,
            logger=self.logger,
            routes_ready=self.follower.caught_up.is_set,
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(
                self.predictor,
                self.routes,
                self.counters,
                stream_max_inflight=scope.stream_max_inflight,
                on_route_set=self.dataplane.push_routes,
            ),
            self.grpc.server,
        )
        self.crashed = asyncio.Event()
        """Set when the routes follower or the data plane died: the process must restart."""
        self._stack = contextlib.AsyncExitStack()

    @property
    def address(self) -> str:
        """The public address (the data plane's)."""
        return self.dataplane.address

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
            # Callbacks run in reverse: the log is flushed after the data plane stopped, whose
            # last forwarded Predicts it holds.
            stack.push_async_callback(self.logger.stop)
            await self.follower.follow(scope.routes_catchup_timeout_s)
            stack.push_async_callback(self.follower.stop)
            stack.push_async_callback(self.triton.close)
            stack.push_async_callback(self.features.close)
            stack.push_async_callback(self.predictor.close)
            await self.grpc.start([SERVICE_NAME, OIP_SERVICE_NAME])
            stack.push_async_callback(self.grpc.stop)
            await self.dataplane.start(self.grpc.address)
            stack.push_async_callback(self.dataplane.stop)
            watch = asyncio.create_task(self._watch_parts(), name="inference-watch")
            stack.push_async_callback(_cancel, watch)
            self._stack = stack.pop_all()

    async def stop(self) -> None:
        """Stop serving (in-flight calls finish), then flush the log and close clients."""
        await self._stack.aclose()
        # Predict rows scored here (what the data plane forwarded, PredictStream) and there.
        requests, rows = self.predictor.batch_stats()
        requests += self.dataplane.last_totals["triton_requests"]
        rows += self.dataplane.last_totals["rows"]
        log.info(
            "stopped: Predict sent %d rows in %d Triton requests; %d predictions logged, "
            "%d dropped",
            rows,
            requests,
            self.logger.logged,
            self.logger.dropped,
        )

    async def _watch_parts(self) -> None:
        # A stale route table or a dead public port: serving on would be wrong or pointless.
        parts = [
            asyncio.create_task(self.follower.crashed.wait()),
            asyncio.create_task(self.dataplane.crashed.wait()),
        ]
        try:
            await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for part in parts:
                part.cancel()
        self.crashed.set()

    async def publish_operational(self) -> int:
        """Publish the current window's figures now; how many versions were published."""
        if self.windows is None:
            return 0
        events = to_events(self.windows.snapshot(), self.windows.window_s, self._task_of)
        await self.producer.publish_many(self.metrics_topic, events)
        return len(events)

    def _task_of(self, model: str, version: int) -> Task:
        try:
            return self.catalog.spec(model, version).task
        except LoopMeshError:
            return "binary"  # a version the repository no longer holds: figures still count

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
