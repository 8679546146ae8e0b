"""The Predict use case, knowing no gRPC or Kafka: validate, route, assemble features, score, log.

One prediction: validate the request (``PredictInput``), map its ``entity_id`` the way the
ingestion door does (the pseudonym when ``LOOPMESH_PRIVACY__*`` enables it, so features are
found and predictions logged under the id the rest of the mesh knows), pick the version
(pinned, or by the rollout route's sticky hash of ``entity_id``, or the latest published when
no rollout is known), read the entity's store features the model declares (unless the
caller's context gives them), build the input row in the model's declared order (numeric
features, then each declared categorical input as its ``ContextField.index``), score it
through a coalescing batcher per version, answer by the version's task (binary: the positive
class's probability; multiclass: every class's probability and the top class; regression: the
value), and hand the record to the prediction log without waiting.

A failing canary falls back to stable for that request and counts against the canary.

Shadow: when the route names shadow candidates and this request is in their share, stable's
answer goes out first; then each shadow scores the same inputs (its own declared features,
from the readings already fetched) in a background task, and the prediction is logged with
their answers attached (``shadow``), so the joiner can pair them with stable's on the same
feedback. At most ``shadow_max_inflight`` requests are shadow-scored at once; beyond that the
shadow work is shed, never the answer, and a shadow that fails or times out is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from loopmesh.inference import instruments
from loopmesh.inference.batching import Coalescer
from loopmesh.inference.catalog import ModelCatalog, ModelSpec
from loopmesh.inference.operational import OperationalWindows
from loopmesh.inference.routing import Arm, Route, RouteTable
from loopmesh.mesh import model_repo
from loopmesh.mesh.errors import (
    FailedPrecondition,
    InvalidArgument,
    LoopMeshError,
    NotFound,
    Unavailable,
)
from loopmesh.mesh.events import Category, Finite, Identifier, Task

# -- errors the adapters translate into their transport's status ------------------------------


class BackendError(RuntimeError):
    """A scoring backend call failed; ``unavailable`` when retrying elsewhere may help."""

    def __init__(self, message: str, *, unavailable: bool) -> None:
        super().__init__(message)
        self.unavailable = unavailable


class ModelFailed(LoopMeshError):
    """The model version answered with an error (a bug or bad output, not availability)."""


class FeaturesUnavailable(Unavailable):
    """The feature service could not answer."""


# -- ports ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeatureReading:
    """One stored feature value; ``value`` None when the entity has none."""

    value: float | str | None
    stale: bool = False


class FeatureSource(Protocol):
    async def fetch(self, entity_id: str, refs: tuple[str, ...]) -> dict[str, FeatureReading]:
        """Values of ``refs`` for one entity; raises FeaturesUnavailable."""
        ...


class ScoreBackend(Protocol):
    async def score_rows(
        self, model_name: str, version: int, rows: Sequence[Sequence[float]]
    ) -> Sequence[Sequence[float]]:
        """The model's outputs per row (k numbers each) from that exact version; raises
        BackendError."""
        ...

    async def ready_versions(self, model_name: str) -> list[int]:
        """Versions the backend can serve now, ascending ([] when it cannot tell)."""
        ...


@dataclass(frozen=True, slots=True)
class ShadowAnswer:
    """A shadow candidate's answer to a request it did not serve."""

    model_version: int
    score: float
    outputs: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    """What the prediction log keeps of one answer."""

    prediction_id: str
    model_name: str
    model_version: int
    entity_id: str
    features: dict[str, float]
    score: float
    latency_ms: float
    event_time: datetime
    categorical: dict[str, str] = field(default_factory=dict)
    """The categorical inputs the version declares, as sent."""
    outputs: tuple[float, ...] = ()
    """multiclass: every class's probability (empty for the other tasks)."""
    task: Task = "binary"
    shadow: tuple[ShadowAnswer, ...] = ()


class PredictionSink(Protocol):
    def log(self, record: PredictionRecord) -> bool:
        """Queue the record without blocking; False when it had to be dropped."""
        ...


# -- request and answer -----------------------------------------------------------------------


