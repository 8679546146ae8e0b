"""The features process: FeatureService (reads, erasure) and the stream agents (writes).

Both run in one process by default; ``LOOPMESH_FEATURES__RUN_SERVER`` and
``LOOPMESH_FEATURES__RUN_AGENTS`` split them so readers and writers scale apart. A crashed
fold sets ``crashed`` (the process exits with status 1 for its supervisor).

The server's port belongs to the Go data plane when ``features.dataplane.enabled`` (the
default): it serves ``GetOnlineFeatures`` from the online store itself and proxies the rest
to this process's FeatureService on a loopback port (``loopmesh.features.dataplane``). Its
exit is a crash too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from loopmesh.features.settings import FeaturesSettings
from loopmesh.mesh.bus import EventProducer, declare_topics, partition_counts
from loopmesh.mesh.events import EntityErased, erasure_key
from loopmesh.mesh.privacy import EntityIdMapper
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.mesh.settings import GrpcServerSettings
from loopmesh.mesh.topics import ENTITIES_ERASED, EVENTS_RAW

if TYPE_CHECKING:
    from loopmesh.features.agents import FeatureAgents
    from loopmesh.features.dataplane import FeaturesDataPlane
    from loopmesh.features.store import FeastGateway

log = logging.getLogger(__name__)


class FeaturesApp:
    """The server and the agents of one features process, started and stopped together."""

    def __init__(self, settings: FeaturesSettings) -> None:
        self.name = "features"
        self.settings = settings
        scope = settings.features
        self.events = replace(EVENTS_RAW, name=scope.events_topic)
        self.erasures = replace(ENTITIES_ERASED, name=scope.erasures_topic)
        self.crashed = asyncio.Event()
        self.server: GrpcServer | None = None
        """This process's FeatureService: on the public port, or on loopback behind the data
        plane."""
        self.dataplane: FeaturesDataPlane | None = None
        self.agents: FeatureAgents | None = None
        self._store: FeastGateway | None = None
        self._producer: EventProducer | None = None
        self._watch: asyncio.Task[None] | None = None
        self._watch_plane: asyncio.Task[None] | None = None

    @property
    def address(self) -> str | None:
        """The public FeatureService address (the data plane's when it runs)."""
        if self.dataplane is not None:
            return self.dataplane.address
        return self.server.address if self.server is not None else None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        scope = self.settings.features
        # Declared first, before seconds of imports: a producer that wrote meanwhile would
        # have had the broker auto-create a topic with the wrong partition count.
        await declare_topics(self.settings.kafka, [self.events, self.erasures])

        # feast (through the store and the agents) costs seconds to import: only now.
        from loopmesh.features.agents import FeatureAgents
        from loopmesh.features.store import FeastGateway

        self._store = FeastGateway.open(scope)
        if scope.run_server:
            await self._serve(self._store)
        if scope.run_agents:
            names = [self.events.name, self.erasures.name]
            counts = await partition_counts(self.settings.kafka, names)
            if counts.get(self.events.name) != counts.get(self.erasures.name):
                raise RuntimeError(
                    f"{self.events.name} and {self.erasures.name} must have the same number "
                    f"of partitions (co-partitioned by entity id), found {counts}"
                )
            self.agents = FeatureAgents(
                self.settings, self._store, partitions=counts[self.events.name]
            )
            await self.agents.start()
            self._watch = asyncio.create_task(self._watch_agents(self.agents))
            log.info("agents consuming %s and %s", *names)

    async def _serve(self, store: FeastGateway) -> None:
        from loopmesh.features.server import METHOD_ROLES, SERVICE_NAME, FeatureServicer
        from loopmesh.gen.loopmesh.v1 import features_pb2_grpc

        scope = self.settings.features
        producer = EventProducer(self.settings.kafka, "features")
        self._producer = producer
        await producer.start()

        async def publish_erasure(event: EntityErased) -> None:
            # The topic is compacted by key: another kind's erasure of the same id must not
            # replace this one, so only entity_id erasures use the bare id.
            await producer.publish(self.erasures, event, key=erasure_key(event))

        plane = scope.dataplane
        listen = scope.server
        if plane.enabled:
            # Reached only through the data plane, on loopback: no TLS on this hop, but the
            # callers' tokens travel with each call and are checked here as on the port.
            listen = GrpcServerSettings(
                host="127.0.0.1",
                port=plane.backend_port,
                max_message_bytes=scope.server.max_message_bytes,
                grace_seconds=scope.server.grace_seconds,
                max_concurrent_rpcs=scope.server.max_concurrent_rpcs,
            )
        self.server = GrpcServer(
            "features", listen, auth=self.settings.auth, method_roles=METHOD_ROLES
        )
        features_pb2_grpc.add_FeatureServiceServicer_to_server(
            FeatureServicer(
                store,
                publish_erasure,
                max_entities=scope.max_entities,
                stale_after_s=scope.stale_after_s,
                entity_ids=EntityIdMapper(self.settings.privacy),
            ),
            self.server.server,
        )
        await self.server.start([SERVICE_NAME])
        if plane.enabled:
            from loopmesh.features.dataplane import FeaturesDataPlane

            self.dataplane = FeaturesDataPlane(self.settings, store)
            await self.dataplane.start(self.server.address)
            self._watch_plane = asyncio.create_task(self._watch_dataplane(self.dataplane))

    async def _watch_dataplane(self, dataplane: FeaturesDataPlane) -> None:
        await dataplane.crashed.wait()
        log.error("the features data plane stopped on its own")
        self.crashed.set()

    async def _watch_agents(self, agents: FeatureAgents) -> None:
        await agents.finished()
        log.error("the features fold stopped on its own")
        self.crashed.set()

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self.agents is not None:
            await self.agents.stop()
            self.agents = None
        if self._watch_plane is not None:
            self._watch_plane.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_plane
            self._watch_plane = None
        if self.dataplane is not None:
            # First: its proxied calls still need this process's server.
            await self.dataplane.stop()
            self.dataplane = None
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._store is not None:
            self._store.close()
            self._store = None
