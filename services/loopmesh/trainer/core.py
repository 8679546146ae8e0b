"""The trainer's logic, knowing no gRPC and no Kafka: triggers, one run at a time, publishing.

Adapters call in: ``agents`` after examples are stored (``observe_examples`` with them, for
the drift detector, then ``examples_stored``) and on rollout changes; ``server`` for the
RPCs. Publishing calls ``announce`` (the ModelPublished event, given by the adapter) after
the version is on disk; a version whose announcement failed or was cut short by a crash is
announced again at the next start (same event id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext

from loopmesh.mesh import model_repo
from loopmesh.mesh.errors import Unavailable
from loopmesh.mesh.events import LabelledExample, ModelPublished, RolloutChanged, utcnow
from loopmesh.mesh.telemetry import tracer
from loopmesh.trainer import instruments, pipeline
from loopmesh.trainer.dataset import Dataset
from loopmesh.trainer.plan import ModelPlan
from loopmesh.trainer.runs import RunHistory, RunRecord
from loopmesh.trainer.settings import TrainerScope
from loopmesh.trainer.train import FitFn
from loopmesh.trainer.train import fit as default_fit
from loopmesh.trainer.triggers import (
    DriftReport,
    LossDriftDetector,
    TriggerInputs,
    TriggerPolicy,
    example_losses,
)

log = logging.getLogger(__name__)
_tracer = tracer("loopmesh.trainer")
Announce = Callable[[ModelPublished], Awaitable[None]]
_PUBLISHED_NAMESPACE = uuid.UUID("0d1f3f7e-51a4-4c55-8a62-7c9b3f0e2a11")
_EXAMPLE_TRACES = otel_context.create_key("loopmesh.trainer.example_traces")
MAX_EXAMPLE_LINKS = 64
"""A run's span links to the trace contexts of at most this many of its newest examples."""


def with_example_traces(
    traces: Sequence[SpanContext], context: otel_context.Context | None = None
) -> otel_context.Context:
    """``context`` carrying the trace contexts of examples just stored, for ``examples_stored``
    (the sink's callback takes only a count; the causes travel in the OTel context)."""
    return otel_context.set_value(_EXAMPLE_TRACES, tuple(traces), context)


@dataclass(frozen=True)
class VersionInfo:
    version: int
    metadata: dict[str, Any]
    intact: bool
    """model.onnx (and weights.safetensors) match the sha256 in metadata.json."""


@dataclass(frozen=True)
class TrainerStatus:
    model_name: str
    running: RunRecord | None
    last_run: RunRecord | None
    dataset_rows: int
    new_examples: int
    stable_version: int | None
    newest_version: int | None
    drift_detector: str
    """``adwin`` or ``page_hinkley`` over the stable version's per-example loss; "" when off."""
    drift_examples: int
    """Examples of the stable version the detector has seen since it (re)started."""
    drift_loss: float | None
    """Their mean per-example loss."""
    last_drift: DriftReport | None
    """The latest detection: change point, detection, delay (examples and seconds)."""
    window_since: datetime | None
    """Runs train on examples predicted at or after this (the latest change point)."""
    runs_total: int


def published_event_id(model_name: str, version: int) -> str:
    return uuid.uuid5(_PUBLISHED_NAMESPACE, f"{model_name}/{version}").hex


