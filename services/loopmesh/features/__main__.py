"""``python -m loopmesh.features``: FeatureService and the stream agents until SIGINT/SIGTERM.

Both run in one process by default; ``LOOPMESH_FEATURES__RUN_SERVER`` and
``LOOPMESH_FEATURES__RUN_AGENTS`` split them so readers and writers scale apart. A crashed
faust app ends the process with status 1, for the supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from dataclasses import replace

from loopmesh.features.settings import FeaturesSettings
from loopmesh.mesh.bus import EventProducer, declare_topics
from loopmesh.mesh.events import EntityErased
from loopmesh.mesh.privacy import EntityIdMapper
from loopmesh.mesh.rpc import GrpcServer, install_signal_handlers
from loopmesh.mesh.telemetry import setup_telemetry
from loopmesh.mesh.topics import ENTITIES_ERASED, EVENTS_RAW

log = logging.getLogger("loopmesh.features")


async def run(settings: FeaturesSettings) -> int:
    scope = settings.features
    events = replace(EVENTS_RAW, name=scope.events_topic)
    erasures = replace(ENTITIES_ERASED, name=scope.erasures_topic)
    # Declared first, before seconds of imports: a producer that wrote meanwhile would
    # have had the broker auto-create a topic with the wrong partition count.
    await declare_topics(settings.kafka, [events, erasures])

    from loopmesh.features.agents import FeatureAgents
    from loopmesh.features.server import METHOD_ROLES, SERVICE_NAME, FeatureServicer
    from loopmesh.features.store import FeastGateway
    from loopmesh.features.topics import partition_counts
    from loopmesh.gen.loopmesh.v1 import features_pb2_grpc

    store = FeastGateway.open(scope)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    producer: EventProducer | None = None
    server: GrpcServer | None = None
    agents: FeatureAgents | None = None
    try:
        if scope.run_server:
            producer = EventProducer(settings.kafka, "features")
            await producer.start()
            publisher = producer

            async def publish_erasure(event: EntityErased) -> None:
                await publisher.publish(erasures, event)

            server = GrpcServer(
                "features", scope.server, auth=settings.auth, method_roles=METHOD_ROLES
            )
            features_pb2_grpc.add_FeatureServiceServicer_to_server(
                FeatureServicer(
                    store,
                    publish_erasure,
                    max_entities=scope.max_entities,
                    stale_after_s=scope.stale_after_s,
                    entity_ids=EntityIdMapper(settings.privacy),
                ),
                server.server,
            )
            await server.start([SERVICE_NAME])
        if scope.run_agents:
            counts = await partition_counts(settings.kafka, [events.name, erasures.name])
            if counts.get(events.name) != counts.get(erasures.name):
                raise RuntimeError(
                    f"{events.name} and {erasures.name} must have the same number of "
                    f"partitions (co-partitioned by entity id), found {counts}"
                )
            agents = FeatureAgents(settings, store, partitions=counts[events.name])
            await agents.start()
            log.info("agents consuming %s and %s", events.name, erasures.name)
        while not stop.is_set():
            if agents is not None and agents.crashed:
                log.error("the faust app crashed; exiting for a restart")
                return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
        return 0
    finally:
        if agents is not None:
            await agents.stop()
        if server is not None:
            await server.stop()
        if producer is not None:
            await producer.stop()
        store.close()


def main() -> int:
    # feast imports torch when installed, only for OnlineResponse.to_tensor, which this
    # service never calls: blocking it saves seconds of start-up and hundreds of MB.
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    settings = FeaturesSettings()
    setup_telemetry("features", settings.telemetry)
    # faust and mode narrate every rebalance at INFO, feast every registry refresh; their
    # warnings are what matters.
    for noisy in ("faust", "mode", "aiokafka", "feast"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(run(settings))


if __name__ == "__main__":
    raise SystemExit(main())