class PredictInput(BaseModel):
    """A validated Predict request (the one place its rules live, whatever the transport)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    entity_id: Identifier
    context: dict[Annotated[str, StringConstraints(min_length=1, max_length=256)], Finite] = Field(
        default_factory=dict
    )
    categorical: dict[Annotated[str, StringConstraints(min_length=1, max_length=256)], Category] = (
        Field(default_factory=dict)
    )
    """Categorical context by name; which names a version takes is its metadata's."""
    model_name: str = ""
    model_version: str = ""
    request_id: Annotated[str, StringConstraints(max_length=256)] = ""

    @classmethod
    def parse(cls, **values: object) -> PredictInput:
        """Validate, turning the first pydantic error into InvalidArgument naming its field."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "request"
            raise InvalidArgument(loc, first["msg"]) from None


@dataclass(frozen=True, slots=True)
class PredictOutput:
    prediction_id: str
    score: float
    model_name: str
    model_version: int
    arm: Arm
    degraded: bool
    defaulted_features: tuple[str, ...]
    request_id: str
    task: Task = "binary"
    probabilities: tuple[float, ...] = ()
    """multiclass: every class's probability, by class index."""
    predicted_class: int | None = None
    """multiclass: the most probable class (the first of equals)."""


@dataclass(slots=True)
class VersionStats:
    answered: int = 0
    failures: int = 0


@dataclass
class Counters:
    """Per-version answers and failures (a canary's failures are what it is judged on).

    ``succeeded`` and ``failed`` are where a call to a version finishes (Predict scoring and
    ModelInfer alike): they count it and, when ``windows`` is set, record its latency in the
    sliding window the gateway publishes to ``metrics.live``. Only server-side failures are
    passed to ``failed``; a client's bad request is not the version's fault.
    """

    versions: dict[tuple[str, int], VersionStats] = field(default_factory=dict)
    degraded: int = 0
    windows: OperationalWindows | None = None

    def succeeded(self, model_name: str, version: int, latency_ms: float) -> None:
        self.of(model_name, version).answered += 1
        if self.windows is not None:
            self.windows.record(model_name, version, failed=False, latency_ms=latency_ms)

    def failed(self, model_name: str, version: int, latency_ms: float) -> None:
        self.of(model_name, version).failures += 1
        if self.windows is not None:
            self.windows.record(model_name, version, failed=True, latency_ms=latency_ms)

    def absorb(
        self,
        model_name: str,
        version: int,
        *,
        answered: int,
        failed: int,
        latencies_ms: list[float],
        shadow: bool = False,
    ) -> None:
        """Calls that finished elsewhere (the data plane's ModelInfer and Predict), counted in
        bulk; ``shadow`` calls feed only the operational window, like ``shadowed``."""
        if not shadow:
            stats = self.of(model_name, version)
            stats.answered += answered
            stats.failures += failed
        if self.windows is not None:
            self.windows.record_many(
                model_name,
                version,
                count=answered + failed,
                failures=failed,
                latencies_ms=latencies_ms,
            )

    def shadowed(self, model_name: str, version: int, *, failed: bool, latency_ms: float) -> None:
        """A shadow call finished: it feeds the version's operational window (the guards judge
        a shadow's errors and latency too) but is no answer."""
        if self.windows is not None:
            self.windows.record(model_name, version, failed=failed, latency_ms=latency_ms)

    def of(self, model_name: str, version: int) -> VersionStats:
        key = (model_name, version)
        stats = self.versions.get(key)
        if stats is None:
            stats = self.versions[key] = VersionStats()
        return stats

    def for_model(self, model_name: str) -> dict[int, VersionStats]:
        return {v: s for (m, v), s in sorted(self.versions.items()) if m == model_name}


# -- the use case -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Inputs:
    row: list[float]
    features: dict[str, float]
    categorical: dict[str, str]
    defaulted: tuple[str, ...]
    degraded: bool
    readings: dict[str, FeatureReading]


@dataclass(frozen=True, slots=True)
class _Answer:
    score: float
    outputs: tuple[float, ...]
    """multiclass: the class probabilities (empty otherwise)."""
    predicted_class: int | None


def answer_of(spec: ModelSpec, outputs: Sequence[float]) -> _Answer:
    """Read one row of the model's output by its task (width already checked)."""
    if spec.task != "multiclass":
        return _Answer(outputs[0], (), None)
    probabilities = tuple(outputs)
    top = max(range(len(probabilities)), key=probabilities.__getitem__)
    return _Answer(probabilities[top], probabilities, top)


