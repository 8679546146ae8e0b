"""Canary analysis: a confidence bound on (canary - stable) of the primary metric, plus guards.

Pure functions of the metrics snapshots (``VersionMetrics``) the controller last saw per arm.

The bound is on ``d``, the metric difference oriented so that ``d > 0`` means the canary is
worse. With per-example variances ``v`` and sample counts ``n`` per arm:

- ``fixed``: ``d +- z * sqrt(v_c/n_c + v_s/n_s)``, a normal interval, valid for a single look.
- ``sequential`` (default): each arm's mean gets a normal-mixture confidence sequence at
  ``alpha/2`` (Robbins; Howard et al. 2021), ``radius = sqrt((n v + rho) log((n v + rho) /
  (rho alpha^2))) / n`` with ``rho = v * min_samples`` so it is tightest near the minimum sample
  size; the two radii add (union bound). It stays valid however often the controller looks,
  which it does on every metrics update.

Per-example variances: the task's loss (log loss, cross-entropy, squared error) uses
``loss_var`` (``log_loss_var`` in the first schema) when the joiner reports it, else the
policy's ``assumed_loss_std`` squared (conservative); accuracy is Bernoulli (with the
Agresti-Coull +2/+4 correction so 0% or 100% never claim zero variance); AUC uses the
Hanley-McNeil standard error, which needs ``label_rate``.

Guards use the gateway's figures: ``error_rate`` over its ``count`` requests and
``latency_p99_ms`` with its confidence interval over ``latency_samples`` latencies. A guard whose
figures are reported for neither arm is skipped (and said to be); reported for stable but not
yet for the canary (the gateway reports every few seconds), it waits. One with fewer than
``guard_min_requests`` requests or latencies on an arm waits: the step holds (it does not
advance) and says so. With enough, a guard fails only on a bound: the canary's error rate is
above the limit at the policy's confidence (Wilson interval), its increase over stable is (an
Agresti-Caffo interval of the difference), or the low end of the canary's p99 interval is above
the limit or above the ratio times the high end of stable's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from statistics import NormalDist
from typing import Literal

from loopmesh.mesh.events import VersionMetrics
from loopmesh.rollout.policy import RolloutPolicy

Action = Literal["advance", "hold", "rollback"]


@dataclass(frozen=True)
class Operational:
    """The gateway's figures of one version over its window (``None``: not reported)."""

    error_rate: float | None = None
    requests: int = 0
    latency_p99_ms: float | None = None
    latency_samples: int = 0
    latency_p99_low_ms: float | None = None
    latency_p99_high_ms: float | None = None


@dataclass(frozen=True)
class Arm:
    """What the controller knows about one version's live behaviour."""

    version: int
    count: int = 0
    value: float | None = None
    """The primary metric over the window."""
    variance: float | None = None
    """Per-example variance of the primary metric; None when it cannot be derived."""
    error_rate: float | None = None
    latency_p99_ms: float | None = None
    measured: bool = False
    """True when a quality snapshot (joined feedback) exists for the period looked at."""
    requests: int = 0
    """Requests the gateway's error rate is over."""
    latency_samples: int = 0
    latency_p99_low_ms: float | None = None
    latency_p99_high_ms: float | None = None


@dataclass(frozen=True)
class Verdict:
    """The analysis of one step: what to do, why, and the figures behind it."""

    action: Action
    reason: str
    figures: dict[str, float] = field(default_factory=dict)
    starved: bool = False
    """True when holding only because an arm lacks samples (too little traffic)."""
    canary_only: bool = False
    """A shadow that may advance only to canary (its latency is judged on real traffic)."""


def per_example_variance(policy: RolloutPolicy, metrics: VersionMetrics) -> float | None:
    """Variance of one example's contribution to the primary metric (see module docstring)."""
    n = metrics.count
    if policy.metric in ("loss", "log_loss"):
        reported = metrics.loss_var if policy.metric == "loss" else None
        if reported is None and (policy.metric == "log_loss" or metrics.task == "binary"):
            reported = metrics.log_loss_var
        if reported is not None:
            return reported
        return policy.assumed_loss_std**2
    if policy.metric == "accuracy":
        if metrics.accuracy is None:
            return None
        p = (metrics.accuracy * n + 2.0) / (n + 4.0)
        return p * (1.0 - p)
    if metrics.auc is None or metrics.label_rate is None or n < 2:
        return None
    positives = metrics.label_rate * n
    negatives = n - positives
    if positives < 1 or negatives < 1:
        return None
    a = min(max(metrics.auc, 1e-6), 1 - 1e-6)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se2 = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (
        positives * negatives
    )
    # Expressed per example so every method can treat it as variance / n.
    return max(se2, 0.0) * n


