"""The latest live metrics per model version, as read from ``metrics.live``.

Two producers write ``VersionMetrics``: the trainer's joiner (quality over joined feedback:
count, the task's loss and its variance, log_loss, accuracy, auc, mae, label_rate) and the
inference gateway (error_rate, latency_p99_ms). They are kept apart so one does not hide the
other: the newest snapshot carrying a quality figure (or none of the gateway's) is the
version's quality snapshot; the newest non-missing error_rate and latency_p99_ms are its
operational figures. Older or repeated snapshots (replays after a restart) are ignored.
The joiner's figures of a shadow candidate (``shadow_of`` set: paired with the version that
answered) are kept apart again, by the version they were paired with.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime

from loopmesh.mesh.events import VersionMetrics
from loopmesh.rollout.analysis import Operational, Snapshot, estimate_served

_SEEN_IDS = 50_000
_SNAPSHOTS_PER_VERSION = 2_000


@dataclass
class VersionLive:
    """What is known of one version."""

    quality: VersionMetrics | None = None
    error_rate: tuple[datetime, VersionMetrics] | None = None
    """The newest gateway snapshot with an error rate (and its request count)."""
    latency_p99_ms: tuple[datetime, VersionMetrics] | None = None
    """The newest gateway snapshot with a p99 (and its interval and sample count)."""
    windows: deque[Snapshot] = field(default_factory=lambda: deque(maxlen=_SNAPSHOTS_PER_VERSION))
    shadow: dict[int, VersionMetrics] = field(default_factory=dict)
    """The newest paired snapshot by the version it was paired with (``shadow_of``)."""


def is_quality(event: VersionMetrics) -> bool:
    if any(v is not None for v in (event.loss, event.log_loss, event.accuracy, event.auc)):
        return True
    return event.error_rate is None and event.latency_p99_ms is None


class MetricsBook:
    """Latest metrics per (model, version); idempotent by event id and by event time."""

    def __init__(self) -> None:
        self._live: dict[tuple[str, int], VersionLive] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()

    def record(self, event: VersionMetrics) -> bool:
        """Fold ``event`` in; False when it was already seen or is older than what is known."""
        if event.event_id in self._seen:
            return False
        self._seen[event.event_id] = None
        if len(self._seen) > _SEEN_IDS:
            self._seen.popitem(last=False)
        live = self._live.setdefault((event.model_name, event.model_version), VersionLive())
        changed = False
        at = event.event_time
        if event.shadow_of is not None:
            before = live.shadow.get(event.shadow_of)
            if before is None or at > before.event_time:
                live.shadow[event.shadow_of] = event
                return True
            return False
        if is_quality(event) and (live.quality is None or at > live.quality.event_time):
            live.quality = event
            live.windows.append(Snapshot(at, event.window_seconds, event.count))
            changed = True
        if event.error_rate is not None and (live.error_rate is None or at > live.error_rate[0]):
            live.error_rate = (at, event)
            changed = True
        if event.latency_p99_ms is not None and (
            live.latency_p99_ms is None or at > live.latency_p99_ms[0]
        ):
            live.latency_p99_ms = (at, event)
            changed = True
        return changed

    def quality(self, model: str, version: int, *, since: datetime) -> VersionMetrics | None:
        """The newest quality snapshot measured at or after ``since`` (None if there is none)."""
        live = self._live.get((model, version))
        if live is None or live.quality is None or live.quality.event_time < since:
            return None
        return live.quality

    def shadow(
        self, model: str, version: int, paired_with: int, *, since: datetime
    ) -> VersionMetrics | None:
        """The newest paired snapshot of shadow ``version`` against ``paired_with`` measured at
        or after ``since``."""
        live = self._live.get((model, version))
        snapshot = live.shadow.get(paired_with) if live is not None else None
        if snapshot is None or snapshot.event_time < since:
            return None
        return snapshot

    def operational(self, model: str, version: int, *, since: datetime) -> Operational:
        """The gateway's figures measured at or after ``since`` (None where unknown)."""
        live = self._live.get((model, version))
        if live is None:
            return Operational()
        err = live.error_rate[1] if live.error_rate and live.error_rate[0] >= since else None
        lat = (
            live.latency_p99_ms[1]
            if live.latency_p99_ms and live.latency_p99_ms[0] >= since
            else None
        )
        return Operational(
            error_rate=err.error_rate if err else None,
            requests=err.count if err else 0,
            latency_p99_ms=lat.latency_p99_ms if lat else None,
            # A gateway that does not say how many latencies: as many as its requests.
            latency_samples=(
                (lat.latency_samples if lat.latency_samples is not None else lat.count)
                if lat
                else 0
            ),
            latency_p99_low_ms=lat.latency_p99_low_ms if lat else None,
            latency_p99_high_ms=lat.latency_p99_high_ms if lat else None,
        )

    def served(self, model: str, version: int) -> int:
        """Estimated joined requests the version served (see ``analysis.estimate_served``)."""
        live = self._live.get((model, version))
        return estimate_served(live.windows) if live else 0