class Predictor:
    """Answers Predict; shared by the unary and the streaming RPC."""

    def __init__(
        self,
        *,
        catalog: ModelCatalog,
        routes: RouteTable,
        features: FeatureSource,
        backend: ScoreBackend,
        sink: PredictionSink,
        counters: Counters | None = None,
        default_model: str | None = None,
        on_features_unavailable: Literal["degrade", "fail"] = "degrade",
        batch_max_size: int = 64,
        batch_max_delay_s: float = 0.001,
        batch_max_inflight: int = 2,
        entity_ids: Callable[[str], str] | None = None,
        shadow_max_inflight: int = 64,
        shadow_timeout_s: float = 2.0,
    ) -> None:
        """``entity_ids`` maps a request's raw id to the stored one (default: unchanged)."""
        self.catalog = catalog
        self.routes = routes
        self.counters = counters if counters is not None else Counters()
        self._features = features
        self._backend = backend
        self._sink = sink
        self._default_model = default_model
        self._degrade = on_features_unavailable == "degrade"
        self._batch = (batch_max_size, batch_max_delay_s, batch_max_inflight)
        self._batchers: dict[tuple[str, int], Coalescer[list[float], Sequence[float]]] = {}
        self._entity_ids = entity_ids
        self._shadow_slots = shadow_max_inflight
        self._shadow_timeout = shadow_timeout_s
        self._shadow_tasks: set[asyncio.Task[None]] = set()

    async def predict(self, request: PredictInput) -> PredictOutput:
        started = time.perf_counter()
        if self._entity_ids is not None:
            # Once, first: routing, the feature lookup and the log all use the stored id.
            request = request.model_copy(update={"entity_id": self._entity_ids(request.entity_id)})
        model_name = self._model_name(request.model_name)
        version, arm, route = await self._resolve(model_name, request)
        spec = self._spec(model_name, version)
        inputs = await self._inputs(request, spec, {})
        # Latency is counted per version attempt: a fallback's clock starts when stable is
        # asked, so the canary's failure time does not count against stable.
        attempt_started = started
        try:
            outputs = await self._score(spec, inputs.row)
        except BackendError as exc:
            self.counters.failed(model_name, version, _elapsed_ms(attempt_started))
            stable = route.stable_version if route is not None else None
            if arm != "canary" or stable is None or stable == version:
                raise _backend_failure(exc) from exc
            # The canary failed this request: stable answers it, the canary takes the blame.
            version, arm = stable, "fallback"
            attempt_started = time.perf_counter()
            spec = self._spec(model_name, version)
            # Stable answers what the canary was asked: categorical inputs only the canary
            # declares are left out rather than refused (the request was valid when routed).
            inputs = await self._inputs(request, spec, inputs.readings, fallback=True)
            try:
                outputs = await self._score(spec, inputs.row)
            except BackendError as again:
                self.counters.failed(model_name, version, _elapsed_ms(attempt_started))
                raise _backend_failure(again) from again
        self.counters.succeeded(model_name, version, _elapsed_ms(attempt_started))
        instruments.record_prediction(model_name, version, arm=arm, degraded=inputs.degraded)
        if inputs.degraded:
            self.counters.degraded += 1
        prediction_id = uuid.uuid4().hex
        answer = answer_of(spec, outputs)
        record = PredictionRecord(
            prediction_id=prediction_id,
            model_name=model_name,
            model_version=version,
            entity_id=request.entity_id,
            features=inputs.features,
            score=answer.score,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            event_time=datetime.now(UTC),
            categorical=inputs.categorical,
            outputs=answer.outputs,
            task=spec.task,
        )
        shadows = route.shadows_for() if route is not None and arm == "stable" else ()
        if shadows and len(self._shadow_tasks) < self._shadow_slots:
            task = asyncio.create_task(self._shadow(record, request, inputs, shadows))
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)
        else:
            if shadows:
                instruments.record_shadow(model_name, None, "shed")
            self._sink.log(record)
        return PredictOutput(
            prediction_id=prediction_id,
            score=answer.score,
            model_name=model_name,
            model_version=version,
            arm=arm,
            degraded=inputs.degraded,
            defaulted_features=inputs.defaulted,
            request_id=request.request_id,
            task=spec.task,
            probabilities=answer.outputs,
            predicted_class=answer.predicted_class,
        )

    def batch_stats(self) -> tuple[int, int]:
        """(Triton requests, rows) Predict has sent: fewer requests than rows is coalescing."""
        batchers = list(self._batchers.values())
        return sum(b.batches for b in batchers), sum(b.items for b in batchers)

    async def close(self) -> None:
        # Shadow work still running is given up; its predictions are logged without it.
        for task in list(self._shadow_tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._shadow_tasks, return_exceptions=True)
        for batcher in list(self._batchers.values()):
            await batcher.close()

    @property
    def shadow_inflight(self) -> int:
        return len(self._shadow_tasks)

    async def _shadow(
        self,
        record: PredictionRecord,
        request: PredictInput,
        inputs: _Inputs,
        versions: tuple[int, ...],
    ) -> None:
        """Score ``versions`` on the request stable answered, then log it with their answers
        (always logged, whatever happens to the shadows)."""
        answers: list[ShadowAnswer] = []
        try:
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(self._shadow_one(record.model_name, v, request, inputs) for v in versions),
                    return_exceptions=True,
                ),
                self._shadow_timeout,
            )
            for version, result in zip(versions, results, strict=True):
                if isinstance(result, ShadowAnswer):
                    answers.append(result)
                    instruments.record_shadow(record.model_name, version, "scored")
                else:
                    instruments.record_shadow(record.model_name, version, "failed")
        except TimeoutError:
            for version in versions:
                instruments.record_shadow(record.model_name, version, "timeout")
        finally:
            self._sink.log(replace(record, shadow=tuple(answers)))

    async def _shadow_one(
        self, model_name: str, version: int, request: PredictInput, inputs: _Inputs
    ) -> ShadowAnswer:
        spec = self._spec(model_name, version)
        # Its own declared inputs, from what was fetched (a feature only it declares is
        # fetched now); categorical inputs it does not declare are left out, as for a fallback.
        mine = await self._inputs(request, spec, inputs.readings, fallback=True)
        started = time.perf_counter()
        try:
            outputs = await self._score(spec, mine.row)
        except BackendError:
            elapsed = _elapsed_ms(started)
            self.counters.shadowed(model_name, version, failed=True, latency_ms=elapsed)
            raise
        elapsed = _elapsed_ms(started)
        self.counters.shadowed(model_name, version, failed=False, latency_ms=elapsed)
        answer = answer_of(spec, outputs)
        return ShadowAnswer(version, answer.score, answer.outputs)

    # -- steps --------------------------------------------------------------------------------

    def _model_name(self, requested: str) -> str:
        name = requested or self._default_model
        if not name:
            raise InvalidArgument("model_name", "required (no default model is configured)")
        try:
            return model_repo.validate_model_name(name)
        except ValueError as exc:
            raise InvalidArgument("model_name", str(exc)) from None

    async def _resolve(
        self, model_name: str, request: PredictInput
    ) -> tuple[int, Arm, Route | None]:
        if request.model_version:
            try:
                return model_repo.validate_version(request.model_version), "pinned", None
            except ValueError as exc:
                raise InvalidArgument("model_version", str(exc)) from None
        route = self.routes.get(model_name)
        if route is not None:
            choice = route.choose(request.entity_id)
            if choice is not None:
                return choice[0], choice[1], route
        # No rollout known: the newest version Triton serves (a newer one on disk may be a
        # candidate nobody has loaded yet), else the newest published (which then says why).
        try:
            published = self.catalog.versions(model_name)
        except ValueError as exc:
            raise InvalidArgument("model_name", str(exc)) from None
        if not published:
            raise NotFound("model_name", f"unknown model {model_name!r}")
        ready = [v for v in await self._backend.ready_versions(model_name) if v in published]
        for version in reversed(ready or published):
            if self.catalog.has_version(model_name, version):  # the listing may be seconds old
                return version, "latest", None
        raise NotFound("model_name", f"unknown model {model_name!r}")

    def _spec(self, model_name: str, version: int) -> ModelSpec:
        # Raises UnknownModel (NOT_FOUND) or BadModelSpec (FAILED_PRECONDITION).
        return self.catalog.spec(model_name, version)

    async def _inputs(
        self,
        request: PredictInput,
        spec: ModelSpec,
        known: dict[str, FeatureReading],
        *,
        fallback: bool = False,
    ) -> _Inputs:
        categorical = _categorical_inputs(request, spec, strict=not fallback)
        context = request.context
        wanted = tuple(r for r in spec.store_refs if r not in context and r not in known)
        readings = known
        degraded = False
        if wanted:
            try:
                readings = {**known, **await self._features.fetch(request.entity_id, wanted)}
            except FeaturesUnavailable as exc:
                if not self._degrade:
                    raise Unavailable(f"feature service unavailable: {exc}") from exc
                degraded = True
        row: list[float] = []
        features: dict[str, float] = {}
        defaulted: list[str] = []
        for name in spec.feature_names:
            value = context.get(name)
            if value is None:
                reading = readings.get(name)
                stored = reading.value if reading is not None else None
                if isinstance(stored, str):
                    raise FailedPrecondition(
                        f"{spec.model_name} version {spec.version} declares feature {name!r}, "
                        "which the store holds as text; models take numbers only"
                    )
                if stored is not None and math.isfinite(stored):
                    value = float(stored)
                else:
                    value = self.catalog.default_for(spec, name)
                    defaulted.append(name)
            row.append(value)
            features[name] = value
        for declared in spec.categorical:
            # A declared input the caller did not send is the empty value's row.
            row.append(float(declared.index(categorical.get(declared.name, ""))))
        return _Inputs(row, features, categorical, tuple(defaulted), degraded, readings)

    async def _score(self, spec: ModelSpec, row: list[float]) -> Sequence[float]:
        key = (spec.model_name, spec.version)
        batcher = self._batchers.get(key)
        if batcher is None:
            size, delay, inflight = self._batch
            width = spec.n_outputs

            async def flush(rows: Sequence[list[float]]) -> Sequence[Sequence[float]]:
                answers = await self._backend.score_rows(key[0], key[1], rows)
                _check_outputs(spec, len(rows), width, answers)
                return answers

            batcher = Coalescer(flush, max_size=size, max_delay_s=delay, max_inflight=inflight)
            self._batchers[key] = batcher
        return await batcher.submit(row)


