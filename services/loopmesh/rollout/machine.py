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

Shadow first (a policy with ``shadow_share`` > 0): a published version joins ``shadows``
(state ``shadow``, up to ``max_shadows`` at once) instead of becoming a candidate. The gateway
scores that share of requests with it too, answering with stable only, and the analysis
compares it with stable on the same requests. A shadow that is worse, fails a guard or stays
undecided past ``shadow_timeout_seconds`` is dropped (``dropped`` once none is left): it never
answered a user. When some are confidently no worse, the best of them goes to canary, or
straight to stable when confidently better by ``shadow_promote_margin``; the others are
dropped. ``newest`` remembers the newest version dealt with, dropped ones included.
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
    shadows: tuple[int, ...] = ()
    shadow_share: float = 0.0
    newest: int = 0

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
            shadows=tuple(event.shadow_versions),
            shadow_share=event.shadow_share,
            newest=event.newest_version or 0,
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
            shadow_versions=list(self.shadows),
            shadow_share=self.shadow_share if self.shadows else 0.0,
            newest_version=self.newest or None,
            event_time=self.changed_at,
        )

    @property
    def in_rollout(self) -> bool:
        """A canary or shadows are being evaluated (maybe paused): they must stay loaded."""
        if self.shadows and self.state in ("shadow", "paused"):
            return True
        if self.canary_version is None:
            return False
        return self.state in ("candidate", "canary", "paused")

    @property
    def high_water(self) -> int:
        """The newest version this model's rollouts have dealt with."""
        return max(self.stable_version or 0, self.canary_version or 0, *self.shadows, self.newest)

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


def on_published(
    record: Record | None,
    model: str,
    version: int,
    now: datetime,
    policy: RolloutPolicy | None = None,
) -> Change | None:
    """A new version sits in the registry: first version -> stable, else into shadow (the
    policy shadows) or a candidate.

    None when the version is not newer than what the model has seen (a duplicate or a replay)
    or when a canary is in progress, shadow is full or the rollout paused (the caller keeps it
    pending).
    """
    if record is None:
        start = Record(model, "stable", now, stable_version=version)
        return Change(
            replace(start, reason=f"v{version} is the first version: stable without a canary"),
            needs_loaded=frozenset({version}),
        )
    if version <= record.high_water:
        return None
    if record.state == "shadow" and policy is not None:
        if len(record.shadows) >= policy.max_shadows:
            return None
        return _shadow(record, version, policy, now, f"v{version} published")
    if record.in_rollout or record.state == "paused":
        return None
    if record.stable_version is None:
        reason = f"v{version} published; no stable version to compare with: stable directly"
        return Change(
            _to(record, now, reason, state="stable", stable_version=version, canary_version=None),
            needs_loaded=frozenset({version}),
        )
    if policy is not None and policy.shadow_share > 0:
        return _shadow(record, version, policy, now, f"v{version} published")
    reason = f"v{version} published; loading it next to stable v{record.stable_version}"
    return Change(
        _to(record, now, reason, state="candidate", canary_version=version, canary_weight=0, step=0)
    )


def _shadow(record: Record, version: int, policy: RolloutPolicy, now: datetime, why: str) -> Change:
    """``version`` joins the shadows (loaded before the gateway is told to score it)."""
    shadows = (*record.shadows, version)
    others = f" beside v{', v'.join(map(str, record.shadows))}" if record.shadows else ""
    reason = (
        f"{why}; in shadow{others}: scored on {_pct(policy.shadow_share)} of requests next to "
        f"stable v{record.stable_version}, answering none"
    )
    fields: dict[str, object] = {
        "state": "shadow",
        "shadows": shadows,
        "shadow_share": policy.shadow_share,
        "canary_version": None,
        "canary_weight": 0.0,
        "step": 0,
        "newest": record.high_water,
    }
    loaded = {v for v in (record.stable_version, version) if v is not None}
    return Change(_to(record, now, reason, **fields), needs_loaded=frozenset(loaded))


def preempt_shadow(
    record: Record, old: int, version: int, policy: RolloutPolicy, now: datetime, *, why: str
) -> Change | None:
    """Latest wins in shadow: ``version`` beat the shadow ``old`` on the same holdout, so it
    takes its place (``old`` is dropped, having answered no user)."""
    if record.state != "shadow" or old not in record.shadows or version <= record.high_water:
        return None
    kept = replace(record, shadows=tuple(v for v in record.shadows if v != old), newest=old)
    return _shadow(kept, version, policy, now, f"v{old} preempted in shadow by v{version}: {why}")


