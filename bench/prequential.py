"""A standard benchmark: concept-drift streams nobody here designed, scored prequentially.

Two streams from River's generators pass through the real mesh, started as ``loopmesh run``
starts it (``devstack.runner.LoopRun``: Kafka, tritonserver, Feast, the seven services, a first
version trained from a bootstrap set sent through ``TrainerService.AddExamples``):

``sea``
    River's ``SEA`` (binary, 10% label noise) with two abrupt drifts, concepts 0 -> 1 -> 2
    (thresholds 8, 9, 7 on ``x0 + x1``), through ``examples/sea``: each sample is a point of
    its own; its attributes are ingested as an event, the mesh folds them into the project's
    stream view, and Predict reads them from the online store (the bench waits until the
    features service serves them, then asks).
``friedman``
    River's ``FriedmanDrift`` (regression; global recurring abrupt drift: a new target function
    at the first drift, the old one back at the second), through ``examples/friedman``: ten
    inputs as Predict context, a zone (categorical, adding its own minutes) and the zone's
    stream features.

Each sample is scored test-then-train: the mesh answers ``Predict`` for sample ``i`` before its
label exists anywhere, and the label goes in through ``Feedback`` once ``delay`` more samples
have been predicted. River's online learners (adaptive random forest, Hoeffding adaptive tree,
a scaled linear model) see the same bootstrap set first, then the same stream in the same order
and batches, and learn each label at the point where the mesh receives it. They run after the
mesh, in this process, so they take no CPU from it; their answers do not depend on time.

River 0.26.1's ``ConceptDriftStream`` cannot make an abrupt drift far into a stream (``width=1``
overflows ``math.exp`` for every sample more than ~180 before ``position``), so the SEA stream
is the concatenation it would give: concept ``c`` for the samples of segment ``c``.

Printed: prequential accuracy (MAE) overall and per segment, and samples to get back within
one accuracy point (1% relative MAE) of the pre-drift level after each drift
(``bench/_prequential_scoring.py``), and the targets of issue 22. The figures go to
``bench/results/prequential.json`` (``--out``).

    python -m bench prequential                      # both streams, default sizes
    python -m bench.prequential --stream sea --length 6000 --rate 40 --delay 100
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.table import Table

from bench._prequential_scoring import ACCURACY, MAE, Criterion, LearnerScore, rolling, score
from loopmesh.client import AsyncClient, ClientConfig, Event, Feedback, RetryPolicy
from loopmesh.devstack.runner import LoopRun, RunOptions
from loopmesh.devstack.worlds import Outcome, Request
from loopmesh.gen.loopmesh.v1 import features_pb2, features_pb2_grpc
from loopmesh.mesh.channels import aio_channel
from loopmesh.mesh.events import Task as MeshTask

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RESULTS = Path(__file__).resolve().parent / "results" / "prequential.json"
console = Console(width=200)
log = logging.getLogger("bench.prequential")

Task = Literal["binary", "regression"]


# -- the streams ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One sample as the app sends it to the mesh, and as River sees it."""

    entity_id: str
    event: Event
    context: dict[str, float]
    categorical: dict[str, str]
    x: dict[str, float]
    """River's features (numbers only: a categorical input one-hot)."""
    y: float


@dataclass(frozen=True)
class Stream:
    name: str
    project: Path
    model_name: str
    task: Task
    samples: list[Sample]
    bootstrap: list[Sample]
    drifts: tuple[int, ...]
    concepts: tuple[str, ...]
    wait_features: tuple[str, ...] = ()
    """Feature refs Predict reads from the store: wait until the entity has them all."""
    run_env: dict[str, str] = field(default_factory=dict)
    canary_max_regression: float = 0.15