def arm_from_metrics(
    policy: RolloutPolicy,
    version: int,
    quality: VersionMetrics | None,
    ops: Operational | None = None,
) -> Arm:
    ops = ops or Operational()
    gateway = {
        "error_rate": ops.error_rate,
        "requests": ops.requests,
        "latency_p99_ms": ops.latency_p99_ms,
        "latency_samples": ops.latency_samples,
        "latency_p99_low_ms": ops.latency_p99_low_ms,
        "latency_p99_high_ms": ops.latency_p99_high_ms,
    }
    if quality is None:
        return Arm(version, **gateway)  # type: ignore[arg-type]
    value: float | None = getattr(quality, policy.metric)
    if value is None and policy.metric == "loss" and quality.task == "binary":
        value = quality.log_loss  # a snapshot of the first schema
    return Arm(
        version=version,
        count=quality.count,
        value=value,
        variance=per_example_variance(policy, quality) if value is not None else None,
        measured=True,
        **gateway,  # type: ignore[arg-type]
    )


def fixed_radius(v_c: float, n_c: int, v_s: float, n_s: int, confidence: float) -> float:
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    return z * math.sqrt(v_c / n_c + v_s / n_s)


def sequence_radius(variance: float, n: int, alpha: float, min_samples: int) -> float:
    """Radius of a two-sided normal-mixture confidence sequence for one mean after n samples."""
    v = max(variance, 1e-12)
    rho = v * min_samples
    spread = n * v + rho
    return math.sqrt(spread * math.log(spread / (rho * alpha * alpha))) / n


def bound(policy: RolloutPolicy, canary: Arm, stable: Arm) -> tuple[float, float]:
    """``(d, radius)`` for arms that both have a value, variance and samples."""
    assert canary.value is not None and stable.value is not None
    assert canary.variance is not None and stable.variance is not None
    d = canary.value - stable.value
    if policy.higher_is_better:
        d = -d
    if policy.method == "fixed":
        radius = fixed_radius(
            canary.variance, canary.count, stable.variance, stable.count, policy.confidence
        )
    else:
        alpha = (1 - policy.confidence) / 2
        radius = sequence_radius(
            canary.variance, canary.count, alpha, policy.min_samples
        ) + sequence_radius(stable.variance, stable.count, alpha, policy.min_samples)
    return d, radius


