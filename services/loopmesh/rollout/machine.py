"""The rollout state machine of docs/architecture.md, as pure functions of (record, input, now).

``candidate -> canary(w1) -> ... -> canary(wn) -> stable``, or ``rolled_back`` / ``aborted``
from any step, with ``paused`` freezing the weights in between. A ``Record`` is exactly what a
``RolloutChanged`` event carries, so the controller's state is rebuilt from the ``rollouts``
topic alone; ``changed_at`` (the event time of the last change) starts the step timer, which
is why a restarted controller continues a step where it was.

Steps are numbered: 0 is the candidate (loaded, no traffic), 1..n the canary weights of the
policy. A rolled-back or aborted record keeps the step it failed at and the failed version as
``canary_version`` with weight 0 (next to the stable version that serves), so the newest
version the model has dealt with is known and is not rolled out again.
Functions return a ``Change`` (the next record, its reason and figures) or None; manual
commands that do not apply raise ``Refused``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from loopmesh.mesh.errors import FailedPrecondition
from loopmesh.mesh.events import RolloutChanged, RolloutState
from loopmesh.rollout.analysis import Verdict
from loopmesh.rollout.policy import RolloutPolicy


class Refused(FailedPrecondition):
    """A manual command that does not apply to the rollout's current state."""


@dataclass(frozen=True)
class Record:
    """The rollout state of one model (the content of its latest RolloutChanged)."""

    model_name: str
    state: RolloutState
    changed_at: datetime
    stable_version: int | None = None
    canary_version: int | None = None
    canary_weight: float = 0.0
    step: int = 0
    reason: str = ""

    @classmethod
    def from_event(cls, event: RolloutChanged) -> Record:
        return cls(
            model_name=event.model_name,
            state=event.state,
            changed_at=event.event_time,
            stable_version=event.stable_version,
            canary_version=event.canary_version,
            canary_weight=event.canary_weight,
            step=event.step,
            reason=event.reason,
        )

    def to_event(self) -> RolloutChanged:
        return RolloutChanged(
            model_name=self.model_name,
            stable_version=self.stable_version,
            canary_version=self.canary_version,
            canary_weight=self.canary_weight,
            state=self.state,
            step=self.step,
            reason=self.reason,
            event_time=self.changed_at,
        )

    @property
    def in_rollout(self) -> bool:
        """A canary is being evaluated (maybe paused): its version must stay loaded."""
        if self.canary_version is None:
            return False
        return self.state in ("candidate", "canary", "paused")

    @property
    def high_water(self) -> int:
        """The newest version this model's rollouts have dealt with."""
        return max(self.stable_version or 0, self.canary_version or 0)

    def serving(self) -> set[int]:
        """Versions that may receive traffic now (must be loaded)."""
        versions = {self.stable_version} if self.stable_version is not None else set()
        if self.in_rollout and self.state != "candidate" and self.canary_version is not None:
            versions.add(self.canary_version)
        return versions


@dataclass(frozen=True)
class Change:
    """A transition: the next record and why, plus what must be loaded before it is announced."""

    record: Record
    figures: dict[str, float] = field(default_factory=dict)
    needs_loaded: frozenset[int] = frozenset()
    """Versions that must be ready in Triton before the change is published (else abort)."""


def _to(record: Record, now: datetime, reason: str, **fields: object) -> Record:
    return replace(record, changed_at=now, reason=reason, **fields)  # type: ignore[arg-type]


def _pct(weight: float) -> str:
    return f"{weight:.0%}" if weight >= 0.01 else f"{weight:.1%}"


