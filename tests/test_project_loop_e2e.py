"""Bring your own model, the whole loop (issue 18): a project outside the package with its own
spec, its own torch module and a regression task trains, publishes, canaries, promotes, and
rolls back a broken candidate, on the real broker and tritonserver.

``tests/projects/regress`` is the user's project: Feast definitions, ``models/minutes.yaml``
(regression on two numeric context fields and a ``platform`` vocabulary, target from feedback
``value``) and ``models/regress_models.py`` (its factory: an ``nn.Embedding`` for the platform).
Every deployable gets it as ``MeshSettings.project``: the gateway, the feedback door, the
joiner (its label rule), the trainer (model ``minutes``) and the rollout controller, in this
process.

The app is ``loopmesh.client``: Predict with context and categorical inputs, then Feedback with
the minutes a hidden rule says. The bootstrap set goes through the trainer's public door,
``TrainerService.AddExamples`` (as ``loopmesh run`` seeds its own). It is an hour old and its
world watched ``SHIFT`` minutes less, so version 1 (trained on it) is measurably worse live,
and version 2, trained from the joined live feedback alone (the dataset's window), earns its
canary. The broken candidate is version 2 with its answer negated, published the way the
trainer publishes (``publish_files`` + ``ModelPublished``): the gate would never let it
through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from loopmesh.client import AsyncClient, ClientConfig, Feedback, Prediction
from loopmesh.devstack.triton import TritonServer
from loopmesh.feedback.server import feedback_server
from loopmesh.gen.loopmesh.v1 import trainer_pb2, trainer_pb2_grpc
from loopmesh.inference.app import InferenceGateway
from loopmesh.joiner.app import JoinerApp
from loopmesh.mesh import model_repo
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.events import ModelPublished, RolloutChanged
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.rollout.app import RolloutApp
from loopmesh.trainer.app import TrainerApp
from loopmesh.trainer.export import export_module, load_weights
from loopmesh.trainer.pipeline import publish_files
from loopmesh.trainer.prepare import Standardisation
from loopmesh.trainer.runs import RunRecord
from loopmesh.trainer.scoring import ScoringModule
from loopmesh.trainer.settings import DatasetSettings, TriggerSettings
from tests.helpers import eventually
from tests.support.mesh import MeshBuilder
from tests.test_rollout_support import ChangeLog, unload_models

pytestmark = pytest.mark.e2e  # assembles the mesh: several services on real parts

PROJECT = Path(__file__).parent / "projects" / "regress"
MODEL = "minutes"
RETRAIN = 600
"""Examples that start a run: the bootstrap set, then as many joined live pairs."""
ROUND = 40
"""Predictions (and their feedback) sent between two looks at the rollout."""
EFFECT = {"web": 0.0, "ios": 5.0, "android": -4.0}
SHIFT = 3.0
"""Minutes the live world watches beyond the bootstrap's."""
DEADLINE = 150.0
T = TypeVar("T")


def rule(tenure: float, depth: float, platform: str, shift: float = SHIFT) -> float:
    """The hidden truth: minutes watched, before noise."""
    return 12.0 + 3.0 * tenure - 2.0 * depth + EFFECT[platform] + shift


def draw(rng: np.random.Generator) -> tuple[dict[str, float], str]:
    context = {"tenure": float(rng.uniform(0, 3)), "depth": float(rng.uniform(0, 4))}
    return context, str(rng.choice(list(EFFECT)))


def bootstrap(n: int, rng: np.random.Generator) -> trainer_pb2.AddExamplesRequest:
    """An hour-old labelled history of the world before the shift, for the trainer's door."""
    start = datetime.now(UTC) - timedelta(hours=1)
    request = trainer_pb2.AddExamplesRequest(model_name=MODEL)
    for i in range(n):
        context, platform = draw(rng)
        example = request.examples.add(
            example_id=f"boot-{i}",
            entity_id=f"viewer-{i % 200}",
            features=context,
            categorical={"platform": platform},
            target=rule(**context, platform=platform, shift=0.0) + rng.normal(0, 0.5),
        )
        example.event_time.FromDatetime(start + timedelta(milliseconds=100 * i))
    return request


