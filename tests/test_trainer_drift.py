"""Issue 22, drift detection: ADWIN (or Page-Hinkley) from River over the stable version's
per-example loss; a detection starts one run, reports its delay, and narrows the training
window to the examples after the estimated change point.

Unit tier: the detectors on loss streams with an abrupt change at a known position (a fixed
model's Bernoulli hits, and River's SEA concept drift) and on stationary streams of the same
length. Without a broker: the core on real parquet files and real torch. On the session's
Kafka: joined examples whose labelling rule flips, flowing into the trainer service.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
from river.datasets import synth

from loopmesh.devstack.synthetic import SyntheticConfig, SyntheticWorld
from loopmesh.gen.loopmesh.v1 import trainer_pb2, trainer_pb2_grpc
from loopmesh.mesh import model_repo, quality
from loopmesh.mesh.events import LabelledExample, ModelPublished, RolloutChanged
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.trainer.app import TrainerApp
from loopmesh.trainer.core import TrainerCore
from loopmesh.trainer.dataset import Dataset
from loopmesh.trainer.pipeline import run_pipeline
from loopmesh.trainer.settings import (
    DatasetSettings,
    TrainerScope,
    TrainingSettings,
    TriggerSettings,
)
from loopmesh.trainer.train import fit
from loopmesh.trainer.triggers import (
    DriftReport,
    LossDriftDetector,
    TriggerInputs,
    TriggerPolicy,
    change_point,
    example_losses,
)
from tests.helpers import eventually
from tests.support.mesh import MeshBuilder

T0 = datetime(2025, 6, 1, 12, tzinfo=UTC)
FAST = TrainingSettings(max_epochs=15, patience=3)
SEEDS = range(5)


def _binary(
    i: int, *, target: float, score: float, version: int = 1, model: str = "m"
) -> LabelledExample:
    at = T0 + timedelta(seconds=i)
    return LabelledExample(
        prediction_id=f"p{i}-{uuid.uuid4().hex[:6]}",
        entity_id=f"e{i % 50}",
        model_name=model,
        model_version=version,
        features={"x": float(i % 7)},
        target=target,
        score=score,
        predicted_at=at,
        feedback_at=at,
    )


def hits(
    seed: int, n: int, change: int | None, before: float, after: float
) -> list[LabelledExample]:
    """A fixed binary model saying 0.85 for the class it predicts, right with probability
    ``before`` until example ``change`` and ``after`` from it on; one example a second."""
    rng = np.random.default_rng(seed)
    rate = np.where(np.arange(n) < (n if change is None else change), before, after)
    right = rng.random(n) < rate
    labels = rng.integers(0, 2, n)
    out = []
    for i in range(n):
        says_one = bool(labels[i]) == bool(right[i])
        out.append(_binary(i, target=float(labels[i]), score=0.85 if says_one else 0.15))
    return out


def feed(
    detector: LossDriftDetector, examples: Sequence[LabelledExample]
) -> list[tuple[int, DriftReport]]:
    """(index of the detecting example, report) of every detection."""
    found = []
    for i, (example, loss) in enumerate(zip(examples, example_losses(examples), strict=True)):
        assert loss is not None
        report = detector.observe(loss, example.predicted_at.timestamp())
        if report is not None:
            found.append((i, report))
    return found


def index_of(at: datetime) -> int:
    return round((at - T0).total_seconds())


# -- the detectors (unit) --------------------------------------------------------------------


def test_the_loss_of_each_example_is_the_joiners() -> None:
    """The losses the detector sees are ``quality.per_example_loss`` of the served answers,
    for every task; an example without a loss of its task is skipped."""
    binary = [_binary(0, target=1.0, score=0.8), _binary(1, target=0.0, score=0.8)]
    regression = _binary(2, target=3.0, score=1.5).model_copy(update={"task": "regression"})
    multi = _binary(3, target=2.0, score=0.5).model_copy(
        update={"task": "multiclass", "outputs": [0.2, 0.3, 0.5]}
    )
    unknown_class = multi.model_copy(update={"target": 5.0})
    not_binary = _binary(4, target=0.5, score=0.5)
    losses = example_losses([*binary, regression, multi, unknown_class, not_binary])
    expected = [
        *quality.per_example_loss("binary", [1.0, 0.0], [0.8, 0.8]),
        *quality.per_example_loss("regression", [3.0], [1.5]),
        *quality.per_example_loss("multiclass", [2.0], [[0.2, 0.3, 0.5]]),
    ]
    assert losses[:4] == pytest.approx(expected)
    assert losses[4:] == [None, None]


@pytest.mark.parametrize("kind", ["adwin", "page_hinkley"])
def test_an_abrupt_change_of_the_loss_is_found_near_where_it_happened(kind: str) -> None:
    """Hit rate 0.9 -> 0.6 at example 2000 of 4000: detected after it, the change point
    within a few dozen examples of 2000, the delay reported in examples and seconds; the
    same streams without the change raise nothing."""
    settings = TriggerSettings(drift_detector=kind)  # type: ignore[arg-type]
    delays = []
    for seed in SEEDS:
        detector = LossDriftDetector(settings, version=1)
        found = feed(detector, hits(seed, 4000, 2000, 0.9, 0.6))
        assert found, f"seed {seed}: no detection"
        at, report = found[0]
        change = index_of(report.change_at)
        assert at >= 2000 and abs(change - 2000) <= 40, (seed, at, change)
        assert report.detector == kind and report.model_version == 1
        assert index_of(report.detected_at) == at
        assert report.delay_examples == at - change + 1
        assert report.delay_seconds == pytest.approx(at - change)  # one example a second
        assert report.loss_after > report.loss_before
        assert at - 2000 < 300  # the true delay
        delays.append((report.delay_examples, report.delay_seconds, at + 1 - 2000))
        quiet = LossDriftDetector(settings, version=1)
        assert feed(quiet, hits(seed, 4000, None, 0.9, 0.9)) == [], f"seed {seed}: false alarm"
    print(f"{kind} delays (estimated examples, seconds, true examples): {delays}")


def sea_losses(seed: int, n: int, drift: bool) -> list[float]:
    """Log loss of a fixed model of SEA's first concept (x1 + x2 > 8, said with 0.9) on
    River's ConceptDriftStream that switches to the fourth concept (threshold 9.5) at 3000
    (width 20, River's narrowest that does not overflow: abrupt)."""
    stream = synth.ConceptDriftStream(
        stream=synth.SEA(seed=seed, variant=0, noise=0.05),
        drift_stream=synth.SEA(seed=seed + 1, variant=3 if drift else 0, noise=0.05),
        position=3000,
        width=20,
        seed=seed,
    )
    losses = []
    for x, y in stream.take(n):
        p = 0.9 if x[0] + x[1] > 8 else 0.1
        losses.append(-math.log(p if y else 1 - p))
    return losses


def test_adwin_finds_the_concept_drift_of_rivers_sea_stream() -> None:
    settings = TriggerSettings(drift_detector="adwin")
    for seed in SEEDS:
        detector = LossDriftDetector(settings, version=3)
        reports = [
            (i, r)
            for i, loss in enumerate(sea_losses(seed, 6000, drift=True))
            if (r := detector.observe(loss, 1000.0 + i)) is not None
        ]
        assert reports, f"seed {seed}"
        at, report = reports[0]
        change = report.change_at.timestamp() - 1000.0
        assert 3000 <= at < 3300 and abs(change - 3000) <= 64, (seed, at, change)
        quiet = LossDriftDetector(settings, version=3)
        stationary = sea_losses(seed, 6000, drift=False)
        assert all(quiet.observe(loss, float(i)) is None for i, loss in enumerate(stationary))


def test_the_detector_waits_for_its_minimum_and_restarts_after_a_detection() -> None:
    settings = TriggerSettings(drift_detector="adwin", drift_min_examples=500)
    detector = LossDriftDetector(settings, version=1)
    # A change at 100 is in the grace period: it cannot fire before 500 examples.
    found = feed(detector, hits(0, 1500, 100, 0.95, 0.5))
    assert found and found[0][0] >= 499
    assert detector.last is found[-1][1]
    # Restarted: it counts from the detection on.
    assert detector.seen == 1499 - found[-1][0]
    assert change_point([1.0] * 50) is None  # no upward shift in a flat stream
    assert change_point([0.0] * 20 + [1.0] * 20) == 20


def test_the_policy_fires_with_the_drift_reason_when_a_detection_waits() -> None:
    report = DriftReport(
        detector="page_hinkley",
        model_version=4,
        change_at=T0,
        detected_at=T0 + timedelta(seconds=90),
        delay_examples=90,
        delay_seconds=90.0,
        examples_seen=2500,
        loss_before=0.25,
        loss_after=0.6,
    )
    policy = TriggerPolicy(TriggerSettings(min_new_examples=None), min_rows=10)
    none = TriggerInputs(0, 100, None, None, None)
    assert policy.due(none) == []
    [reason] = policy.due(TriggerInputs(0, 100, report, None, None))
    assert reason.startswith("drift (page_hinkley over per-example loss of version 4)")
    assert "change at 2025-06-01T12:00:00+00:00" in reason
    assert "90 examples / 90.0s later" in reason


def test_a_detection_is_counted_and_its_delay_recorded_for_prometheus() -> None:
    """The names Prometheus scrapes (OTel's conversion, through the real reader)."""
    script = """
from datetime import datetime, UTC
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import REGISTRY, generate_latest
metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
from loopmesh.trainer import instruments
from loopmesh.trainer.triggers import DriftReport
t = datetime(2025, 1, 1, tzinfo=UTC)
report = DriftReport(detector="adwin", model_version=1, change_at=t, detected_at=t,
    delay_examples=70, delay_seconds=42.0, examples_seen=900, loss_before=0.2, loss_after=0.5)
instruments.record_drift("m", report)
print(generate_latest(REGISTRY).decode())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    samples = {}
    for line in out.splitlines():
        if line.startswith("loopmesh_trainer_drift") and 'model="m"' in line:
            name = line.split("{")[0]
            samples[name] = samples.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    assert samples["loopmesh_trainer_drift_detections_total"] == 1.0
    assert samples["loopmesh_trainer_drift_detection_delay_seconds_sum"] == 42.0
    assert samples["loopmesh_trainer_drift_detection_delay_seconds_count"] == 1.0
    assert samples["loopmesh_trainer_drift_detection_delay_examples_sum"] == 70.0


# -- the window after a drift (real parquet files) -------------------------------------------


def test_a_since_bound_keeps_what_came_after_the_change_and_at_least_min_rows(
    tmp_path: Path,
) -> None:
    ds = Dataset(tmp_path / "data")
    day = 86400
    # Three days, 300 examples a day (one every 288 s), two flushes a day.
    rows = [_binary(i * 288, target=float(i % 2), score=0.5) for i in range(900)]
    for start in range(0, 900, 150):
        ds.append(rows[start : start + 150])
    stamps = np.array([r.predicted_at.timestamp() for r in rows])
    change = T0.timestamp() + 2 * day + 3600  # an hour into the third day
    after = int((stamps >= change).sum())
    frame = ds.load("m", since=change, since_min_rows=100)
    assert len(frame) == after and frame.predicted_at.min() >= change
    # Fewer than the floor after the change: the newest since_min_rows instead.
    late = stamps[-40]
    floored = ds.load("m", since=late, since_min_rows=100)
    assert len(floored) == 100 and floored.predicted_at.min() < late
    assert floored.prediction_ids.tolist() == ds.load("m").prediction_ids[-100:].tolist()
    # The row window still bounds it.
    assert len(ds.load("m", window_rows=50, since=change, since_min_rows=10)) == 50

    # A run with the bound trains and holds out only examples after the change.
    scope = TrainerScope(
        model_name="m",
        data_dir=tmp_path / "data",
        dataset=DatasetSettings(min_rows=100, window_rows=20_000),
        training=FAST,
    )
    since = datetime.fromtimestamp(change, UTC)
    outcome = run_pipeline(scope, ds, None, fit, run_id="r", since=since)
    assert outcome.data_from is not None and outcome.data_from >= since
    assert outcome.train_rows + outcome.validation_rows + outcome.holdout_rows == after
    everything = run_pipeline(scope, ds, None, fit, run_id="r2")
    assert everything.train_rows + everything.validation_rows + everything.holdout_rows == 900


# -- the core: one run per drift episode, on the window after it (real files, real torch) ----


def served(
    world: SyntheticWorld,
    n: int,
    *,
    rule: int,
    start: datetime,
    model: str,
    version: int = 1,
    spacing: timedelta = timedelta(seconds=1),
) -> list[LabelledExample]:
    """Examples a version that learnt rule 0 served (its score: rule 0's probability),
    labelled by ``rule`` (1: concept drift)."""
    batch = world.sample(n)
    scores = world.probability(batch.features, rule=0)
    batch.p_true = world.probability(batch.features, rule=rule)
    labels = world.draw_labels(batch)
    out = []
    for i, entity in enumerate(batch.entity_ids):
        at = start + i * spacing
        out.append(
            LabelledExample(
                prediction_id=uuid.uuid4().hex,
                entity_id=entity,
                model_name=model,
                model_version=version,
                features=dict(zip(batch.feature_names, map(float, batch.features[i]), strict=True)),
                target=float(labels[i]),
                score=float(scores[i]),
                predicted_at=at,
                feedback_at=at + timedelta(seconds=30),
            )
        )
    return out


MIN_ROWS = 30


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_drift_starts_one_run_on_the_examples_after_the_change(tmp_path: Path) -> None:
    clock = Clock()
    announced: list[ModelPublished] = []

    async def announce(event: ModelPublished) -> None:
        announced.append(event)

    scope = TrainerScope(
        model_name="drifty",
        data_dir=tmp_path / "data",
        dataset=DatasetSettings(min_rows=MIN_ROWS),
        training=FAST,
        triggers=TriggerSettings(
            min_new_examples=None,
            drift_detector="adwin",
            cooldown_seconds=0,
            check_interval_seconds=3600,
            drift_floor_seconds=3600,
        ),
    )
    core = TrainerCore(scope, tmp_path / "repo", announce=announce, clock=clock)
    await core.start()
    world = SyntheticWorld(SyntheticConfig(seed=3))
    try:
        # Version 1 from a bootstrap set (imported: model version 0, never the stable one).
        bootstrap = served(world, 400, rule=0, start=T0, model="drifty", version=0)
        core.dataset.append(bootstrap)
        assert core.observe_examples(bootstrap) is None  # no stable version yet
        core.trigger(["manual: bootstrap"])
        first = await core.wait_idle()
        assert first is not None and first.status == "published" and first.version == 1
        # The rollout keeps version 1 stable throughout (later versions would be candidates).
        core.observe_rollout(RolloutChanged(model_name="drifty", stable_version=1, state="stable"))

        # Version 1 serves 1500 examples of its rule, then the rule flips at example 1500.
        start = T0 + timedelta(hours=1)
        stream = [
            *served(world, 1500, rule=0, start=start, model="drifty", version=1),
            *served(
                world,
                1500,
                rule=1,
                start=start + timedelta(seconds=1500),
                model="drifty",
                version=1,
            ),
        ]
        other = served(world, 200, rule=1, start=start, model="drifty", version=2)
        core.dataset.append(other)
        assert core.observe_examples(other) is None  # a canary's examples: not watched
        runs = []
        stored = 0
        for chunk in range(0, len(stream), 50):
            batch = stream[chunk : chunk + 50]
            core.dataset.append(batch)  # as the sink does: durable, then observed
            stored += len(batch)
            started = core.observe_examples(batch)
            if started is not None:
                runs.append((started, stored))
                await core.wait_idle()
        # One drift episode, one run (the rule stays flipped: no second episode).
        assert len(runs) == 1, [r.reasons for r, _ in runs]
        record, stored_then = runs[0]
        drift = record.drift
        assert drift is not None and record.reasons == [drift.reason()]
        assert drift.detector == "adwin" and drift.model_version == 1
        change = round((drift.change_at - start).total_seconds())
        detected = round((drift.detected_at - start).total_seconds())
        assert abs(change - 1500) <= 40 and detected >= 1500, (change, detected)
        assert drift.delay_examples == detected - change + 1
        assert drift.delay_seconds == pytest.approx(detected - change)
        print(
            f"core: change at {change} (true 1500), detected at {detected}: "
            f"delay {drift.delay_examples} examples / {drift.delay_seconds:.0f} s"
        )
        # The run trained on what came after the change point only (at least min_rows),
        # its holdout the newest share of it.
        done = core.runs()[0]
        assert done.run_id == record.run_id and done.status in ("published", "rejected")
        assert done.data_since == drift.change_at and done.data_from is not None
        after = sum(1 for e in stream[:stored_then] if e.predicted_at >= drift.change_at)
        rows = done.train_rows + done.validation_rows + done.holdout_rows
        assert rows == max(after, MIN_ROWS), (rows, after)
        assert (done.data_from >= drift.change_at) == (after >= MIN_ROWS)
        assert after >= MIN_ROWS  # in this stream: the window starts at the change point
        status = core.status()
        assert status.last_drift == drift and status.window_since == drift.change_at
        assert status.drift_detector == "adwin" and status.drift_examples > 0

        # A later run (not drift-triggered) does not reach back before the change either,
        # also after a restart, until drift_floor_seconds have passed since the detection.
        core.trigger(["manual: later"])
        later = await core.wait_idle()
        assert later is not None and later.data_since == drift.change_at
        assert later.drift is None and later.data_from is not None
        assert later.data_from >= drift.change_at
        restarted = TrainerCore(scope, tmp_path / "repo", clock=clock)
        assert restarted.window_since() == drift.change_at
        clock.now += 3601
        assert restarted.window_since() is None and core.window_since() is None
        core.trigger(["manual: floor expired"])
        free = await core.wait_idle()
        assert free is not None and free.data_since is None
        assert free.data_from is not None and free.data_from < drift.change_at
    finally:
        await core.stop()


# -- on the real broker ----------------------------------------------------------------------


async def test_an_abrupt_drift_in_joined_examples_on_kafka_starts_a_drift_run(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """Joined examples on ``training.examples`` (a real broker) into the trainer service: the
    stable version's labelling rule flips mid-stream; the trainer detects it from the
    examples alone and starts a run on the examples after the change."""
    build = MeshBuilder(kafka_settings, tmp_path)
    model = f"drift_{build.suffix}"
    settings = build.trainer(
        model,
        dataset=DatasetSettings(flush_rows=50, flush_seconds=0.2, min_rows=50),
        training=FAST,
        triggers=TriggerSettings(
            min_new_examples=None,
            drift_detector="adwin",
            cooldown_seconds=0,
            check_interval_seconds=0.3,
        ),
    )
    app = TrainerApp(settings)
    world = SyntheticWorld(SyntheticConfig(seed=5))
    topic = settings.trainer.topics.topic("examples")
    await app.start()
    core, sink = app.core, app.sink
    assert core is not None and sink is not None
    sent = 0

    async def send(examples: list[LabelledExample]) -> None:
        # Live traffic trickles in: a chunk at a time, each stored before the next is sent.
        nonlocal sent
        for chunk in range(0, len(examples), 50):
            part = examples[chunk : chunk + 50]
            await app.producer.publish_many(topic, part, keys=[e.entity_id for e in part])
            sent += len(part)
            await eventually(lambda n=sent: _ready(sink.stored >= n), timeout=60)

    try:
        start = datetime.now(UTC) - timedelta(hours=2)
        await send(served(world, 300, rule=0, start=start, model=model, version=0))
        started, _ = core.trigger(["manual: bootstrap"])
        assert started
        first = await core.wait_idle()
        assert first is not None and first.status == "published" and first.version == 1
        before = start + timedelta(minutes=10)
        await send(served(world, 1200, rule=0, start=before, model=model, version=1))
        assert core.runs()[0].run_id == first.run_id  # no drift under version 1's own rule
        truth = before + timedelta(seconds=1200)
        await send(served(world, 600, rule=1, start=truth, model=model, version=1))

        async def drift_run_done() -> bool:
            return any(r.drift is not None and r.status != "running" for r in core.runs())

        await eventually(drift_run_done, timeout=120)
        await asyncio.sleep(1.0)  # a tick or two more: no second run for the same episode
        runs = [r for r in core.runs() if r.run_id != first.run_id]
        assert len(runs) == 1, [r.reasons for r in runs]
        [run] = runs
        drift = run.drift
        assert drift is not None and run.reasons[0].startswith("drift (adwin")
        off = (drift.change_at - truth).total_seconds()
        assert abs(off) <= 64, off
        assert run.data_since == drift.change_at and run.status in ("published", "rejected")
        # After the change only, unless fewer than min_rows were there: then the newest 50.
        rows = run.train_rows + run.validation_rows + run.holdout_rows
        assert run.data_from is not None
        assert run.data_from >= drift.change_at or rows == 50, (run.data_from, rows)
        print(
            f"kafka: change {off:+.0f} s from the truth, delay {drift.delay_examples} examples "
            f"/ {drift.delay_seconds:.0f} s, run {run.status}: {run.decision}"
        )
        status = core.status()
        assert status.last_drift == drift
        assert json.loads(run.model_dump_json())["drift"]["delay_examples"] == (
            drift.delay_examples
        )
        # The operator sees the same detection through GetStatus.
        async with grpc.aio.insecure_channel(app.address) as channel:
            reply = await trainer_pb2_grpc.TrainerServiceStub(channel).GetStatus(
                trainer_pb2.GetStatusRequest(), timeout=10
            )
        seen = reply.last_drift
        assert (seen.detector, seen.model_version, seen.delay_examples) == (
            drift.detector,
            drift.model_version,
            drift.delay_examples,
        )
        assert seen.change_at.ToDatetime(tzinfo=UTC) == drift.change_at
        assert reply.drift_metric == "adwin: loss"
    finally:
        await app.stop()


async def _ready(value: bool) -> bool:
    return value


async def test_a_promotion_does_not_restart_the_detector(tmp_path: Path) -> None:
    """Versions are promoted every few hundred examples (shadow first makes that quick): a
    detector restarted on each promotion would hold too little history to see a drift that
    comes soon after one. The stream goes on across promotions."""
    scope = TrainerScope(
        model_name="promo",
        data_dir=tmp_path / "data",
        dataset=DatasetSettings(min_rows=100),
        triggers=TriggerSettings(
            min_new_examples=None, drift_detector="adwin", check_interval_seconds=3600
        ),
    )
    for version in (1, 2):  # the stable version must be in the repository
        model_repo.write_version(tmp_path / "repo", "promo", version, b"onnx", {}, n_features=2)
    core = TrainerCore(scope, tmp_path / "repo")
    world = SyntheticWorld(SyntheticConfig(seed=5))
    at = datetime(2026, 3, 1, tzinfo=UTC)
    core.observe_rollout(RolloutChanged(model_name="promo", stable_version=1, state="stable"))
    assert core.observe_examples(served(world, 400, rule=0, start=at, model="promo")) is None
    # v2 is promoted; it serves like v1 did, then the world changes.
    core.observe_rollout(RolloutChanged(model_name="promo", stable_version=2, state="stable"))
    later = at + timedelta(seconds=400)
    flipped = served(world, 400, rule=1, start=later, model="promo", version=2)
    for i in range(0, len(flipped), 25):
        core.observe_examples(flipped[i : i + 25])
    assert core.drift is not None and core.drift.last is not None, "no drift detected"
    drift = core.drift.last
    assert drift.model_version == 2 and drift.change_at >= later - timedelta(seconds=64)