class TrainerCore:
    """Decides when to train, runs one training at a time, publishes what passes the gate."""

    def __init__(
        self,
        scope: TrainerScope,
        repository: Path,
        *,
        announce: Announce | None = None,
        fit: FitFn = default_fit,
        plan: ModelPlan | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.scope = scope
        self.plan = plan or ModelPlan()
        self.model_name = scope.model_name
        self.repository = Path(repository)
        self.dataset = Dataset(scope.data_dir)
        self.history = RunHistory(scope.data_dir / "runs.jsonl")
        self._state_path = scope.data_dir / "state.json"
        self._announce = announce
        self._fit = fit
        self._clock = clock
        t = scope.triggers
        self.policy = TriggerPolicy(t, scope.dataset.min_rows)
        self.drift = LossDriftDetector(t) if t.drift_detector is not None else None
        self._pending_drift: DriftReport | None = None
        """A detection no run has started on yet (one drift episode starts one run)."""
        self._running: RunRecord | None = None
        self._task: asyncio.Task[RunRecord] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._last_end: float | None = None
        self._example_traces: deque[SpanContext] = deque(maxlen=MAX_EXAMPLE_LINKS)
        self._record_abandoned()
        history = self.history.all()
        self._last_run: RunRecord | None = history[-1] if history else None
        self._rollout_stable: int | None = self._read_state().get("stable_version")
        self._rollout_canary: int | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.repository.mkdir(parents=True, exist_ok=True)
        await self.reconcile()
        self._ticker = asyncio.create_task(self._tick_forever(), name="trainer-ticker")

    async def stop(self) -> None:
        """No new runs from here on; the run in progress finishes and is recorded."""
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        # A fit in a thread cannot be interrupted; let it finish and be recorded.
        await self.wait_idle()

    async def wait_idle(self) -> RunRecord | None:
        """Wait for the latest run to finish (if there was one) and return its record."""
        task = self._task
        if task is None:
            return None
        return await asyncio.shield(task)

    # -- inputs from adapters ----------------------------------------------------------------

    def examples_stored(self) -> RunRecord | None:
        traces = otel_context.get_value(_EXAMPLE_TRACES)
        if isinstance(traces, tuple):
            self._example_traces.extend(t for t in traces if isinstance(t, SpanContext))
        return self.maybe_trigger()

    def observe_examples(self, examples: Sequence[LabelledExample]) -> RunRecord | None:
        """Feed the drift detector the losses of the stored examples the stable version
        served, oldest prediction first; a run started by a detection, else None."""
        detector = self.drift
        if detector is None or not examples:
            return None
        stable = self.stable_version()
        if stable is None:
            return None
        # One stream across promotions: a new stable version rarely changes the loss level
        # much (a lower one is a drop ADWIN forgets by itself), and a detector restarted on
        # every promotion would rarely hold enough history to see a drift (SEA bench: none
        # detected with a promotion every ~1600 examples).
        detector.version = stable
        served = sorted(
            (e for e in examples if e.model_name == self.model_name and e.model_version == stable),
            key=lambda e: e.predicted_at,
        )
        detected = None
        for example, loss in zip(served, example_losses(served), strict=True):
            if loss is not None:
                detected = detector.observe(loss, example.predicted_at.timestamp()) or detected
        if detected is None:
            return None
        self._pending_drift = detected
        # The floor of every run's window from now on (see drift_floor_seconds).
        self._write_state(
            {
                "drift_floor": {
                    "change_at": detected.change_at.isoformat(),
                    "noted_at": self._clock(),
                }
            }
        )
        instruments.record_drift(self.model_name, detected)
        log.warning("%s: %s", self.model_name, detected.reason())
        return self.maybe_trigger()

    def observe_rollout(self, event: RolloutChanged) -> None:
        if event.model_name != self.model_name:
            return
        self._rollout_canary = challenged_version(event)
        if event.stable_version == self._rollout_stable:
            return
        self._rollout_stable = event.stable_version
        self._write_state({"stable_version": event.stable_version})

    # -- triggering --------------------------------------------------------------------------

    def maybe_trigger(self) -> RunRecord | None:
        """Start a run if a trigger is due and none is running; the started run or None."""
        if self._running is not None or self._closed:
            return None
        reasons = self.policy.due(self._trigger_inputs())
        if not reasons:
            return None
        return self.trigger(reasons)[1]

    def trigger(self, reasons: list[str]) -> tuple[bool, RunRecord]:
        """Start a run now; (False, the running one) if one is already in progress."""
        if self._running is not None:
            return False, self._running
        if self._closed:
            raise Unavailable("the trainer is stopping")
        record = RunRecord(
            model_name=self.model_name,
            reasons=reasons,
            dataset_rows=self.dataset.row_count(self.model_name),
            drift=self._pending_drift,
            data_since=self.window_since(),
        )
        self._running = record
        # Remembered on disk until the run is recorded: a process killed mid-run leaves it
        # here, and the next start records that run as failed instead of forgetting it.
        self._write_state({"running": record.model_dump(mode="json")})
        self._pending_drift = None  # one drift episode starts one run (the detector restarted)
        links = self._run_links()
        self._task = asyncio.create_task(self._run(record, links), name=record.run_id)
        log.info("training run %s started: %s", record.run_id, "; ".join(reasons))
        return True, record

    def _trigger_inputs(self) -> TriggerInputs:
        total = self.dataset.row_count(self.model_name)
        last = self._last_run
        newest = self.newest_version()
        age = None
        if newest is not None:
            created = model_repo.read_metadata(self.repository, self.model_name, newest).get(
                "created_at"
            )
            if isinstance(created, str):
                age = (utcnow() - datetime.fromisoformat(created)).total_seconds()
        return TriggerInputs(
            new_examples=total - (last.dataset_rows if last else 0),
            total_examples=total,
            drift=self._pending_drift,
            newest_version_age=age,
            since_last_run=None if self._last_end is None else self._clock() - self._last_end,
        )

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.scope.triggers.check_interval_seconds)
            try:
                self.maybe_trigger()
            except Exception:
                log.exception("trigger check failed")

    # -- one run -----------------------------------------------------------------------------

    def _run_links(self) -> list[Link]:
        """What caused a run: the current span (RPC, stored batch, tick) and the newest examples
        stored since the last run. Many causes, so links; the run starts a trace of its own."""
        links = []
        cause = trace.get_current_span().get_span_context()
        if cause.is_valid:
            links.append(Link(cause, {"loopmesh.link": "trigger"}))
        links.extend(Link(t, {"loopmesh.link": "example"}) for t in self._example_traces)
        self._example_traces.clear()
        return links

    async def _run(self, record: RunRecord, links: Sequence[Link] = ()) -> RunRecord:
        # ModelPublished goes out inside this span: the rollout continues the run's trace.
        with _tracer.start_as_current_span(
            "trainer run",
            context=otel_context.Context(),
            links=links,
            attributes={"loopmesh.run_id": record.run_id},
        ) as span:
            record = await self._run_traced(record)
            span.set_attribute("loopmesh.run_status", record.status)
            if record.version is not None:
                span.set_attribute("loopmesh.model_version", record.version)
        return record

    async def _run_traced(self, record: RunRecord) -> RunRecord:
        try:
            stable, outcome = await asyncio.to_thread(self._train, record.run_id, record.data_since)
            decision = outcome.decision
            record = record.model_copy(
                update={
                    "status": "published" if decision.accepted else "rejected",
                    "train_rows": outcome.train_rows,
                    "validation_rows": outcome.validation_rows,
                    "holdout_rows": outcome.holdout_rows,
                    "feature_names": outcome.feature_names,
                    "candidate": decision.candidate.as_dict(),
                    "reference": decision.reference.as_dict(),
                    "reference_kind": decision.reference_kind,
                    "reference_version": stable.version if stable else None,
                    "decision": decision.reason,
                    "warm_started": outcome.warm_started,
                    "epochs": outcome.epochs,
                    "device": outcome.device,
                    "train_seconds": outcome.train_seconds,
                    "data_from": outcome.data_from,
                    "data_to": outcome.data_to,
                }
            )
            if decision.accepted and outcome.payload is not None:
                version, meta = await asyncio.to_thread(
                    pipeline.publish_files,
                    self.repository,
                    self.model_name,
                    outcome.payload,
                    outcome.metadata,
                    backend=self.scope.triton_backend,
                )
                record = record.model_copy(update={"version": version})
                await self._announce_version(version, meta)
        except Exception as exc:
            log.exception("training run %s failed", record.run_id)
            record = record.model_copy(
                update={"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            )
        record = record.model_copy(update={"finished_at": utcnow()})
        instruments.record_run(record)
        await asyncio.to_thread(self.history.append, record)
        self._write_state({"running": None})
        self._last_run = record
        self._last_end = self._clock()
        self._running = None
        log.info("training run %s %s: %s", record.run_id, record.status, record.decision)
        return record

    def _train(
        self, run_id: str, since: datetime | None = None
    ) -> tuple[pipeline.StableModel | None, pipeline.RunOutcome]:
        stable = pipeline.load_stable(self.repository, self.model_name, self.stable_version())
        canary = self._rollout_canary
        challenged = (
            pipeline.load_stable(self.repository, self.model_name, canary)
            if canary is not None and (stable is None or canary != stable.version)
            else None
        )
        outcome = pipeline.run_pipeline(
            self.scope,
            self.dataset,
            stable,
            self._fit,
            run_id=run_id,
            plan=self.plan,
            challenged=challenged,
            since=since,
        )
        return stable, outcome

    async def _announce_version(self, version: int, meta: dict[str, Any]) -> None:
        if self._announce is None:
            return
        metrics = {
            k: float(v)
            for k, v in (meta.get("metrics") or {}).items()
            if isinstance(v, int | float)
        }
        event = ModelPublished(
            event_id=published_event_id(self.model_name, version),
            model_name=self.model_name,
            model_version=version,
            parent_version=meta.get("parent_version"),
            sha256=meta["sha256"],
            metrics=metrics,
            feature_names=list(meta.get("feature_names") or []),
            preempts=meta.get("preempts"),
        )
        try:
            await self._announce(event)
        except Exception:
            # The version is on disk; the next start announces it again.
            log.exception("announcing %s version %d failed", self.model_name, version)
            self._write_state({"unannounced": sorted({*self._unannounced(), version})})
            return
        if version in self._unannounced():
            self._write_state({"unannounced": sorted(set(self._unannounced()) - {version})})

    def _record_abandoned(self) -> None:
        """Record the run a killed process left unfinished: published if its version made it
        to the repository (the rename is atomic), else failed."""
        left = self._read_state().get("running")
        if not left:
            return
        record: RunRecord | None
        try:
            record = RunRecord.model_validate(left)
        except ValueError:
            log.warning("unreadable unfinished run in %s ignored", self._state_path)
            record = None
        if record is not None and all(r.run_id != record.run_id for r in self.history.all()):
            update: dict[str, Any] = {
                "status": "failed",
                "error": "abandoned: the trainer stopped before the run finished",
                "finished_at": utcnow(),
            }
            for version in model_repo.list_versions(self.repository, self.model_name):
                meta = model_repo.read_metadata(self.repository, self.model_name, version)
                if meta.get("run_id") == record.run_id:
                    update.update(status="published", version=version, error="")
                    update["decision"] = "published before the trainer stopped"
                    # Its announcement may have been cut short too: ``reconcile`` sends it
                    # (again; the event id is the same, so consumers see it once).
                    self._write_state({"unannounced": sorted({*self._unannounced(), version})})
            record = record.model_copy(update=update)
            self.history.append(record)
            log.warning(
                "training run %s was cut short: recorded as %s", record.run_id, record.status
            )
        self._write_state({"running": None})

    async def reconcile(self) -> None:
        """Announce versions this trainer wrote that have no successful announcement."""
        announced = {r.version for r in self.history.all() if r.status == "published"}
        pending = set(self._unannounced())
        for version in model_repo.list_versions(self.repository, self.model_name):
            meta = model_repo.read_metadata(self.repository, self.model_name, version)
            if not meta.get("run_id"):
                continue  # not written by a trainer
            if version in pending or version not in announced:
                await self._announce_version(version, meta)

    # -- queries -----------------------------------------------------------------------------

    def stable_version(self) -> int | None:
        """The rollout's stable version when known and present, else the newest version."""
        versions = model_repo.list_versions(self.repository, self.model_name)
        if self._rollout_stable in versions:
            return self._rollout_stable
        return versions[-1] if versions else None

    def window_since(self) -> datetime | None:
        """The floor of a run's window: the latest drift's change point, until
        ``triggers.drift_floor_seconds`` after its detection; None: no floor."""
        floor = self._read_state().get("drift_floor")
        if not isinstance(floor, dict):
            return None
        try:
            since = datetime.fromisoformat(str(floor["change_at"])).astimezone(UTC)
            noted = float(floor["noted_at"])
        except (KeyError, TypeError, ValueError):
            return None
        limit = self.scope.triggers.drift_floor_seconds
        if limit is not None and self._clock() - noted > limit:
            return None
        return since

    def newest_version(self) -> int | None:
        versions = model_repo.list_versions(self.repository, self.model_name)
        return versions[-1] if versions else None

    def last_run(self) -> RunRecord | None:
        return self._last_run

    def runs(self, limit: int | None = None) -> list[RunRecord]:
        """Runs newest first, the one in progress (if any) at the top."""
        records = list(reversed(self.history.all()))
        if self._running is not None:
            records.insert(0, self._running)
        return records[:limit] if limit else records

    def versions(self) -> list[VersionInfo]:
        out = []
        for version in model_repo.list_versions(self.repository, self.model_name):
            out.append(
                VersionInfo(
                    version=version,
                    metadata=model_repo.read_metadata(self.repository, self.model_name, version),
                    intact=model_repo.verify_sha256(self.repository, self.model_name, version),
                )
            )
        return out

    def status(self) -> TrainerStatus:
        inputs = self._trigger_inputs()
        history = self.history.all()
        return TrainerStatus(
            model_name=self.model_name,
            running=self._running,
            last_run=history[-1] if history else None,
            dataset_rows=inputs.total_examples,
            new_examples=inputs.new_examples,
            stable_version=self.stable_version(),
            newest_version=self.newest_version(),
            drift_detector=self.drift.kind if self.drift is not None else "",
            drift_examples=self.drift.seen if self.drift is not None else 0,
            drift_loss=self.drift.mean_loss if self.drift is not None else None,
            last_drift=self.drift.last if self.drift is not None else None,
            window_since=self.window_since(),
            runs_total=len(history),
        )

    # -- state file --------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self._state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_state(self, update: dict[str, Any]) -> None:
        state = {**self._read_state(), **update}
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, sort_keys=True))
        tmp.replace(self._state_path)

    def _unannounced(self) -> list[int]:
        return [int(v) for v in self._read_state().get("unannounced", [])]


def challenged_version(event: RolloutChanged) -> int | None:
    """The candidate a newer version may preempt (latest wins), judged on the same holdout
    rows: the canary, or in shadow the newest shadow (the one it replaces when shadow is full)."""
    if event.state == "shadow" and event.shadow_versions:
        return max(event.shadow_versions)
    if event.state in ("candidate", "canary") and event.canary_version:
        return event.canary_version
    return None