class Negated(nn.Module):
    """A version gone wrong: the trained module's answer with its sign flipped."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.inner(x)  # type: ignore[no-any-return]


@dataclass
class Loop:
    client: AsyncClient
    gateway: InferenceGateway
    trainer: TrainerApp
    changes: ChangeLog
    producer: EventProducer
    build: MeshBuilder
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(11))
    sent: int = 0
    answered: list[tuple[Prediction, float]] = field(default_factory=list)
    """Every answer so far, with the rule's value for it."""

    async def traffic(self, n: int) -> list[tuple[Prediction, float]]:
        """``n`` Predict calls as an app makes them, then the feedback the rule gives each."""
        asked = [(f"viewer-{(self.sent + i) % 200}", *draw(self.rng)) for i in range(n)]
        self.sent += n
        answers: list[Prediction] = []
        for chunk in range(0, n, 16):
            answers += await asyncio.gather(
                *(
                    self.client.predict(viewer, context=context, categorical={"platform": platform})
                    for viewer, context, platform in asked[chunk : chunk + 16]
                )
            )
        truths = [rule(**context, platform=platform) for _, context, platform in asked]
        result = await self.client.submit_many(
            Feedback(a.prediction_id, value=t + float(self.rng.normal(0, 0.5)))
            for a, t in zip(answers, truths, strict=True)
        )
        assert result.accepted == n, result
        pairs = list(zip(answers, truths, strict=True))
        self.answered += pairs
        return pairs

    def arms(self, version: int) -> list[tuple[str, float]]:
        """(arm, error) of every answer ``version`` gave."""
        return [(p.arm, p.score - t) for p, t in self.answered if p.model_version == version]

    def seen(self, state: str, **fields: int) -> RolloutChanged | None:
        for event in self.changes.events:
            if event.state == state and all(getattr(event, k) == v for k, v in fields.items()):
                return event
        return None

    async def wait(self, state: str, **fields: int) -> RolloutChanged:
        event = await eventually(lambda: _ready(self.seen(state, **fields)), timeout=DEADLINE)
        assert event is not None
        return event

    async def routed(self, state: str, **fields: int) -> None:
        """Until the gateway routes by that state (it follows ``rollouts`` on its own): its
        table, and the data plane's, which answers Predict and gets the table pushed after."""

        async def follows() -> bool:
            route = self.gateway.routes.get(MODEL)
            if not (
                route is not None
                and route.state == state
                and all(getattr(route, k) == v for k, v in fields.items())
            ):
                return False
            plane = (await self.gateway.dataplane.routes_in_force())["routes"].get(MODEL, {})
            return (plane.get("stable"), plane.get("canary")) == (
                route.stable_version,
                route.canary_version,
            )

        await eventually(follows, timeout=DEADLINE)

    async def drive(self, state: str, most: int, **fields: int) -> RolloutChanged:
        """Rounds of traffic until the rollout reaches ``state`` (each round, a short poll)."""
        for _ in range(most // ROUND):
            await self.traffic(ROUND)
            with contextlib.suppress(AssertionError):
                found = await eventually(lambda: _ready(self.seen(state, **fields)), timeout=5)
                assert found is not None
                return found
        raise AssertionError(f"no {state} {fields} after {most} predictions: {self.changes.events}")


def publish_broken(trainer: TrainerApp, repository: Path, good: int) -> ModelPublished:
    """Version ``good`` negated, written and announced as the trainer writes and announces."""
    meta = model_repo.read_metadata(repository, MODEL, good)
    vdir = model_repo.version_dir(repository, MODEL, good)
    standardisation = Standardisation.from_metadata(meta["standardisation"])
    plan = trainer.plan
    scoring = ScoringModule(
        plan.build(len(standardisation.feature_names), trainer.scope.training.hidden),
        standardisation,
        task="regression",
        cardinalities=plan.cardinalities,
    )
    scoring.load_state_dict(load_weights(vdir / model_repo.WEIGHTS_FILE, meta["weights_sha256"]))
    rows = np.column_stack([np.random.default_rng(0).uniform(0, 3, (64, 2)), np.ones(64)])
    payload = export_module(Negated(scoring), rows)
    update = {"parent_version": good, "run_id": "broken-by-the-test"}
    version, stored = publish_files(repository, MODEL, payload, {**meta, **update})
    return ModelPublished(
        model_name=MODEL,
        model_version=version,
        parent_version=good,
        sha256=stored["sha256"],
        feature_names=stored["feature_names"],
    )


@contextlib.asynccontextmanager
async def mesh(
    kafka: KafkaSettings, triton: TritonServer, repository: Path, work: Path
) -> AsyncIterator[Loop]:
    build = MeshBuilder(
        kafka, work, model_repository=repository, triton_url=triton.grpc_url, project=PROJECT
    )
    trainer = TrainerApp(
        build.trainer(
            MODEL,
            # Runs see the last 15 minutes of examples: version 2 learns the live world only.
            dataset=DatasetSettings(
                flush_rows=100, flush_seconds=0.2, min_rows=200, window_seconds=900
            ),
            # Only the example count retrains: v1 on the bootstrap, v2 on the live pairs (the
            # canaries after it take fewer than RETRAIN, so no third run competes).
            triggers=TriggerSettings(
                min_new_examples=RETRAIN,
                drift_detector=None,
                cooldown_seconds=0,
                check_interval_seconds=0.3,
            ),
        )
    )
    # The policy is the spec's own (its rollout section: one quick canary step at 50%).
    rollout = RolloutApp(build.rollout(load_timeout_seconds=180.0))
    joiner = JoinerApp(build.joiner(store="memory://", metrics_publish_interval_seconds=0.3))
    gateway = InferenceGateway(
        build.inference(default_model=MODEL, metrics_topic=build.joiner_topics.metrics)
    )
    door = feedback_server(build.feedback())
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(unload_models, triton.grpc_url, [MODEL])
        await build.declare()
        parts = (joiner, trainer, rollout, gateway, door)
        # The stream apps each wait for a group rebalance: start everything at once.
        await asyncio.gather(*(part.start() for part in parts))
        for part in parts:
            stack.push_async_callback(part.stop)
        producer = EventProducer(kafka, "project-loop")
        await producer.start()
        stack.push_async_callback(producer.stop)
        changes = await stack.enter_async_context(ChangeLog(kafka, build.rollout_topics.rollouts))
        config = ClientConfig(
            inference_url=gateway.address,
            feedback_url=door.address,
            deadline_s=30.0,
            tracing=False,
        )
        client = await stack.enter_async_context(AsyncClient(config))
        yield Loop(client, gateway, trainer, changes, producer, build)


async def test_a_projects_regression_model_trains_canaries_promotes_and_rolls_back(
    kafka_settings: KafkaSettings, triton: TritonServer, model_repository: Path, tmp_path: Path
) -> None:
    async with mesh(kafka_settings, triton, model_repository, tmp_path) as loop:
        # -- v1 from the bootstrap set: trained by the trigger, published, stable -----------
        async with grpc.aio.insecure_channel(loop.trainer.address) as channel:
            door = trainer_pb2_grpc.TrainerServiceStub(channel)
            added = await door.AddExamples(bootstrap(RETRAIN, loop.rng), timeout=60)
        assert added.accepted == RETRAIN
        await loop.wait("stable", stable_version=1)
        await loop.routed("stable", stable_version=1)
        meta = model_repo.read_metadata(model_repository, MODEL, 1)
        assert meta["task"] == "regression" and meta["feature_names"] == ["tenure", "depth"]
        assert [f["name"] for f in meta["categorical"]] == ["platform"]

        # -- live traffic on v1; its joined feedback retrains: v2 ---------------------------
        served = await loop.traffic(RETRAIN)
        assert {(p.task, p.model_version, p.arm) for p, _ in served} == {
            ("regression", 1, "stable")
        }
        v1_error = np.mean([abs(p.score - truth) for p, truth in served])
        await loop.wait("candidate", canary_version=2, stable_version=1)
        core = loop.trainer.core
        assert core is not None
        run = await eventually(lambda: _ready(_run_of(core.last_run(), 2)), timeout=DEADLINE)
        assert run is not None and run.status == "published", run
        assert run.data_from is not None and run.data_from > datetime.now(UTC) - timedelta(
            minutes=15
        ), "v2 learnt from the live joined feedback, not the bootstrap set"

        # -- v2 canaried on live loss (the spec's policy: 50%), promoted --------------------
        canary = await loop.wait("canary", canary_version=2)
        assert canary.canary_weight == 0.5
        await loop.drive("stable", 400, stable_version=2)
        as_canary = [arm for arm, _ in loop.arms(2) if arm == "canary"]
        assert len(as_canary) >= 40, "v2 earned its promotion as a canary on live traffic"

        # -- a broken v3: canaried, rolled back on its live loss; v2 keeps serving ----------
        broken = publish_broken(loop.trainer, model_repository, 2)
        published = loop.build.trainer_topics.topic("published")
        await loop.producer.publish(published, broken)
        await loop.wait("canary", canary_version=broken.model_version)
        rolled = await loop.drive("rolled_back", 400, canary_version=broken.model_version)
        assert "loss" in rolled.reason and rolled.stable_version == 2, rolled
        await loop.routed("rolled_back", stable_version=2)
        garbage = loop.arms(broken.model_version)
        assert {arm for arm, _ in garbage} == {"canary"}, garbage
        assert np.mean([err for _, err in garbage]) < -15.0, "v3 answered the minutes negated"

        after = await loop.traffic(ROUND)
        assert {(p.task, p.model_version, p.arm) for p, _ in after} == {("regression", 2, "stable")}
        v2_error = np.mean([abs(p.score - truth) for p, truth in after])
        assert v2_error < 1.0 < SHIFT - 1.0 < v1_error, (v1_error, v2_error)


def _run_of(record: RunRecord | None, version: int) -> RunRecord | None:
    return record if record is not None and record.version == version else None


async def _ready(value: T) -> T:
    return value
