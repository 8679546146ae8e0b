"""Operational figures per model version over a sliding window: request count, error rate, p99.

The gateway records every call that reached a version (``Predict`` scoring or ``ModelInfer``)
with its latency and whether it failed server-side (Triton unavailable, the model failed; a
client's bad or unknown request is not the version's fault and is not recorded). Every
publish interval, ``snapshot`` gives one ``OperationalFigures`` per version that had requests
within the last ``window_s`` seconds; the gateway turns them into ``VersionMetrics`` on
``metrics.live`` for the rollout controller's error-rate and latency guards.

Memory is bounded whatever the request rate: counts and failures are kept in time buckets
(``window_s / buckets`` wide, so a request leaves the count at most one bucket late), and
latencies in a ring of the newest ``max_samples`` per version (the p99 of a busier window is
the p99 of its newest ``max_samples`` requests). Pure: the clock is ``time.monotonic`` unless
given.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist

from loopmesh.mesh.events import Task, VersionMetrics


@dataclass(frozen=True, slots=True)
class OperationalFigures:
    """What one version did within the window."""

    model_name: str
    model_version: int
    count: int
    error_rate: float
    latency_p99_ms: float | None
    """None when the window's latencies have all left it (its count lags by one bucket)."""
    latency_samples: int = 0
    latency_p99_low_ms: float | None = None
    latency_p99_high_ms: float | None = None
    """A 95% confidence interval of the p99 (``quantile_bounds``); high is None when the
    window holds too few latencies to bound it from above."""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank ``q``-quantile (0 < q <= 1) of non-empty ``values``: an observed value."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


P99_CONFIDENCE = 0.95


def quantile_bounds(
    values: list[float], q: float, confidence: float = P99_CONFIDENCE
) -> tuple[float, float | None]:
    """A distribution-free confidence interval of the ``q``-quantile: order statistics whose
    ranks bracket the binomial count of values below it (normal approximation). The upper
    end is None when its rank lies beyond the sample (too few values to bound it)."""
    ordered = sorted(values)
    n = len(ordered)
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    spread = z * math.sqrt(n * q * (1 - q))
    low_rank = max(1, math.floor(n * q - spread))
    high_rank = math.ceil(n * q + spread) + 1
    return ordered[low_rank - 1], ordered[high_rank - 1] if high_rank <= n else None


@dataclass(slots=True)
class _Bucket:
    index: int
    count: int = 0
    failures: int = 0


@dataclass(slots=True)
class _VersionWindow:
    buckets: deque[_Bucket] = field(default_factory=deque)
    latencies: deque[tuple[float, float]] = field(default_factory=deque)


class OperationalWindows:
    """Sliding windows of (time, failed, latency) per (model, version)."""

    def __init__(
        self,
        window_s: float,
        *,
        buckets: int = 60,
        max_samples: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_s <= 0 or buckets < 1 or max_samples < 1:
            raise ValueError("window_s, buckets and max_samples must be positive")
        self.window_s = window_s
        self._bucket_s = window_s / buckets
        self._max_samples = max_samples
        self._clock = clock
        self._versions: dict[tuple[str, int], _VersionWindow] = {}

    def record(
        self,
        model_name: str,
        version: int,
        *,
        failed: bool,
        latency_ms: float,
        at: float | None = None,
    ) -> None:
        """One finished call to ``version``; ``at`` is a ``clock`` reading (default: now)."""
        self.record_many(
            model_name, version, count=1, failures=int(failed), latencies_ms=[latency_ms], at=at
        )

    def record_many(
        self,
        model_name: str,
        version: int,
        *,
        count: int,
        failures: int,
        latencies_ms: list[float],
        at: float | None = None,
    ) -> None:
        """``count`` finished calls (``failures`` of them failed) with some of their latencies,
        as the data plane reports them every drain."""
        if count <= 0:
            return
        now = self._clock() if at is None else at
        window = self._versions.get((model_name, version))
        if window is None:
            window = self._versions[(model_name, version)] = _VersionWindow(
                latencies=deque(maxlen=self._max_samples)
            )
        index = math.floor(now / self._bucket_s)
        if not window.buckets or window.buckets[-1].index < index:
            window.buckets.append(_Bucket(index))
        # A reading older than the newest bucket (clock read before a concurrent record) is
        # counted in the newest one: at most one bucket off, and the deque stays ordered.
        bucket = window.buckets[-1]
        bucket.count += count
        bucket.failures += failures
        window.latencies.extend(
            (now, latency) for latency in latencies_ms if math.isfinite(latency) and latency >= 0
        )

    def snapshot(self, now: float | None = None) -> list[OperationalFigures]:
        """Figures of every version with requests in the window; expired data is dropped."""
        now = self._clock() if now is None else now
        start = now - self.window_s
        out = []
        for key in sorted(self._versions):
            window = self._versions[key]
            # A bucket leaves once all of its span is older than the window.
            while window.buckets and (window.buckets[0].index + 1) * self._bucket_s <= start:
                window.buckets.popleft()
            while window.latencies and window.latencies[0][0] <= start:
                window.latencies.popleft()
            count = sum(b.count for b in window.buckets)
            if count == 0:
                del self._versions[key]
                continue
            failures = sum(b.failures for b in window.buckets)
            latencies = [latency for _, latency in window.latencies]
            low, high = quantile_bounds(latencies, 0.99) if latencies else (None, None)
            out.append(
                OperationalFigures(
                    model_name=key[0],
                    model_version=key[1],
                    count=count,
                    error_rate=failures / count,
                    latency_p99_ms=percentile(latencies, 0.99) if latencies else None,
                    latency_samples=len(latencies),
                    latency_p99_low_ms=low,
                    latency_p99_high_ms=high,
                )
            )
        return out


def to_events(
    figures: list[OperationalFigures],
    window_s: float,
    task_of: Callable[[str, int], Task] | None = None,
) -> list[VersionMetrics]:
    """One ``VersionMetrics`` per version: operational figures only, quality fields None;
    ``task_of`` names each version's task (binary when not given)."""
    return [
        VersionMetrics(
            model_name=f.model_name,
            model_version=f.model_version,
            window_seconds=window_s,
            count=f.count,
            task=task_of(f.model_name, f.model_version) if task_of is not None else "binary",
            error_rate=f.error_rate,
            latency_p99_ms=f.latency_p99_ms,
            latency_samples=f.latency_samples,
            latency_p99_low_ms=f.latency_p99_low_ms,
            latency_p99_high_ms=f.latency_p99_high_ms,
        )
        for f in figures
    ]
