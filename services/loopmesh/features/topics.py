"""Topic metadata the features service checks before it consumes."""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient

from loopmesh.mesh.bus import client_options
from loopmesh.mesh.settings import KafkaSettings


async def partition_counts(settings: KafkaSettings, topics: Sequence[str]) -> dict[str, int]:
    """Partitions of each existing topic (absent topics are left out)."""
    admin = AIOKafkaAdminClient(**client_options(settings, "features-admin"))
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if t["partitions"]}