def _categorical_inputs(request: PredictInput, spec: ModelSpec, *, strict: bool) -> dict[str, str]:
    """The request's categorical values the version declares; an undeclared name is refused
    (``strict``) or left out (a fallback's stable version answering a canary's request)."""
    sent = request.categorical
    if not sent:
        return {}
    taken: dict[str, str] = {}
    for name, value in sent.items():
        if spec.categorical_field(name) is not None:
            taken[name] = value
        elif strict:
            declared = [f.name for f in spec.categorical]
            raise InvalidArgument(
                f"categorical.{name}",
                f"{spec.model_name} version {spec.version} has no categorical input {name!r}"
                f" (it declares {declared or 'none'})",
            )
    return taken


def _check_outputs(
    spec: ModelSpec, n_rows: int, width: int, answers: Sequence[Sequence[float]]
) -> None:
    """A version must answer k finite numbers per row, k its metadata's ``n_outputs``: a
    different width means the metadata and the graph disagree, and reading it anyway would be
    a wrong answer (a BackendError, so a canary falls back and takes the blame)."""
    where = f"{spec.model_name} version {spec.version}"
    if len(answers) != n_rows:
        raise BackendError(f"{where} answered {len(answers)} rows for {n_rows}", unavailable=False)
    for answer in answers:
        if len(answer) != width:
            raise BackendError(
                f"{where} answered {len(answer)} outputs per row, but its metadata.json "
                f"declares n_outputs={width} ({spec.task})",
                unavailable=False,
            )
        if not all(math.isfinite(v) for v in answer):
            raise BackendError(f"{where} answered a non-finite output", unavailable=False)


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _backend_failure(exc: BackendError) -> Exception:
    return Unavailable(str(exc)) if exc.unavailable else ModelFailed(str(exc))
