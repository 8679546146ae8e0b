"""The rollout controller: drives every model's state machine; knows no gRPC and no Kafka.

Inputs arrive through ``on_published`` (ModelPublished), ``on_metrics`` (VersionMetrics), the
periodic ``tick`` and the manual commands. Every change is published (through ``Publisher``,
awaiting the broker's ack) before it takes effect in memory, so the ``rollouts`` topic is the
state: ``restore`` rebuilds it after a restart. A version is made ready in Triton (through
``Loader``) before the change that gives it traffic is published; a version that lost its
traffic is unloaded once the policy's drain time after that change has passed.

Versions published while a rollout is in progress wait as pending (the newest wins); after a
restart they are found again in the model repository (versions newer than any the model's
rollouts have dealt with), so a queued candidate survives a crash.

Only a leader acts (``leader``): its ``Publisher`` and ``Loader`` raise ``NotLeader`` once the
leadership is gone, and no change then takes effect, in memory or anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext

from loopmesh.mesh import model_repo
from loopmesh.mesh.errors import Unavailable, UnknownModel
from loopmesh.mesh.events import ModelPublished, RolloutChanged, VersionMetrics, utcnow
from loopmesh.mesh.telemetry import tracer
from loopmesh.rollout import instruments, machine
from loopmesh.rollout.analysis import Verdict, arm_from_metrics, compare, compare_shadow
from loopmesh.rollout.machine import Change, Record, Refused
from loopmesh.rollout.metrics import MetricsBook
from loopmesh.rollout.policy import PolicyBook, PolicySet, RolloutPolicy
from loopmesh.rollout.settings import RolloutScope

log = logging.getLogger(__name__)
_tracer = tracer("loopmesh.rollout")
_MAX_CHAINED = 4

__all__ = [
    "Evaluation",
    "HistoryEntry",
    "NotLeader",
    "Refused",
    "RolloutController",
    "Status",
    "UnknownModel",
]


class NotLeader(Unavailable):
    """This controller does not lead (a standby, or a leader that lost its lease or its
    partition): it must not publish or load. UNAVAILABLE, so callers retry (the leader)."""


class Publisher(Protocol):
    async def rollout_changed(self, event: RolloutChanged) -> None: ...
    async def policy_set(self, event: PolicySet) -> None: ...


class Loader(Protocol):
    async def loaded(self, model: str) -> set[int]: ...
    async def ensure(
        self, model: str, versions: set[int], expected_sha: dict[int, str] | None = None
    ) -> bool: ...


@dataclass(frozen=True)
class HistoryEntry:
    event: RolloutChanged
    figures: dict[str, float]


@dataclass(frozen=True)
class Evaluation:
    """The latest analysis of a canary, also when it changed nothing."""

    action: str
    reason: str
    figures: dict[str, float]
    at: datetime


@dataclass(frozen=True)
class Status:
    record: Record
    policy: RolloutPolicy
    evaluation: Evaluation | None
    canary_requests_estimate: int


class RolloutController:
    def __init__(
        self,
        scope: RolloutScope,
        publisher: Publisher,
        loader: Loader,
        repo: Path,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.scope = scope
        self.policies = PolicyBook(scope.default_policy, scope.policies)
        self.book = MetricsBook()
        self.records: dict[str, Record] = {}
        self.history: dict[str, deque[HistoryEntry]] = {}
        self.pending: dict[str, int] = {}
        self._publisher = publisher
        self._loader = loader
        self._repo = Path(repo)
        self._clock = clock
        self._expected_sha: dict[tuple[str, int], str] = {}
        self._published_trace: dict[tuple[str, int], SpanContext] = {}
        """Span that handled each version's ModelPublished: later steps of it link there."""
        self._seen_changes: set[str] = set()
        self._evaluations: dict[str, Evaluation] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._dirty: set[str] = set()
        self._reconciled_at: dict[str, float] = {}
        self._wake = asyncio.Event()

    # -- rebuilding ---------------------------------------------------------------------------

    def restore(
        self,
        changes: Iterable[RolloutChanged],
        policies: Iterable[PolicySet],
        published: Iterable[ModelPublished] = (),
    ) -> None:
        """Rebuild from the rollouts and policies topics (read from their beginning) and the
        retained ``models.published`` (the sha256 of versions not in a rollout yet)."""
        for event in policies:
            self.policies.apply(event)
        for announced in published:
            self._expected_sha[(announced.model_name, announced.model_version)] = announced.sha256
        for change in changes:
            if change.event_id in self._seen_changes:
                continue
            self._remember(change, {})
            self.records[change.model_name] = Record.from_event(change)
            for version, sha in change.sha256.items():
                self._expected_sha[(change.model_name, version)] = sha
        for model, record in self.records.items():
            newer = [v for v in self._versions_in_repo(model) if v > record.high_water]
            if newer:
                self.pending[model] = max(newer)
        self._dirty = set(self.records)
        log.info("restored %d rollouts, pending %s", len(self.records), self.pending)

    def _versions_in_repo(self, model: str) -> list[int]:
        try:
            return model_repo.list_versions(self._repo, model)
        except (OSError, ValueError):
            return []

    def _remember(self, event: RolloutChanged, figures: dict[str, float]) -> None:
        self._seen_changes.add(event.event_id)
        entries = self.history.setdefault(event.model_name, deque(maxlen=self.scope.history_limit))
        entries.append(HistoryEntry(event, figures))

    # -- inputs ---------------------------------------------------------------------------------

    async def on_published(self, event: ModelPublished, *_: Any) -> None:
        """A new version sits in the registry (idempotent: older or known versions are no-ops)."""
        model, version = event.model_name, event.model_version
        self._expected_sha[(model, version)] = event.sha256
        handled = trace.get_current_span().get_span_context()
        if handled.is_valid:
            self._published_trace[(model, version)] = handled
        async with self._locks[model]:
            record = self.records.get(model)
            policy = self.policies.get(model)
            if record is not None and event.preempts in record.shadows:
                why = _preemption_evidence(event)
                swap = machine.preempt_shadow(
                    record, event.preempts or 0, version, policy, self._clock(), why=why
                )
                if swap is not None:
                    await self._apply(model, swap)
                    log.info("%s v%d preempted v%d in shadow", model, version, event.preempts)
                    self._wake.set()
                    return
            change = machine.on_published(record, model, version, self._clock(), policy)
            if change is not None:
                await self._apply(model, change)
            elif record is not None and version > record.high_water:
                self.pending[model] = max(self.pending.get(model, 0), version)
                if event.preempts is not None and event.preempts == record.canary_version:
                    why = _preemption_evidence(event)
                    ended = machine.preempt(record, version, self._clock(), why=why)
                    if ended is not None:
                        await self._apply(model, ended)
                        log.info("%s v%d preempted v%d", model, version, event.preempts)
                else:
                    log.info("%s v%d queued behind the rollout in progress", model, version)
        self._wake.set()

    async def on_metrics(self, event: VersionMetrics, *_: Any) -> None:
        if self.book.record(event) and event.model_name in self.records:
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Drive every rollout on each tick and whenever an input may change a decision."""
        while not stop.is_set():
            self._wake.clear()
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.scope.tick_seconds)

    async def tick(self) -> None:
        # A model busy loading keeps its lock; the others go on without waiting for it.
        idle = [m for m in list(self.records) if not self._locks[m].locked()]
        await asyncio.gather(*(self._drive_safely(m) for m in idle))

    async def _drive_safely(self, model: str) -> None:
        try:
            async with self._locks[model]:
                await self._drive(model)
        except NotLeader as exc:
            # Leadership is going: the term is being stopped, nothing to retry here.
            log.debug("%s: not driven: %s", model, exc)
        except Exception:
            log.exception("driving the rollout of %s failed; retrying next tick", model)

    async def _drive(self, model: str) -> None:
        for _ in range(_MAX_CHAINED):
            change = self._next_change(model)
            if change is None:
                break
            await self._apply(model, change)
        await self._reconcile(model)

    def _next_change(self, model: str) -> Change | None:
        record = self.records[model]
        policy = self.policies.get(model)
        now = self._clock()
        if record.state == "candidate":
            return machine.begin_canary(record, policy, now)
        if record.state == "canary":
            verdict = self._verdict(record, policy)
            served = self.book.served(model, record.canary_version or 0)
            change = machine.evaluate(record, policy, verdict, now, served=served)
            self._note(model, record, policy, verdict, now, changed=change is not None)
            return change
        if record.state == "shadow":
            verdicts = {v: self._shadow_verdict(record, policy, v) for v in record.shadows}
            change = machine.evaluate_shadow(record, policy, verdicts, now)
            self._note_shadow(model, record, verdicts, now, changed=change is not None)
            if change is not None:
                return change
        pending = self.pending.get(model, 0)
        room = record.state == "shadow" and len(record.shadows) < policy.max_shadows
        free = not record.in_rollout and record.state != "paused"
        if (free or room) and pending > record.high_water:
            del self.pending[model]
            return machine.on_published(record, model, pending, now, policy)
        return None

    def _shadow_verdict(self, record: Record, policy: RolloutPolicy, version: int) -> Verdict:
        model, since, stable = record.model_name, record.changed_at, record.stable_version or 0
        paired = self.book.shadow(model, version, stable, since=since)
        stable_arm = arm_from_metrics(
            policy,
            stable,
            self.book.quality(model, stable, since=since),
            self.book.operational(model, stable, since=since),
        )
        return compare_shadow(
            policy, paired, self.book.operational(model, version, since=since), stable_arm
        )

    def _note_shadow(
        self,
        model: str,
        record: Record,
        verdicts: dict[int, Verdict],
        now: datetime,
        *,
        changed: bool,
    ) -> None:
        """The latest shadow analysis, one line per candidate."""
        reason = "; ".join(f"v{v}: {verdicts[v].reason}" for v in record.shadows)
        figures = {f"v{v}_{k}": x for v in record.shadows for k, x in verdicts[v].figures.items()}
        actions = {verdicts[v].action for v in record.shadows}
        action = next((a for a in ("rollback", "advance") if a in actions), "hold")
        before = self._evaluations.get(model)
        self._evaluations[model] = Evaluation(action, "shadow: " + reason, figures, now)
        if not changed and (before is None or before.reason != self._evaluations[model].reason):
            log.debug("%s shadow: %s", model, reason)

    def _verdict(self, record: Record, policy: RolloutPolicy) -> Verdict:
        model, since = record.model_name, record.changed_at
        arms = []
        for version in (record.canary_version or 0, record.stable_version or 0):
            quality = self.book.quality(model, version, since=since)
            ops = self.book.operational(model, version, since=since)
            arms.append(arm_from_metrics(policy, version, quality, ops))
        return compare(policy, arms[0], arms[1])

    def _note(
        self,
        model: str,
        record: Record,
        policy: RolloutPolicy,
        verdict: Verdict,
        now: datetime,
        *,
        changed: bool,
    ) -> None:
        reason = verdict.reason if changed else machine.hold_reason(record, policy, verdict, now)
        before = self._evaluations.get(model)
        self._evaluations[model] = Evaluation(verdict.action, reason, verdict.figures, now)
        if not changed and (before is None or before.action != verdict.action):
            log.info("%s v%s: %s", model, record.canary_version, reason)

    # -- effects --------------------------------------------------------------------------------

    async def _apply(self, model: str, change: Change) -> None:
        """Load what the change needs, publish it (acked), then make it the state."""
        record = self.records.get(model)
        with _tracer.start_as_current_span(
            "rollout change",
            attributes={"model": model, "state": change.record.state},
            links=self._origin_links(model, change),
        ):
            if change.needs_loaded:
                change = await self._load_for(model, record, change)
            # The step timer starts when traffic moves, i.e. after a load that may take a while.
            change = replace(change, record=replace(change.record, changed_at=self._clock()))
            named = (
                change.record.stable_version,
                change.record.canary_version,
                *change.record.shadows,
            )
            event = change.record.to_event().model_copy(
                update={"sha256": self._announced(model, named)}
            )
            await self._publisher.rollout_changed(event)
        self.records[model] = change.record
        instruments.record_change(event)
        self._remember(event, change.figures)
        self._dirty.add(model)
        self._reconciled_at.pop(model, None)
        self._wake.set()
        log.info(
            "%s: %s stable=%s canary=%s weight=%.3f step=%d: %s",
            model,
            event.state,
            event.stable_version,
            event.canary_version,
            event.canary_weight,
            event.step,
            event.reason,
        )

    def _origin_links(self, model: str, change: Change) -> list[Link]:
        """A change outside the trace of its version's publication (a tick, metrics, a command)
        links to it, so every step of a version is reachable from the training run's trace."""
        version = change.record.canary_version or change.record.stable_version
        origin = self._published_trace.get((model, version or 0))
        current = trace.get_current_span().get_span_context()
        if origin is None or origin.trace_id == current.trace_id:
            return []
        return [Link(origin, {"loopmesh.link": "model.published"})]

    async def _load_for(self, model: str, record: Record | None, change: Change) -> Change:
        policy = self.policies.get(model)
        want = set(change.needs_loaded)
        try:
            if record is not None:
                loaded = await self._loader.loaded(model)
                want |= machine.wanted_loaded(record, loaded, self._clock(), policy.drain_seconds)
            await self._loader.ensure(model, want, self._announced(model, want))
        except NotLeader:
            raise  # not a failed load: the rollout is the next leader's to drive
        except Exception as exc:  # any failure to load is a reason to abort, said loudly
            log.warning("%s: loading %s failed: %s", model, sorted(want), exc)
            base = record or Record(model, "aborted", self._clock())
            return machine.load_failed(base, change, str(exc), self._clock())
        return change

    def _announced(self, model: str, versions: Iterable[int | None]) -> dict[int, str]:
        """The sha256 each version's ModelPublished announced, for the versions known."""
        return {
            v: self._expected_sha[(model, v)]
            for v in versions
            if v is not None and (model, v) in self._expected_sha
        }

    async def _reconcile(self, model: str) -> None:
        """Keep Triton's loaded versions equal to what the rollout wants (see machine)."""
        since = time.monotonic() - self._reconciled_at.get(model, 0.0)
        # Dirty (just changed, or draining): once per tick at most; else every reconcile period.
        wait = self.scope.tick_seconds if model in self._dirty else self.scope.reconcile_seconds
        if since < wait:
            return
        record = self.records[model]
        policy = self.policies.get(model)
        now = self._clock()
        try:
            loaded = await self._loader.loaded(model)
            want = machine.wanted_loaded(record, loaded, now, policy.drain_seconds)
            if want != loaded:
                await self._loader.ensure(model, want, self._announced(model, want))
        except NotLeader:
            raise
        except Exception as exc:
            log.warning("%s: reconciling loaded versions failed: %s", model, exc)
            self._reconciled_at[model] = time.monotonic()
            return
        self._reconciled_at[model] = time.monotonic()
        if machine.wanted_loaded(record, set(), now, policy.drain_seconds) == want:
            self._dirty.discard(model)

    # -- manual commands and queries ------------------------------------------------------------

    async def promote(self, model: str, *, to_stable: bool, reason: str) -> Status:
        return await self._command(
            model,
            lambda r, p, now: machine.promote(r, p, now, to_stable=to_stable, why=reason),
        )

    async def rollback(self, model: str, *, reason: str) -> Status:
        def act(r: Record, p: RolloutPolicy, now: datetime) -> Change:
            served = self.book.served(model, r.canary_version or 0)
            return machine.rollback(r, p, now, why=reason, served=served)

        return await self._command(model, act)

    async def pause(self, model: str, *, reason: str) -> Status:
        return await self._command(model, lambda r, p, now: machine.pause(r, now, why=reason))

    async def resume(self, model: str, *, reason: str) -> Status:
        return await self._command(model, lambda r, p, now: machine.resume(r, now, why=reason))

    async def _command(
        self, model: str, act: Callable[[Record, RolloutPolicy, datetime], Change]
    ) -> Status:
        model_repo.validate_model_name(model)
        async with self._locks[model]:
            record = self.records.get(model)
            if record is None:
                raise UnknownModel("model_name", f"no rollout of {model}")
            await self._apply(model, act(record, self.policies.get(model), self._clock()))
        return self.status(model)

    async def set_policy(
        self, model: str, changes: dict[str, Any], *, reset: bool
    ) -> RolloutPolicy:
        """Override fields of a model's policy (validated; ValidationError names the field)."""
        model_repo.validate_model_name(model)
        policy = None if reset else self.policies.get(model).merged(changes)
        event = PolicySet(model_name=model, policy=policy)
        await self._publisher.policy_set(event)
        self.policies.apply(event)
        self._wake.set()
        return self.policies.get(model)

    def status(self, model: str) -> Status:
        record = self.records.get(model)
        if record is None:
            raise UnknownModel("model_name", f"no rollout of {model}")
        served = self.book.served(model, record.canary_version) if record.canary_version else 0
        evaluation = self._evaluations.get(model)
        return Status(record, self.policies.get(model), evaluation, served)

    def list(self, model: str | None, limit: int) -> tuple[list[Status], list[HistoryEntry]]:
        """Current rollouts and their history, newest first (``limit`` changes per model)."""
        models = [model] if model else sorted(self.records)
        if model and model not in self.records:
            raise UnknownModel("model_name", f"no rollout of {model}")
        statuses = [self.status(m) for m in models]
        history: list[HistoryEntry] = []
        for m in models:
            history.extend(list(self.history.get(m, ()))[-limit:])
        history.sort(key=lambda h: h.event.event_time, reverse=True)
        return statuses, history


def _preemption_evidence(event: ModelPublished) -> str:
    """What the trainer measured: both versions' loss on the same holdout rows."""
    ours, theirs = event.metrics.get("holdout_loss"), event.metrics.get("preempted_loss")
    if ours is None or theirs is None:
        return "it beat the canary on the same holdout rows"
    return f"holdout loss {ours:.4f} < {theirs:.4f} of v{event.preempts} on the same rows"
