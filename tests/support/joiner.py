"""A joiner next to a test's trainer: the same topic suffix, a short session for fast joins."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from loopmesh.joiner.app import JoinerApp
from loopmesh.joiner.settings import JoinerScope, JoinerSettings, JoinerTopics
from loopmesh.mesh.settings import GrpcServerSettings, KafkaSettings


def joiner_topics(suffix: str) -> JoinerTopics:
    """The joiner's topics renamed as the tests rename the trainer's (``<name>.<suffix>``)."""
    return JoinerTopics(**{k: f"{v}.{suffix}" for k, v in JoinerTopics().model_dump().items()})


def joiner_settings(
    kafka: KafkaSettings, topics: JoinerTopics, data_dir: Path, app_id: str, **scope: Any
) -> JoinerSettings:
    fast = {"session_timeout_seconds": 6, "heartbeat_interval_seconds": 1} | scope
    return JoinerSettings(
        kafka=kafka,
        joiner=JoinerScope(
            app_id=app_id,
            topics=topics,
            data_dir=data_dir,
            server=GrpcServerSettings(port=0),
            **fast,
        ),
    )


@contextlib.asynccontextmanager
async def running_joiner(settings: JoinerSettings) -> AsyncIterator[JoinerApp]:
    app = JoinerApp(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()