def _drift_points(length: int, drifts: int) -> tuple[int, ...]:
    return tuple(length * (k + 1) // (drifts + 1) for k in range(drifts))


def sea_stream(length: int, bootstrap: int, seed: int) -> Stream:
    """SEA, 10% noise, concepts 0 -> 1 -> 2 with abrupt drifts at a third and two thirds."""
    sim = _load(EXAMPLES / "sea" / "simulator.py")
    variants = (0, 1, 2)
    drifts = _drift_points(length, len(variants) - 1)
    cuts = [0, *drifts, length]
    refs = tuple(f"{sim.VIEW}:{n}" for n in sim.NAMES)

    def make(prefix: str, x: Sequence[float], y: int, *, served: bool) -> Sample:
        request = sim.request(prefix, x, with_context=not served)
        return Sample(
            entity_id=request.entity_id,
            event=request.event,
            context=request.context,
            categorical={},
            x=dict(zip(sim.NAMES, x, strict=True)),
            y=float(y),
        )

    samples: list[Sample] = []
    for c, variant in enumerate(variants):
        stream = sim.sea(variant, seed + 10 * c)
        for i in range(cuts[c], cuts[c + 1]):
            x, y = next(stream)
            samples.append(make(f"sea-{seed}-{i}", x, y, served=True))
    boot_stream = sim.sea(variants[0], seed + 1000)
    boot = []
    for i in range(bootstrap):
        x, y = next(boot_stream)
        boot.append(make(f"sea-boot-{seed}-{i}", x, y, served=False))
    return Stream(
        name="sea",
        project=EXAMPLES / "sea",
        model_name="sea",
        task="binary",
        samples=samples,
        bootstrap=boot,
        drifts=drifts,
        concepts=tuple(f"SEA variant {v} (noise {sim.NOISE})" for v in variants),
        wait_features=refs,
    )


def friedman_stream(length: int, bootstrap: int, seed: int) -> Stream:
    """FriedmanDrift, global recurring abrupt drift at a third and two thirds, plus the
    example's zones (each adds its own minutes) and noise, as ``examples/friedman``'s app."""
    from river.datasets import synth

    sim = _load(EXAMPLES / "friedman" / "simulator.py")
    zones: list[str] = list(sim.ZONES)
    drifts = _drift_points(length, 2)
    rng = np.random.default_rng(seed)

    def make(x: dict[int, float], y: float) -> Sample:
        zone = zones[int(rng.integers(len(zones)))]
        context = {f"x{i}": float(x[i]) for i in range(10)}
        target = float(y) + float(sim.ZONE_MINUTES[zone]) + float(rng.normal(scale=0.5))
        onehot = {f"zone={z}": float(z == zone) for z in zones}
        return Sample(
            entity_id=zone,
            event=Event(zone, "order", numeric={"x0": context["x0"], "x1": context["x1"]}),
            context=context,
            categorical={"zone": zone},
            x={**context, **onehot},
            y=target,
        )

    stream = synth.FriedmanDrift(drift_type="gra", position=drifts, seed=seed)
    samples = [make(x, y) for x, y in stream.take(length)]
    never = 10**12
    before = synth.FriedmanDrift(drift_type="gra", position=(never, never + 1), seed=seed + 1000)
    boot = [make(x, y) for x, y in before.take(bootstrap)]
    return Stream(
        name="friedman",
        project=EXAMPLES / "friedman",
        model_name="minutes",
        task="regression",
        samples=samples,
        bootstrap=boot,
        drifts=drifts,
        concepts=("function 1", "function 2 (global drift)", "function 1 again (recurring)"),
        # The example's own e2e test tolerates this much squared error while the bound narrows.
        canary_max_regression=2.0,
    )


def _load(path: Path) -> Any:
    """A project's simulator module, by path (as ``devstack.worlds`` loads it)."""
    spec = importlib.util.spec_from_file_location(f"bench_prequential_{path.parent.name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BootstrapWorld:
    """The ``World`` whose history ``loopmesh run`` sends through ``AddExamples``: the
    stream's bootstrap samples, in order (River's learners get the same ones first)."""

    def __init__(self, stream: Stream) -> None:
        self.model_name = stream.model_name
        self.task: MeshTask = stream.task
        self._samples: Iterator[Sample] = iter(stream.bootstrap)
        self._targets: dict[int, float] = {}

    def sample(self, n: int, rng: np.random.Generator) -> list[Request]:
        out = []
        for s in (next(self._samples) for _ in range(n)):
            r = Request(s.entity_id, dict(s.context), dict(s.categorical), s.event)
            self._targets[id(r)] = s.y
            out.append(r)
        return out

    def outcomes(self, requests: Sequence[Request], rng: np.random.Generator) -> list[Outcome]:
        targets = [self._targets.pop(id(r)) for r in requests]
        if self.task == "binary":
            return [Outcome(label=int(t)) for t in targets]
        return [Outcome(value=t) for t in targets]

    def drift(self) -> str:
        return "the stream drifts by itself"


# -- the run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    length: int = 15_000
    """Samples per stream (drifts at a third and at two thirds)."""
    rate: float = 50.0
    """Samples per second offered to the mesh (the achieved rate is reported)."""
    delay: int = 100
    """Samples predicted between a sample's prediction and its label."""
    batch: int = 25
    """Samples sent together (one Ingest, concurrent Predicts); at most ``delay``."""
    bootstrap: int = 1000
    """Labelled samples of the first concept, before the stream (mesh and River alike)."""
    seed: int = 7
    window: int = 500
    """Rolling window (samples) of the recovery criterion."""
    retrain_every: int = 500
    train_window_rows: int = 1000


@dataclass
class MeshAnswers:
    scores: list[float | None]
    versions: list[int | None]
    batch_at: list[float]
    """Unix time each batch's predictions were asked (one per batch)."""
    seconds: float
    feature_wait_seconds: float
    errors: int
    degraded: int
    defaulted: int
    promotions: list[tuple[float, int]] = field(default_factory=list)
    """(unix time, version) of each promotion to stable."""
    publications: list[tuple[float, int]] = field(default_factory=list)
    rollbacks: list[tuple[float, str]] = field(default_factory=list)


class PrequentialRun(LoopRun):
    """``loopmesh run`` with the bench's stream in place of the project's simulator."""

    def __init__(self, options: RunOptions, stream: Stream, opts: Options, console: Console):
        super().__init__(options, console)
        self.world = BootstrapWorld(stream)
        self.stream = stream
        self.opts = opts
        self.answers: MeshAnswers | None = None

    async def watch(self) -> str:
        self.answers = await drive(self, self.stream, self.opts)
        state = self.loop_state
        self.answers.promotions = [(m.at.timestamp(), m.stable or 0) for m in state.promotions()]
        self.answers.publications = [(p.at.timestamp(), p.version) for p in state.publications]
        self.answers.rollbacks = [(m.at.timestamp(), m.reason) for m in state.rollbacks()]
        return "stream ended"


async def drive(run: PrequentialRun, stream: Stream, opts: Options) -> MeshAnswers:
    """Send the stream through the mesh's doors, test-then-train, at ``opts.rate``."""
    ports = run.ports
    client = AsyncClient(
        ClientConfig(
            ingestion_url=f"127.0.0.1:{ports['ingestion']}",
            inference_url=f"127.0.0.1:{ports['inference']}",
            feedback_url=f"127.0.0.1:{ports['feedback']}",
            deadline_s=10.0,
            retry=RetryPolicy(max_attempts=3, total_timeout_s=10.0),
            tracing=False,
        )
    )
    n = len(stream.samples)
    out = MeshAnswers([None] * n, [None] * n, [], 0.0, 0.0, 0, 0, 0)
    pending: deque[tuple[int, str, float]] = deque()
    binary = stream.task == "binary"
    config = ClientConfig()
    loop = asyncio.get_running_loop()
    started = loop.time()
    last_note = started
    async with aio_channel(
        f"127.0.0.1:{ports['features']}", config.channel_settings(), tracing=False
    ) as channel:
        features = features_pb2_grpc.FeatureServiceStub(channel)
        try:
            for first in range(0, n, opts.batch):
                if run.processes is not None and (exited := run.processes.exited()):
                    raise RuntimeError(f"services exited: {', '.join(exited)}")
                await asyncio.sleep(max(0.0, started + first / opts.rate - loop.time()))
                batch = stream.samples[first : first + opts.batch]
                await client.ingest([s.event for s in batch])
                if stream.wait_features:
                    waited = loop.time()
                    await _wait_present(features, [s.entity_id for s in batch], stream)
                    out.feature_wait_seconds += loop.time() - waited
                out.batch_at.append(time.time())
                replies = await asyncio.gather(
                    *(
                        client.predict(
                            s.entity_id,
                            context=s.context,
                            categorical=s.categorical,
                            model_name=stream.model_name,
                        )
                        for s in batch
                    ),
                    return_exceptions=True,
                )
                for i, (s, reply) in enumerate(zip(batch, replies, strict=True), start=first):
                    if isinstance(reply, BaseException):
                        out.errors += 1
                        log.warning("predict %d failed: %s", i, reply)
                        continue
                    out.scores[i], out.versions[i] = reply.score, reply.model_version
                    out.degraded += reply.degraded
                    out.defaulted += bool(reply.defaulted_features)
                    pending.append((i, reply.prediction_id, s.y))
                # The labels the app knows now: those ``delay`` samples behind the newest.
                newest = first + len(batch) - 1
                due = []
                while pending and pending[0][0] <= newest - opts.delay:
                    _, prediction_id, y = pending.popleft()
                    due.append(
                        Feedback(prediction_id, label=int(y))
                        if binary
                        else Feedback(prediction_id, value=y)
                    )
                if due:
                    await client.submit_many(due)
                if loop.time() - last_note > 15:
                    last_note = loop.time()
                    done = first + len(batch)
                    served = sorted({v for v in out.versions[:done] if v is not None})
                    run.note(
                        f"{stream.name}: {done}/{n} samples, "
                        f"{done / (loop.time() - started):.1f}/s, versions served {served}"
                    )
        finally:
            out.seconds = loop.time() - started
            with contextlib.suppress(Exception):
                await client.close()
    return out


async def _wait_present(
    stub: features_pb2_grpc.FeatureServiceStub, ids: list[str], stream: Stream
) -> None:
    """Until the features service serves every one of ``ids`` (the fold is asynchronous)."""
    present = features_pb2.FEATURE_STATUS_PRESENT
    deadline = time.monotonic() + 30
    waiting = ids
    while True:
        reply = await stub.GetOnlineFeatures(
            features_pb2.GetOnlineFeaturesRequest(
                entity_ids=waiting, feature_refs=list(stream.wait_features)
            ),
            timeout=10,
        )
        waiting = [
            e.entity_id for e in reply.entities if any(v.status != present for v in e.values)
        ]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"features of {len(waiting)} points not served within 30 s")
        await asyncio.sleep(0.02)


def run_mesh(stream: Stream, opts: Options, out_dir: Path) -> tuple[MeshAnswers, dict[str, Any]]:
    """Start the mesh on ``stream``'s project, drive the stream through it, stop it."""
    previous = os.environ.get("LOOPMESH_PROJECT")
    os.environ["LOOPMESH_PROJECT"] = str(stream.project)
    try:
        options = RunOptions(
            model_name=stream.model_name,
            headless=True,
            out_dir=out_dir,
            bootstrap_examples=len(stream.bootstrap),
            retrain_every_examples=opts.retrain_every,
            canary_min_samples=60,
            canary_step_seconds=5,
            canary_max_regression=stream.canary_max_regression,
            metrics_window_seconds=20,
            drift_after_seconds=None,
            seed=opts.seed,
            extra_env={
                "LOOPMESH_TRAINER__DATASET__WINDOW_ROWS": str(opts.train_window_rows),
                **stream.run_env,
            },
        )
        run = PrequentialRun(options, stream, opts, console)
        summary = asyncio.run(run.run())
    finally:
        if previous is None:
            os.environ.pop("LOOPMESH_PROJECT", None)
        else:
            os.environ["LOOPMESH_PROJECT"] = previous
    if run.answers is None:
        raise RuntimeError(f"the mesh run ended before the stream: {summary.get('error')}")
    return run.answers, summary


# -- River, side by side --------------------------------------------------------------------


def river_learners(task: Task, seed: int) -> dict[str, Any]:
    from river import forest, linear_model, preprocessing, tree

    if task == "binary":
        return {
            "River ARF": forest.ARFClassifier(seed=seed),
            "River HAT": tree.HoeffdingAdaptiveTreeClassifier(seed=seed),
            "River LogReg": preprocessing.StandardScaler() | linear_model.LogisticRegression(),
        }
    return {
        "River ARF": forest.ARFRegressor(seed=seed),
        "River HAT": tree.HoeffdingAdaptiveTreeRegressor(seed=seed),
        "River LinReg": preprocessing.StandardScaler() | linear_model.LinearRegression(),
    }


def run_river(model: Any, stream: Stream, opts: Options) -> tuple[list[float | None], float]:
    """The mesh's schedule for one River learner: the bootstrap set, then per batch predict
    every sample, then learn the labels that are ``delay`` behind the newest prediction."""
    started = time.monotonic()
    binary = stream.task == "binary"
    for s in stream.bootstrap:
        model.learn_one(s.x, bool(s.y) if binary else s.y)
    answers: list[float | None] = []
    learned = 0
    samples = stream.samples
    for first in range(0, len(samples), opts.batch):
        batch = samples[first : first + opts.batch]
        for s in batch:
            if binary:
                proba = model.predict_proba_one(s.x)
                answers.append(float(proba.get(True, 0.0)))
            else:
                answers.append(float(model.predict_one(s.x)))
        newest = first + len(batch) - 1
        while learned <= newest - opts.delay:
            s = samples[learned]
            model.learn_one(s.x, bool(s.y) if binary else s.y)
            learned += 1
    return answers, time.monotonic() - started


# -- scoring and report ---------------------------------------------------------------------


def per_sample(stream: Stream, answers: Sequence[float | None]) -> list[float | None]:
    """1/0 correct (binary, threshold 0.5) or absolute error, per sample; None: no answer."""
    out: list[float | None] = []
    for s, a in zip(stream.samples, answers, strict=True):
        if a is None:
            out.append(None)
        elif stream.task == "binary":
            out.append(float((a >= 0.5) == (s.y >= 0.5)))
        else:
            out.append(abs(a - s.y))
    return out


def criterion(stream: Stream, opts: Options) -> Criterion:
    base = ACCURACY if stream.task == "binary" else MAE
    return Criterion(base.higher_is_better, base.tolerance, opts.window, opts.window // 2)


@dataclass
class StreamResult:
    stream: Stream
    scores: dict[str, LearnerScore]
    curves: dict[str, list[tuple[int, float]]]
    mesh: MeshAnswers
    summary: dict[str, Any]
    river_seconds: dict[str, float]
    wall_seconds: float
    batch: int

    def sample_of(self, unix: float) -> int:
        """The first sample predicted at or after ``unix`` (batch granularity)."""
        b = bisect.bisect_left(self.mesh.batch_at, unix)
        return min(b * self.batch, len(self.stream.samples))


def evaluate(
    stream: Stream,
    opts: Options,
    mesh: MeshAnswers,
    summary: dict[str, Any],
    wall: float,
) -> StreamResult:
    crit = criterion(stream, opts)
    scores: dict[str, LearnerScore] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    river_seconds: dict[str, float] = {}
    values = per_sample(stream, mesh.scores)
    scores["LoopMesh"] = score("LoopMesh", values, stream.drifts, crit)
    curves["LoopMesh"] = rolling(_filled(values, crit), opts.window, opts.window // 5)
    for name, model in river_learners(stream.task, opts.seed).items():
        console.print(f"{stream.name}: {name} on the same stream…")
        answers, seconds = run_river(model, stream, opts)
        river_seconds[name] = round(seconds, 1)
        values = per_sample(stream, answers)
        scores[name] = score(name, values, stream.drifts, crit)
        curves[name] = rolling(_filled(values, crit), opts.window, opts.window // 5)
    return StreamResult(stream, scores, curves, mesh, summary, river_seconds, wall, opts.batch)


def _filled(values: Sequence[float | None], crit: Criterion) -> list[float]:
    return [(0.0 if crit.higher_is_better else float("nan")) if v is None else v for v in values]


def _fmt(value: float | None, binary: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if binary else f"{value:.3f}"


def targets(result: StreamResult) -> list[tuple[str, bool, str]]:
    """Issue 22's targets on the binary stream: (target, met, the figures)."""
    mesh, arf = result.scores["LoopMesh"], result.scores["River ARF"]
    out = []
    gap = (arf.overall or 0.0) - (mesh.overall or 0.0)
    out.append(
        (
            "mesh prequential accuracy within 2 points of ARF",
            gap <= 0.02,
            f"mesh {_fmt(mesh.overall, True)} vs ARF {_fmt(arf.overall, True)} "
            f"({100 * gap:+.2f} points behind)",
        )
    )
    inf = float("inf")
    for m, a in zip(mesh.recoveries, arf.recoveries, strict=True):
        ms = inf if m.samples is None else m.samples
        as_ = inf if a.samples is None else a.samples
        out.append(
            (
                f"mesh recovers from the drift at sample {m.drift_at} in fewer samples than ARF",
                ms < as_,
                f"mesh {_rec(m.samples)} vs ARF {_rec(a.samples)}",
            )
        )
    return out


def _rec(samples: int | None) -> str:
    return "not recovered" if samples is None else f"{samples}"


def report(results: Sequence[StreamResult], opts: Options) -> None:
    for r in results:
        s, binary = r.stream, r.stream.task == "binary"
        metric = "accuracy" if binary else "MAE"
        n = len(s.samples)
        table = Table(
            title=(
                f"prequential {metric}: {s.name} ({n} samples, drifts at "
                f"{', '.join(map(str, s.drifts))}; label delay {opts.delay} samples; "
                f"bootstrap {len(s.bootstrap)})"
            )
        )
        table.add_column("learner")
        table.add_column(f"overall {metric}", justify="right")
        bounds = [0, *s.drifts, n]
        for k in range(len(bounds) - 1):
            table.add_column(f"{metric} [{bounds[k]}, {bounds[k + 1]})", justify="right")
        for d in s.drifts:
            table.add_column(f"recovery after {d}", justify="right")
        for name, sc in r.scores.items():
            recs = [
                f"{_rec(x.samples)} ({_fmt(x.before, binary)}→{_fmt(x.lowest, binary)})"
                for x in sc.recoveries
            ]
            table.add_row(
                name, _fmt(sc.overall, binary), *(_fmt(v, binary) for v in sc.segments), *recs
            )
        console.print(table)
        crit = criterion(s, opts)
        tol = f"{crit.tolerance * 100:g} point" if binary else f"{crit.tolerance * 100:g}% relative"
        console.print(
            f"recovery: samples after the drift until the mean of the last min(k, {crit.window}) "
            f"post-drift samples is within {tol} of the {crit.window} samples before the drift "
            f"(counted from k = {crit.min_samples}); in brackets: pre-drift level → worst "
            "post-drift window before recovery"
        )
        m = r.mesh
        served = sorted({v for v in m.versions if v is not None})
        promos = [f"v{v}@{r.sample_of(t)}" for t, v in m.promotions]
        pubs = [f"v{v}@{r.sample_of(t)}" for t, v in m.publications]
        console.print(
            f"mesh: {n} samples in {m.seconds:.0f} s ({n / max(m.seconds, 1e-9):.1f}/s offered "
            f"{opts.rate:g}/s), {m.errors} failed calls, {m.degraded} degraded, {m.defaulted} "
            f"with defaulted features, feature wait {m.feature_wait_seconds:.0f} s; versions "
            f"served {served}; published at sample {pubs}; promoted at sample {promos}; "
            f"{len(m.rollbacks)} rolled back or aborted; whole run {r.wall_seconds:.0f} s; "
            f"River learners {r.river_seconds} s"
        )
        if binary:
            t = Table(title="issue 22 targets (binary stream)")
            t.add_column("target")
            t.add_column("met", justify="center")
            t.add_column("figures")
            for what, met, figures in targets(r):
                t.add_row(what, "[green]met" if met else "[red]not met", figures)
            console.print(t)


def to_json(results: Sequence[StreamResult], opts: Options, wall: float) -> dict[str, Any]:
    def rec(x: Any) -> dict[str, Any]:
        return asdict(x)

    streams = {}
    for r in results:
        s = r.stream
        entry: dict[str, Any] = {
            "task": s.task,
            "samples": len(s.samples),
            "drifts": list(s.drifts),
            "concepts": list(s.concepts),
            "metric": "accuracy" if s.task == "binary" else "mae",
            "learners": {
                name: {
                    "overall": sc.overall,
                    "segments": sc.segments,
                    "answered": sc.answered,
                    "recoveries": [rec(x) for x in sc.recoveries],
                    "rolling": r.curves[name],
                }
                for name, sc in r.scores.items()
            },
            "mesh": {
                "seconds": round(r.mesh.seconds, 1),
                "samples_per_second": round(len(s.samples) / max(r.mesh.seconds, 1e-9), 2),
                "errors": r.mesh.errors,
                "degraded": r.mesh.degraded,
                "defaulted": r.mesh.defaulted,
                "feature_wait_seconds": round(r.mesh.feature_wait_seconds, 1),
                "versions_served": sorted({v for v in r.mesh.versions if v is not None}),
                "published_at_sample": [[v, r.sample_of(t)] for t, v in r.mesh.publications],
                "promoted_at_sample": [[v, r.sample_of(t)] for t, v in r.mesh.promotions],
                "rollbacks": [[r.sample_of(t), why] for t, why in r.mesh.rollbacks],
                "run_summary": {
                    k: r.summary.get(k)
                    for k in ("seconds", "stopped_by", "versions_published", "promotions")
                },
            },
            "river_seconds": r.river_seconds,
            "wall_seconds": round(r.wall_seconds, 1),
        }
        if s.task == "binary":
            entry["targets"] = [
                {"target": what, "met": met, "figures": figures}
                for what, met, figures in targets(r)
            ]
        streams[s.name] = entry
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": asdict(opts),
        "wall_seconds": round(wall, 1),
        "streams": streams,
    }


STREAMS: dict[str, Callable[[int, int, int], Stream]] = {
    "sea": sea_stream,
    "friedman": friedman_stream,
}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench prequential`` runs both streams with the defaults; ``python -m
    bench.prequential --help`` lists the options."""
    parser = argparse.ArgumentParser(prog="python -m bench.prequential", description=__doc__)
    defaults = Options()
    parser.add_argument("--stream", choices=[*STREAMS, "both"], default="both")
    parser.add_argument("--length", type=int, default=defaults.length)
    parser.add_argument("--rate", type=float, default=defaults.rate)
    parser.add_argument("--delay", type=int, default=defaults.delay)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--bootstrap", type=int, default=defaults.bootstrap)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--window", type=int, default=defaults.window)
    parser.add_argument("--retrain-every", type=int, default=defaults.retrain_every)
    parser.add_argument("--train-window-rows", type=int, default=defaults.train_window_rows)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--run-dir", type=Path, default=ROOT / ".loopmesh" / "prequential")
    args = parser.parse_args([] if argv is None else list(argv))
    opts = Options(
        length=args.length,
        rate=args.rate,
        delay=args.delay,
        batch=min(args.batch, args.delay),
        bootstrap=args.bootstrap,
        seed=args.seed,
        window=args.window,
        retrain_every=args.retrain_every,
        train_window_rows=args.train_window_rows,
    )
    for name in ("aiokafka", "faust", "mode"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    names = list(STREAMS) if args.stream == "both" else [args.stream]
    started = time.monotonic()
    results = []
    for name in names:
        stream = STREAMS[name](opts.length, opts.bootstrap, opts.seed)
        console.print(
            f"== {name}: {len(stream.samples)} samples through the mesh ({stream.project})"
        )
        t0 = time.monotonic()
        mesh, summary = run_mesh(stream, opts, args.run_dir / name)
        results.append(evaluate(stream, opts, mesh, summary, time.monotonic() - t0))
    wall = time.monotonic() - started
    report(results, opts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(to_json(results, opts, wall), indent=1) + "\n")
    console.print(f"whole bench {wall:.0f} s; figures in {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