@dataclass(frozen=True)
class Guards:
    """What the error-rate and latency guards found."""

    failures: list[str]
    """Error-rate guards that failed."""
    waiting: list[str]
    """Guards that lack evidence: the step holds until they have it."""
    skipped: list[str]
    """Guards whose figures the gateway does not report."""
    slow: list[str] = field(default_factory=list)
    """Latency guards that failed."""

    @property
    def failed(self) -> list[str]:
        return self.failures + self.slow


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson(rate: float, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion observed as ``rate`` over ``n`` trials."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def difference_low(canary: Arm, stable: Arm, z: float) -> float:
    """Low end of an Agresti-Caffo interval of (canary - stable) error rate."""
    assert canary.error_rate is not None and stable.error_rate is not None
    n_c, n_s = canary.requests + 2, stable.requests + 2
    p_c = (canary.error_rate * canary.requests + 1) / n_c
    p_s = (stable.error_rate * stable.requests + 1) / n_s
    return p_c - p_s - z * math.sqrt(p_c * (1 - p_c) / n_c + p_s * (1 - p_s) / n_s)


def guard_failures(policy: RolloutPolicy, canary: Arm, stable: Arm) -> Guards:
    """Each guard's verdict on the evidence (see the module docstring)."""
    failures: list[str] = []
    slow: list[str] = []
    waiting: list[str] = []
    skipped: list[str] = []
    need, z = policy.guard_min_requests, _z(policy.confidence)
    if canary.error_rate is None and stable.error_rate is not None:
        # The gateway reports (stable's figures are there): the canary's are yet to come.
        waiting.append("error rate guard: no gateway report for the canary yet")
    elif canary.error_rate is None:
        skipped.append("error rate")
    elif canary.requests < need:
        waiting.append(f"error rate guard: canary {canary.requests}/{need} requests")
    else:
        low, _ = wilson(canary.error_rate, canary.requests, z)
        if policy.max_error_rate is not None and low > policy.max_error_rate:
            failures.append(
                f"error rate {canary.error_rate:.2%} > limit {policy.max_error_rate:.2%} "
                f"({policy.confidence:.0%} bound >= {low:.2%}, n={canary.requests})"
            )
        if (
            policy.max_error_rate_increase is not None
            and stable.error_rate is not None
            and stable.requests >= need
            and (increase := difference_low(canary, stable, z)) > policy.max_error_rate_increase
        ):
            failures.append(
                f"error rate {canary.error_rate:.2%} vs stable {stable.error_rate:.2%} "
                f"(+{policy.max_error_rate_increase:.2%} allowed; "
                f"{policy.confidence:.0%} bound on the increase >= {increase:+.2%})"
            )
    if canary.latency_p99_ms is None and stable.latency_p99_ms is not None:
        waiting.append("latency guard: no gateway report for the canary yet")
    elif canary.latency_p99_ms is None:
        skipped.append("latency")
    elif canary.latency_samples < need or (
        policy.max_latency_ratio is not None
        and stable.latency_p99_ms is not None
        and stable.latency_samples < need
    ):
        waiting.append(
            f"latency guard: canary {canary.latency_samples}/{need}, "
            f"stable {stable.latency_samples}/{need} latencies"
        )
    else:
        p99 = canary.latency_p99_ms
        low = canary.latency_p99_low_ms if canary.latency_p99_low_ms is not None else p99
        if policy.max_latency_p99_ms is not None and low > policy.max_latency_p99_ms:
            slow.append(
                f"p99 latency {p99:.1f} ms > limit {policy.max_latency_p99_ms:.1f} ms "
                f"(95% bound >= {low:.1f} ms)"
            )
        if (
            policy.max_latency_ratio is not None
            and stable.latency_p99_ms is not None
            and stable.latency_p99_ms > 0
        ):
            # Stable's p99 as high as its interval allows (unbounded: the guard cannot fail).
            high = (
                stable.latency_p99_high_ms if stable.latency_p99_high_ms is not None else math.inf
            )
            if low > policy.max_latency_ratio * high:
                slow.append(
                    f"p99 latency {p99:.1f} ms > {policy.max_latency_ratio:g} x stable "
                    f"{stable.latency_p99_ms:.1f} ms (95% bounds: canary >= {low:.1f} ms, "
                    f"stable <= {high:.1f} ms)"
                )
    return Guards(failures, waiting, skipped, slow)


def compare(policy: RolloutPolicy, canary: Arm, stable: Arm) -> Verdict:
    """Decide one step: rollback on a failed guard or a canary confidently worse than allowed,
    advance when it is confidently no worse than allowed, else hold."""
    m = policy.metric
    figures: dict[str, float] = {"canary_count": canary.count, "stable_count": stable.count}
    for name, arm in (("canary", canary), ("stable", stable)):
        if arm.value is not None:
            figures[f"{name}_{m}"] = arm.value
        if arm.error_rate is not None:
            figures[f"{name}_error_rate"] = arm.error_rate
        if arm.latency_p99_ms is not None:
            figures[f"{name}_latency_p99_ms"] = arm.latency_p99_ms
    guards = guard_failures(policy, canary, stable)
    skipped = guards.skipped
    note = f" ({' and '.join(skipped)} guard skipped: not reported)" if skipped else ""
    if guards.failed:
        return Verdict("rollback", "guard failed: " + "; ".join(guards.failed), figures)
    return _guarded(_quality(policy, canary, stable, figures, note), guards)


def _quality(
    policy: RolloutPolicy, canary: Arm, stable: Arm, figures: dict[str, float], note: str
) -> Verdict:
    """The verdict of the primary metric's bound alone."""
    m = policy.metric
    unmeasured = [
        name for name, arm in (("canary", canary), ("stable", stable)) if not arm.measured
    ]
    if unmeasured:
        reason = f"waiting for joined-feedback metrics of {' and '.join(unmeasured)} in this step"
        return Verdict("hold", reason + note, figures, starved=True)
    need = policy.min_samples
    if canary.count < need or stable.count < need:
        reason = f"too little traffic: canary {canary.count}/{need}, stable {stable.count}/{need}"
        return Verdict("hold", reason + " joined samples" + note, figures, starved=True)
    if canary.value is None or stable.value is None:
        return Verdict("hold", f"no {m} reported yet" + note, figures, starved=True)
    if canary.variance is None or stable.variance is None:
        return Verdict("hold", f"cannot bound {m}: label_rate missing" + note, figures)
    d, radius = bound(policy, canary, stable)
    lo, hi = d - radius, d + radius
    figures.update(difference=d, lower=lo, upper=hi, tolerance=policy.max_regression)
    worse = "higher" if not policy.higher_is_better else "lower"
    summary = (
        f"{m} canary {canary.value:.4f} vs stable {stable.value:.4f}; canary worse by "
        f"{d:+.4f} ({policy.confidence:.0%} {policy.method} bound [{lo:+.4f}, {hi:+.4f}], "
        f"tolerance {policy.max_regression:g}, n={canary.count}/{stable.count})"
    )
    if lo > policy.max_regression:
        return Verdict("rollback", f"canary {m} is {worse}: {summary}{note}", figures)
    if hi <= policy.max_regression:
        return Verdict("advance", f"canary is no worse: {summary}{note}", figures)
    return Verdict("hold", f"inconclusive: {summary}{note}", figures)


def compare_shadow(
    policy: RolloutPolicy,
    shadow: VersionMetrics | None,
    ops: Operational,
    stable: Arm,
) -> Verdict:
    """Judge a shadow candidate on the requests stable answered and it scored too.

    Paired: per request the difference of the two versions' loss (or correctness), so the
    bound is on the mean of one sample of differences, whose variance is far below the sum of
    two arms' (the requests' own difficulty cancels). Sequential: one normal-mixture
    confidence sequence at the policy's confidence. ``auc`` has no per-request form: the
    shadow's AUC is compared unpaired with stable's live window.

    The guards see the shadow calls' error rate and latency against stable's requests. A
    failed error-rate guard drops the shadow. A failed latency guard does not: shadow calls
    run after the answer, beside it, on a version Triton has just loaded, so their latency
    says little about serving; such a shadow may advance to canary only, where the latency
    guard judges real traffic.
    """
    figures: dict[str, float] = {}
    arm = arm_from_metrics(policy, 0, shadow, ops)
    guards = guard_failures(policy, arm, stable)
    if guards.failures:
        return Verdict("rollback", "guard failed: " + "; ".join(guards.failures), figures)
    if shadow is None:
        return Verdict("hold", "waiting for paired metrics of the shadow", figures, starved=True)
    m = policy.metric
    n = shadow.count
    figures.update(shadow_count=n)
    if m == "auc":
        unpaired = replace(arm, version=shadow.model_version)
        return _slow(_guarded(_quality(policy, unpaired, stable, figures, ""), guards), guards)
    if m == "accuracy":
        mean, var = shadow.paired_accuracy_diff, shadow.paired_accuracy_diff_var
        d = -mean if mean is not None else None  # d > 0: the shadow is worse
    else:
        d, var = shadow.paired_loss_diff, shadow.paired_loss_diff_var
    need = policy.min_samples
    if n < need:
        reason = f"too little traffic: {n}/{need} paired samples"
        return Verdict("hold", reason, figures, starved=True)
    if d is None or var is None:
        return Verdict("hold", f"no paired {m} reported yet", figures, starved=True)
    if policy.method == "fixed":
        radius = _z(policy.confidence) * math.sqrt(max(var, 1e-12) / n)
    else:
        radius = sequence_radius(var, n, 1 - policy.confidence, need)
    lo, hi = d - radius, d + radius
    figures.update(difference=d, lower=lo, upper=hi, tolerance=policy.max_regression)
    summary = (
        f"paired {m}: shadow worse by {d:+.4f} on the same {n} requests "
        f"({policy.confidence:.0%} {policy.method} bound [{lo:+.4f}, {hi:+.4f}], "
        f"tolerance {policy.max_regression:g})"
    )
    if lo > policy.max_regression:
        return Verdict("rollback", f"shadow is worse: {summary}", figures)
    if hi <= policy.max_regression:
        verdict = Verdict("advance", f"shadow is no worse: {summary}", figures)
        return _slow(_guarded(verdict, guards), guards)
    return Verdict("hold", f"inconclusive: {summary}", figures)


def _slow(verdict: Verdict, guards: Guards) -> Verdict:
    """A shadow that failed a latency guard advances to canary only (see compare_shadow)."""
    if verdict.action != "advance" or not guards.slow:
        return verdict
    reason = f"{verdict.reason}; to canary only: {'; '.join(guards.slow)} in shadow"
    return replace(verdict, reason=reason, canary_only=True)


def _guarded(verdict: Verdict, guards: Guards) -> Verdict:
    """An advance holds while a guard still waits for evidence."""
    if verdict.action != "advance" or not guards.waiting:
        return verdict
    waiting = "; ".join(guards.waiting)
    reason = f"guards waiting for evidence ({waiting}): {verdict.reason}"
    return Verdict("hold", reason, verdict.figures, True)


@dataclass(frozen=True)
class Snapshot:
    """One metrics window of a version: when it ended, how long it was, how many samples."""

    at: datetime
    window_seconds: float
    count: int


def estimate_served(snapshots: Iterable[Snapshot]) -> int:
    """Joined requests a version served: sum of counts over non-overlapping windows.

    Windows slide, so overlapping counts must not be added twice. Walking back from the newest
    snapshot, take each one whose window ends before the previous taken one began. Exact when
    the whole rollout fits in one window; a lower bound otherwise (gaps between windows).
    """
    ordered: Sequence[Snapshot] = sorted(snapshots, key=lambda s: s.at, reverse=True)
    total = 0
    boundary: datetime | None = None
    for snap in ordered:
        if boundary is None or snap.at <= boundary:
            total += snap.count
            boundary = snap.at - timedelta(seconds=snap.window_seconds)
    return total