def drop(record: Record, versions: set[int], now: datetime, reason: str) -> Change:
    """End the shadows ``versions`` (they answered no user); ``dropped`` when none is left."""
    left = tuple(v for v in record.shadows if v not in versions)
    newest = max(record.high_water, *versions)
    if left:
        return Change(_to(record, now, reason, shadows=left, newest=newest))
    return Change(
        _to(
            record,
            now,
            reason,
            state="dropped",
            shadows=(),
            canary_version=max(versions),
            canary_weight=0.0,
            step=0,
            newest=newest,
        )
    )


def evaluate_shadow(
    record: Record, policy: RolloutPolicy, verdicts: dict[int, Verdict], now: datetime
) -> Change | None:
    """Act on each shadow's paired analysis: drop one that is worse (or failed a guard);
    when some are confidently no worse, the best goes to canary (straight to stable when
    confidently better by ``shadow_promote_margin``) and the others are dropped; past the
    timeout the undecided ones are dropped."""
    if record.state != "shadow" or not record.shadows:
        return None
    for version in record.shadows:
        verdict = verdicts[version]
        if verdict.action == "rollback":
            reason = f"v{version} dropped in shadow, having answered no user: {verdict.reason}"
            return replace(drop(record, {version}, now, reason), figures=verdict.figures)
    ready = [v for v in record.shadows if verdicts[v].action == "advance"]
    if ready:
        best = min(ready, key=lambda v: (verdicts[v].figures.get("difference", 0.0), -v))
        verdict = verdicts[best]
        others = [v for v in record.shadows if v != best]
        named = ", v".join(map(str, others))
        dropped = f"; v{named} dropped (v{best} did better)" if others else ""
        upper = verdict.figures.get("upper")
        margin = policy.shadow_promote_margin
        base = replace(record, shadows=(), newest=record.high_water, changed_at=now)
        if margin is not None and upper is not None and upper < -margin and not verdict.canary_only:
            reason = (
                f"v{best} promoted to stable from shadow (was v{record.stable_version}), "
                f"better by more than {margin:g} on the same requests: {verdict.reason}{dropped}"
            )
            promoted = _to(
                base,
                now,
                reason,
                state="stable",
                stable_version=best,
                canary_version=None,
                canary_weight=0.0,
                step=0,
            )
            return Change(promoted, verdict.figures, needs_loaded=frozenset({best}))
        weight = policy.weight_at(1)
        reason = (
            f"v{best} passed shadow: canary at {_pct(weight)} (step 1/{policy.steps}): "
            f"{verdict.reason}{dropped}"
        )
        canary = _to(
            base, now, reason, state="canary", canary_version=best, canary_weight=weight, step=1
        )
        versions = {v for v in (record.stable_version, best) if v is not None}
        return Change(canary, verdict.figures, needs_loaded=frozenset(versions))
    age = (now - record.changed_at).total_seconds()
    if age >= policy.shadow_timeout_seconds:
        undecided = "; ".join(f"v{v}: {verdicts[v].reason}" for v in record.shadows)
        reason = (
            f"shadow dropped after {policy.shadow_timeout_seconds:g}s without a decision, "
            f"having answered no user: {undecided}"
        )
        return drop(record, set(record.shadows), now, reason)
    return None


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
    if target.state == "shadow":
        version = max(set(target.shadows) - set(record.shadows), default=None)
        if record.shadows and version is not None:  # the shadows already there go on
            reason = f"v{version} not shadowed: loading it failed: {error}"
            return Change(_to(record, now, reason, newest=max(record.high_water, version)))
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
            shadows=(),
            newest=max(record.high_water, version or 0),
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
    """Operator rollback: the canary loses its traffic now (or every shadow is dropped)."""
    if record.shadows and record.in_rollout:
        reason = "manual rollback: shadow dropped" + (f": {why}" if why else "")
        return drop(record, set(record.shadows), now, reason)
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
    state: RolloutState = (
        "canary" if record.step >= 1 else "shadow" if record.shadows else "candidate"
    )
    return Change(_to(record, now, "resumed" + (f": {why}" if why else ""), state=state))


def wanted_loaded(
    record: Record, loaded: set[int], now: datetime, drain_seconds: float
) -> set[int]:
    """Versions to keep loaded: those serving, plus (until the drain time after the last change)
    whatever is loaded now, so a version that just lost its traffic finishes in-flight requests.
    """
    keep = record.serving()
    if record.in_rollout:
        keep |= set(record.shadows)
    if record.state == "candidate" and record.canary_version in loaded:
        keep.add(record.canary_version)  # loaded for the next step; do not undo that
    if now < record.changed_at + timedelta(seconds=drain_seconds):
        keep |= loaded
    return keep