def on_published(record: Record | None, model: str, version: int, now: datetime) -> Change | None:
    """A new version sits in the registry: first version -> stable, else start a candidate.

    None when the version is not newer than what the model has seen (a duplicate or a replay)
    or when a rollout is in progress or paused (the caller keeps it pending).
    """
    if record is None:
        start = Record(model, "stable", now, stable_version=version)
        return Change(
            replace(start, reason=f"v{version} is the first version: stable without a canary"),
            needs_loaded=frozenset({version}),
        )
    if version <= record.high_water or record.in_rollout or record.state == "paused":
        return None
    if record.stable_version is None:
        reason = f"v{version} published; no stable version to compare with: stable directly"
        return Change(
            _to(record, now, reason, state="stable", stable_version=version, canary_version=None),
            needs_loaded=frozenset({version}),
        )
    reason = f"v{version} published; loading it next to stable v{record.stable_version}"
    return Change(
        _to(record, now, reason, state="candidate", canary_version=version, canary_weight=0, step=0)
    )


def preempt(record: Record, version: int, now: datetime, *, why: str) -> Change | None:
    """Latest wins: ``version`` beat the candidate in rollout on the same holdout, so that
    rollout ends (aborted, its canary loses its traffic) and ``version`` goes next."""
    if not record.in_rollout or record.state == "paused" or version <= record.high_water:
        return None
    reason = (
        f"v{record.canary_version} preempted at step {record.step} "
        f"({_pct(record.canary_weight)}) by v{version}: {why}"
    )
    return Change(_end(record, now, "aborted", reason))


def load_failed(record: Record, change: Change, error: str, now: datetime) -> Change:
    """The versions ``change`` needed could not be loaded: abort that version, keep stable.

    Without a stable version the failed one is named in the reason only: a gateway routes a
    lone ``canary_version`` even at weight 0, and this one is not loaded.
    """
    target = change.record
    version = target.canary_version if target.state != "stable" else target.stable_version
    stable = record.stable_version
    reason = f"aborted: loading v{version} failed: {error}"
    return Change(
        _to(
            record,
            now,
            reason,
            state="aborted",
            stable_version=stable,
            canary_version=version if stable is not None else None,
            canary_weight=0.0,
        )
    )


def begin_canary(record: Record, policy: RolloutPolicy, now: datetime) -> Change:
    """candidate -> canary at the first weight, once the candidate is loaded."""
    weight = policy.weight_at(1)
    reason = f"v{record.canary_version} loaded; canary at {_pct(weight)} (step 1/{policy.steps})"
    versions = {v for v in (record.stable_version, record.canary_version) if v is not None}
    return Change(
        _to(record, now, reason, state="canary", step=1, canary_weight=weight),
        needs_loaded=frozenset(versions),
    )


def advance(record: Record, policy: RolloutPolicy, now: datetime, why: str) -> Change:
    """Next canary step, or stable after the last one."""
    if record.step >= policy.steps:
        reason = f"v{record.canary_version} promoted to stable (was v{record.stable_version}): "
        return Change(
            _to(
                record,
                now,
                reason + why,
                state="stable",
                stable_version=record.canary_version,
                canary_version=None,
                canary_weight=0.0,
                step=0,
            )
        )
    step = record.step + 1
    weight = policy.weight_at(step)
    reason = f"canary v{record.canary_version} at {_pct(weight)} (step {step}/{policy.steps}): "
    return Change(_to(record, now, reason + why, state="canary", step=step, canary_weight=weight))


def _end(record: Record, now: datetime, state: RolloutState, reason: str) -> Record:
    return _to(record, now, reason, state=state, canary_weight=0.0)


def evaluate(
    record: Record,
    policy: RolloutPolicy,
    verdict: Verdict,
    now: datetime,
    *,
    served: int,
) -> Change | None:
    """Act on a canary's analysis: roll back, advance after the minimum step time, or hold
    until the step timeout and then abort with the reason. ``served`` is the canary's
    estimated request count, reported when the rollout ends."""
    if record.state != "canary":
        return None
    age = (now - record.changed_at).total_seconds()
    figures = {**verdict.figures, "step_seconds": age, "canary_requests_estimate": served}
    at = f"at step {record.step}/{policy.steps} ({_pct(record.canary_weight)})"
    served_note = f"; canary served ~{served} requests (joined feedback, from metrics counts)"
    if verdict.action == "rollback":
        reason = f"v{record.canary_version} rolled back {at}: {verdict.reason}{served_note}"
        return Change(_end(record, now, "rolled_back", reason), figures)
    if verdict.action == "advance" and age >= policy.min_step_seconds:
        return Change(advance(record, policy, now, verdict.reason).record, figures)
    if age >= policy.step_timeout_seconds:
        kind = "too little traffic" if verdict.starved else "no decision"
        why = verdict.reason if verdict.reason.startswith(kind) else f"{kind}: {verdict.reason}"
        reason = (
            f"v{record.canary_version} aborted {at} after {policy.step_timeout_seconds:g}s "
            f"without a decision: {why}{served_note}"
        )
        return Change(_end(record, now, "aborted", reason), figures)
    return None


