"""Learning curve under concept drift: the closed loop relearns a changed labelling rule.

One run starts a Kafka broker (or uses ``LOOPMESH_KAFKA__BOOTSTRAP_SERVERS``), and the joiner
(faust) and the whole trainer in this process: dataset consumer, triggers, PyTorch, gate, model
repository. A synthetic world (``loopmesh.devstack.synthetic``) sends traffic in rounds:
every request is scored by the newest published version (its ``model.onnx`` in onnxruntime, the
file Triton serves), predictions and feedback go through Kafka, and the live window of the
serving version comes back on ``metrics.live``. After ``rounds_before`` rounds the hidden
rule flips (concept drift). The baseline is a model trained offline, with the same code and
as many rows as the trainer's window, on the new rule only, scored on fresh new-rule data.

The check: in the last round, the live AUC of the newest version is within ``margin`` of the
offline model's AUC. The table shows each round's serving version and live figures.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer
from rich.console import Console
from rich.table import Table

from loopmesh.devstack.synthetic import (
    FEATURE_NAMES,
    SyntheticConfig,
    SyntheticWorld,
    examples,
    traffic,
)
from loopmesh.joiner.app import JoinerApp
from loopmesh.joiner.settings import JoinerScope, JoinerSettings, JoinerTopics
from loopmesh.mesh import model_repo, quality
from loopmesh.mesh.bus import EventProducer
from loopmesh.mesh.events import VersionMetrics
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.trainer.app import TrainerApp
from loopmesh.trainer.prepare import Standardisation
from loopmesh.trainer.settings import (
    DatasetSettings,
    TopicNames,
    TrainerScope,
    TrainerSettings,
    TrainingSettings,
    TriggerSettings,
)
from loopmesh.trainer.train import fit, load_scoring, predict

console = Console()
MODEL = "curve"


@dataclass(frozen=True)
class CurveConfig:
    seed: int = 21
    per_round: int = 400
    """Requests per round (and examples that trigger a run)."""
    rounds_before: int = 3
    """Rounds under the first rule."""
    rounds_after: int = 6
    """Rounds after the drift."""
    window_rows: int = 800
    """Newest examples a run trains on (also the offline baseline's training size)."""
    margin: float = 0.05
    """How close (AUC) the newest version's live figure must come to the offline model."""


@dataclass
class RoundResult:
    round: int
    rule: int
    serving_version: int
    live: VersionMetrics
    published: int
    rejected: int
    seconds: float


@dataclass
class CurveResult:
    config: CurveConfig
    rounds: list[RoundResult] = field(default_factory=list)
    offline_auc: float = 0.0
    offline_log_loss: float = 0.0
    oracle_auc: float = 0.0
    """AUC of the true probabilities: the ceiling."""
    newest_offline_auc: float = 0.0
    """The newest version scored on the same fresh new-rule data as the offline model."""

    @property
    def final(self) -> RoundResult:
        return self.rounds[-1]

    @property
    def gap(self) -> float:
        return self.offline_auc - (self.final.live.auc or 0.0)

    @property
    def recovered(self) -> bool:
        return self.gap <= self.config.margin

    @property
    def drop(self) -> float:
        """Live AUC lost in the first round after the drift."""
        before = self.rounds[self.config.rounds_before - 1].live.auc or 0.0
        after = self.rounds[self.config.rounds_before].live.auc or 0.0
        return before - after


def _joiner_settings(
    kafka: KafkaSettings, workdir: Path, config: CurveConfig, suffix: str
) -> JoinerSettings:
    topics = JoinerTopics(
        **{k: f"{v}.curve-{suffix}" for k, v in JoinerTopics().model_dump().items()}
    )
    return JoinerSettings(
        kafka=kafka,
        joiner=JoinerScope(
            app_id=f"curve-joiner-{suffix}",
            topics=topics,
            data_dir=workdir / "joiner",
            session_timeout_seconds=6,
            heartbeat_interval_seconds=1,
            metrics_publish_interval_seconds=0.2,
            # Just under one round of event time: the window holds exactly the last round.
            metrics_window_seconds=config.per_round - 0.5,
        ),
    )


def _settings(
    kafka: KafkaSettings, workdir: Path, config: CurveConfig, suffix: str
) -> TrainerSettings:
    topics = TopicNames(**{k: f"{v}.curve-{suffix}" for k, v in TopicNames().model_dump().items()})
    return TrainerSettings(
        kafka=kafka,
        model_repository=workdir / "models",
        trainer=TrainerScope(
            model_name=MODEL,
            data_dir=workdir / "trainer",
            topics=topics,
            dataset=DatasetSettings(
                flush_rows=200, flush_seconds=0.2, min_rows=200, window_rows=config.window_rows
            ),
            training=TrainingSettings(max_epochs=40, patience=5, seed=config.seed),
            triggers=TriggerSettings(
                min_new_examples=config.per_round,
                drift_detector="adwin",
                drift_min_examples=100,
                cooldown_seconds=0,
                check_interval_seconds=0.5,
            ),
        ),
    )


class MetricsTap:
    """Every VersionMetrics on the topic, newest last."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.seen: list[VersionMetrics] = []
        self._consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest"
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MetricsTap:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._consumer.stop()

    async def _run(self) -> None:
        async for record in self._consumer:
            self.seen.append(VersionMetrics.model_validate_json(record.value or b""))

    def latest(self, version: int) -> VersionMetrics | None:
        mine = [m for m in self.seen if m.model_name == MODEL and m.model_version == version]
        return mine[-1] if mine else None


async def _until(check: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise TimeoutError(f"condition not met within {timeout}s")


@asynccontextmanager
async def _running(
    settings: TrainerSettings, joining: JoinerSettings
) -> AsyncIterator[tuple[TrainerApp, JoinerApp]]:
    app, joiner = TrainerApp(settings), JoinerApp(joining)
    await joiner.start()
    await app.start()
    try:
        yield app, joiner
    finally:
        await app.stop()
        await joiner.stop()


async def run_curve(kafka: KafkaSettings, workdir: Path, config: CurveConfig) -> CurveResult:
    """Run the loop through the drift; returns every round's live figures and the baseline."""
    suffix = uuid.uuid4().hex[:8]
    settings = _settings(kafka, workdir, config, suffix)
    joining = _joiner_settings(kafka, workdir, config, suffix)
    topics, joins = settings.trainer.topics, joining.joiner.topics
    world = SyntheticWorld(SyntheticConfig(seed=config.seed))
    result = CurveResult(config)
    producer = EventProducer(kafka, "bench")
    await producer.start()
    try:
        async with (
            _running(settings, joining) as (app, joiner_app),
            MetricsTap(kafka, joins.metrics) as tap,
        ):
            core, sink, joiner = app.core, app.sink, joiner_app.joiner
            assert core is not None and sink is not None
            repo = settings.model_repository
            # Cold start: a labelled history under the first rule (as if from before the loop).
            seed = world.sample(config.window_rows)
            history = examples(seed, world.draw_labels(seed), model_name=MODEL, start=_t0())
            await producer.publish_many(topics.topic("examples"), history)
            await _until(lambda: model_repo.list_versions(repo, MODEL))
            await core.wait_idle()
            clock = _t0() + timedelta(hours=1)
            scorers: dict[int, Any] = {}
            for number in range(1, config.rounds_before + config.rounds_after + 1):
                started = time.monotonic()
                if number == config.rounds_before + 1:
                    world.set_rule(1)  # concept drift
                serving = model_repo.list_versions(repo, MODEL)[-1]
                if serving not in scorers:
                    scorers[serving] = _scorer(repo, serving)
                batch = world.sample(config.per_round)
                labels = world.draw_labels(batch)
                pairs = traffic(
                    batch,
                    labels,
                    model_name=MODEL,
                    model_version=serving,
                    scores=scorers[serving](batch.features).tolist(),
                    start=clock,
                    spacing=timedelta(seconds=1),
                    feedback_delay=timedelta(seconds=10),
                )
                clock += timedelta(seconds=config.per_round)
                await producer.publish_many(joins.topic("predictions"), [p for p, _ in pairs])
                await producer.publish_many(joins.topic("feedback"), [f for _, f in pairs])
                expected = len(history) + number * config.per_round
                await _until(lambda: sink.stored >= expected)  # noqa: B023
                # Once the joiner's window has the whole round, wait for it on metrics.live.
                await _until(lambda: joiner.live.added >= number * config.per_round)  # noqa: B023
                want = joiner.live.snapshot(MODEL, serving)
                live = await _until(
                    lambda: (
                        (m := tap.latest(serving)) is not None  # noqa: B023
                        and (m.count, m.auc) == (want.count, want.auc)  # noqa: B023
                        and m
                    )
                )
                await core.wait_idle()
                runs = core.runs()
                result.rounds.append(
                    RoundResult(
                        round=number,
                        rule=world.rule,
                        serving_version=serving,
                        live=live,
                        published=sum(r.status == "published" for r in runs),
                        rejected=sum(r.status == "rejected" for r in runs),
                        seconds=time.monotonic() - started,
                    )
                )
            _baseline(result, world, settings, config, model_repo.list_versions(repo, MODEL)[-1])
    finally:
        await producer.stop()
    return result


def _baseline(
    result: CurveResult,
    world: SyntheticWorld,
    settings: TrainerSettings,
    config: CurveConfig,
    newest: int,
) -> None:
    """Train offline on the new rule only (same code, same row count), score on fresh rows."""
    rng = np.random.default_rng(config.seed + 1)
    train = world.sample(config.window_rows, rng)
    y = world.draw_labels(train, rng).astype(np.float64)
    test = world.sample(5000, rng)
    y_test = world.draw_labels(test, rng).astype(np.float64)
    n_fit = int(len(train) * (1 - settings.trainer.training.validation_fraction))
    standardisation = Standardisation.fit(
        train.features[:n_fit], FEATURE_NAMES, clip_quantile=settings.trainer.dataset.clip_quantile
    )
    offline = fit(
        train.features[:n_fit],
        y[:n_fit],
        train.features[n_fit:],
        y[n_fit:],
        standardisation,
        settings.trainer.training,
    )
    scores = quality.score(y_test, predict(offline.module, test.features))
    result.offline_auc = scores.auc or 0.0
    result.offline_log_loss = scores.log_loss or 0.0
    result.oracle_auc = quality.roc_auc(y_test, test.p_true) or 0.0
    probs = _scorer(settings.model_repository, newest)(test.features)
    result.newest_offline_auc = quality.roc_auc(y_test, probs) or 0.0


def _scorer(repo: Path, version: int) -> Any:
    """Probabilities of a published version for rows in ``FEATURE_NAMES`` order."""
    # A version takes its inputs in its own metadata order (the trainer sorts names).
    names = model_repo.read_metadata(repo, MODEL, version)["feature_names"]
    columns = [FEATURE_NAMES.index(n) for n in names]
    module = load_scoring(model_repo.version_dir(repo, MODEL, version) / model_repo.MODEL_FILE)
    return lambda x: predict(module, x[:, columns])


def _t0() -> datetime:
    return datetime.now(UTC) - timedelta(days=1)


def report(result: CurveResult) -> None:
    table = Table(title="learning curve under concept drift (live window of the serving version)")
    for column in (
        "round",
        "rule",
        "serving v",
        "live n",
        "live AUC",
        "live log-loss",
        "runs ok/rej",
        "s",
    ):
        table.add_column(column, justify="right")
    for r in result.rounds:
        marker = " <- drift" if r.round == result.config.rounds_before + 1 else ""
        table.add_row(
            f"{r.round}{marker}",
            str(r.rule),
            str(r.serving_version),
            str(r.live.count),
            f"{r.live.auc:.3f}" if r.live.auc is not None else "-",
            f"{r.live.log_loss:.3f}" if r.live.log_loss is not None else "-",
            f"{r.published}/{r.rejected}",
            f"{r.seconds:.1f}",
        )
    console.print(table)
    summary = Table(
        title="after the drift: newest version vs a model trained offline on the new rule"
    )
    summary.add_column("figure")
    summary.add_column("value", justify="right")
    summary.add_row("live AUC drop in the first round after the drift", f"{result.drop:.3f}")
    summary.add_row("newest version, live AUC (last round)", f"{result.final.live.auc or 0:.3f}")
    summary.add_row(
        "newest version, AUC on 5000 fresh new-rule rows", f"{result.newest_offline_auc:.3f}"
    )
    summary.add_row(
        f"offline model ({result.config.window_rows} new-rule rows), AUC",
        f"{result.offline_auc:.3f}",
    )
    summary.add_row("true probabilities (ceiling), AUC", f"{result.oracle_auc:.3f}")
    summary.add_row("gap offline - live", f"{result.gap:+.3f} (margin {result.config.margin})")
    summary.add_row("recovered", "[green]yes" if result.recovered else "[red]no")
    console.print(summary)


def main() -> None:
    # A fresh broker makes the clients log transient coordinator errors while it settles.
    for name in ("aiokafka", "faust", "mode"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    config = CurveConfig()
    with tempfile.TemporaryDirectory(prefix="loopmesh-curve-") as tmp:
        bootstrap = os.environ.get("LOOPMESH_KAFKA__BOOTSTRAP_SERVERS")
        broker = None
        if not bootstrap:
            from loopmesh.devstack.kafka import KafkaBroker

            broker = KafkaBroker(Path(tmp) / "kafka")
            broker.start()
            bootstrap = broker.bootstrap_servers
        try:
            kafka = KafkaSettings(bootstrap_servers=bootstrap, default_partitions=2)
            result = asyncio.run(run_curve(kafka, Path(tmp), config))
        finally:
            if broker is not None:
                broker.stop()
    report(result)
    if not result.recovered:
        raise SystemExit(f"live AUC did not recover within {config.margin} of the offline model")


if __name__ == "__main__":
    main()
