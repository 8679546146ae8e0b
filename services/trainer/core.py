"""The trainer's logic, knowing no gRPC and no Kafka: triggers, one run at a time, publishing.

Adapters call in: ``agents`` after examples are stored, on live metrics and on rollout
changes; ``server`` for the RPCs. Publishing calls ``announce`` (the ModelPublished event,
given by the adapter) after the version is on disk; a version whose announcement failed or
was cut short by a crash is announced again at the next start (same event id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from services.mesh import model_repo
from services.mesh.events import ModelPublished, RolloutChanged, VersionMetrics, utcnow
from services.mesh.telemetry import tracer
from services.trainer import pipeline
from services.trainer.dataset import Dataset
from services.trainer.runs import RunHistory, RunRecord
from services.trainer.settings import TrainerScope
from services.trainer.train import FitFn
from services.trainer.train import fit as default_fit
from services.trainer.triggers import DriftDetector, TriggerInputs, TriggerPolicy

log = logging.getLogger(__name__)
_tracer = tracer("loopmesh.trainer")
Announce = Callable[[ModelPublished], Awaitable[None]]
_PUBLISHED_NAMESPACE = uuid.UUID("0d1f3f7e-51a4-4c55-8a62-7c9b3f0e2a11")


@dataclass(frozen=True)
class VersionInfo:
    version: int
    metadata: dict[str, Any]
    intact: bool
    """model.pt matches the sha256 in metadata.json."""


@dataclass(frozen=True)
class TrainerStatus:
    model_name: str
    running: RunRecord | None
    last_run: RunRecord | None
    dataset_rows: int
    new_examples: int
    stable_version: int | None
    newest_version: int | None
    drift_metric: str
    drift_best: float | None
    drift_current: float | None
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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.scope = scope
        self.model_name = scope.model_name
        self.repository = Path(repository)
        self.dataset = Dataset(scope.data_dir)
        self.history = RunHistory(scope.data_dir / "runs.jsonl")
        self._state_path = scope.data_dir / "state.json"
        self._announce = announce
        self._fit = fit
        self._clock = clock
        self.policy = TriggerPolicy(scope.triggers, scope.dataset.min_rows)
        t = scope.triggers
        self.drift = DriftDetector(t.drift_metric, t.drift_threshold or 0.0, t.drift_min_count)
        self._running: RunRecord | None = None
        self._task: asyncio.Task[RunRecord] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._last_end: float | None = None
        history = self.history.all()
        self._last_run: RunRecord | None = history[-1] if history else None
        self._rollout_stable: int | None = self._read_state().get("stable_version")
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
        return self.maybe_trigger()

    def observe_metrics(self, metrics: VersionMetrics) -> RunRecord | None:
        if metrics.model_name != self.model_name or self.scope.triggers.drift_threshold is None:
            return None
        if self.drift.observe(metrics, self.stable_version()):
            return self.maybe_trigger()
        return None

    def observe_rollout(self, event: RolloutChanged) -> None:
        if event.model_name != self.model_name or event.stable_version == self._rollout_stable:
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
            raise RuntimeError("the trainer is stopping")
        record = RunRecord(
            model_name=self.model_name,
            reasons=reasons,
            dataset_rows=self.dataset.row_count(self.model_name),
        )
        self._running = record
        if self.drift.drifted:
            self.drift.reset()  # one drift episode starts one run
        self._task = asyncio.create_task(self._run(record), name=record.run_id)
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
            drifted=self.drift.drifted,
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

    async def _run(self, record: RunRecord) -> RunRecord:
        with _tracer.start_as_current_span(
            "trainer run", attributes={"loopmesh.run_id": record.run_id}
        ) as span:
            record = await self._run_traced(record)
            span.set_attribute("loopmesh.run_status", record.status)
            if record.version is not None:
                span.set_attribute("loopmesh.model_version", record.version)
        return record

    async def _run_traced(self, record: RunRecord) -> RunRecord:
        try:
            stable, outcome = await asyncio.to_thread(self._train, record.run_id)
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
                )
                record = record.model_copy(update={"version": version})
                await self._announce_version(version, meta)
        except Exception as exc:
            log.exception("training run %s failed", record.run_id)
            record = record.model_copy(
                update={"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            )
        record = record.model_copy(update={"finished_at": utcnow()})
        await asyncio.to_thread(self.history.append, record)
        self._last_run = record
        self._last_end = self._clock()
        self._running = None
        log.info("training run %s %s: %s", record.run_id, record.status, record.decision)
        return record

    def _train(self, run_id: str) -> tuple[pipeline.StableModel | None, pipeline.RunOutcome]:
        stable = pipeline.load_stable(self.repository, self.model_name, self.stable_version())
        outcome = pipeline.run_pipeline(self.scope, self.dataset, stable, self._fit, run_id=run_id)
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
            drift_metric=self.drift.metric,
            drift_best=self.drift.best,
            drift_current=self.drift.current,
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