def hold_reason(record: Record, policy: RolloutPolicy, verdict: Verdict, now: datetime) -> str:
    """What a held canary waits for, including when the step will time out."""
    age = (now - record.changed_at).total_seconds()
    if verdict.action == "advance":
        left = policy.min_step_seconds - age
        return f"no worse so far; minimum step time {left:.0f}s to go: {verdict.reason}"
    left = policy.step_timeout_seconds - age
    return f"holding: {verdict.reason}; aborting in {max(left, 0):.0f}s without a decision"


# -- manual commands --------------------------------------------------------------------------


def promote(
    record: Record, policy: RolloutPolicy, now: datetime, *, to_stable: bool, why: str
) -> Change:
    """Operator promotion: next step (or straight to stable), skipping the analysis."""
    if record.canary_version is None or not record.in_rollout or record.step < 1:
        raise Refused(f"{record.model_name} has no canary serving traffic ({record.state})")
    note = f"manual promote: {why}" if why else "manual promote"
    if to_stable:
        record = replace(record, step=policy.steps)
    return advance(replace(record, step=min(record.step, policy.steps)), policy, now, note)


def rollback(
    record: Record, policy: RolloutPolicy, now: datetime, *, why: str, served: int
) -> Change:
    """Operator rollback: the canary loses its traffic now."""
    if record.canary_version is None or not record.in_rollout:
        raise Refused(f"{record.model_name} has no rollout in progress ({record.state})")
    reason = (
        f"v{record.canary_version} rolled back at step {record.step}/{policy.steps} "
        f"({_pct(record.canary_weight)}): manual rollback" + (f": {why}" if why else "")
    )
    reason += f"; canary served ~{served} requests (joined feedback, from metrics counts)"
    figures: dict[str, float] = {"canary_requests_estimate": served}
    return Change(_end(record, now, "rolled_back", reason), figures)


def pause(record: Record, now: datetime, *, why: str) -> Change:
    """Freeze a rollout: the canary keeps its weight but is not judged and cannot time out."""
    if record.state == "paused":
        raise Refused(f"{record.model_name} is already paused")
    if not record.in_rollout:
        raise Refused(f"{record.model_name} has no rollout in progress ({record.state})")
    return Change(_to(record, now, "paused" + (f": {why}" if why else ""), state="paused"))


def resume(record: Record, now: datetime, *, why: str) -> Change:
    """Back to the step the pause froze; the step timer restarts now."""
    if record.state != "paused":
        raise Refused(f"{record.model_name} is not paused ({record.state})")
    state: RolloutState = "canary" if record.step >= 1 else "candidate"
    return Change(_to(record, now, "resumed" + (f": {why}" if why else ""), state=state))


def wanted_loaded(
    record: Record, loaded: set[int], now: datetime, drain_seconds: float
) -> set[int]:
    """Versions to keep loaded: those serving, plus (until the drain time after the last change)
    whatever is loaded now, so a version that just lost its traffic finishes in-flight requests.
    """
    keep = record.serving()
    if record.state == "candidate" and record.canary_version in loaded:
        keep.add(record.canary_version)  # loaded for the next step; do not undo that
    if now < record.changed_at + timedelta(seconds=drain_seconds):
        keep |= loaded
    return keep
