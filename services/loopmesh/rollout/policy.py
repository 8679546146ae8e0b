"""The rollout policy: steps, primary metric, statistical thresholds, guards and timeouts.

One pydantic model validates a policy whatever door it came through (settings, gRPC, the
``rollout.policies`` topic). A policy is resolved per model: an override set over gRPC wins over
the per-model policy in settings, which wins over the default policy in settings.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loopmesh.mesh.events import Event, ModelName
from loopmesh.mesh.model_spec import SpecError, load_spec_files, section

PrimaryMetric = Literal["loss", "log_loss", "accuracy", "auc"]
"""Metric the canary is judged on. ``loss`` is the model's task loss as the joiner reports it
(log loss, cross-entropy or squared error): lower is better, as for log_loss (binary only);
accuracy (binary, multiclass) and auc (binary) are higher-is-better."""
LOWER_IS_BETTER = frozenset({"loss", "log_loss"})
Method = Literal["sequential", "fixed"]
"""``sequential``: anytime-valid confidence sequences (safe to look after every metrics update);
``fixed``: a plain normal confidence interval (valid for one look; cheaper in samples)."""

Weight = Annotated[float, Field(gt=0.0, lt=1.0)]


class RolloutPolicy(BaseModel):
    """How a candidate earns traffic, and when it loses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: tuple[Weight, ...] = (0.05, 0.25, 0.5)
    """Canary share of traffic at each step, strictly increasing; after the last, stable."""
    metric: PrimaryMetric = "loss"
    """Primary metric compared between canary and stable (``loss``: whatever the task's)."""
    method: Method = "sequential"
    """How the confidence bound on the metric difference is computed."""
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    """Confidence level of the bound on (canary - stable)."""
    max_regression: float = Field(default=0.005, ge=0.0)
    """How much worse (in metric units) the canary may be: it advances when the bound shows it
    is at most this much worse, and is rolled back when the bound shows it is more."""
    min_samples: int = Field(default=200, ge=1)
    """Joined feedback samples each arm needs in its metrics window before any decision."""
    min_step_seconds: float = Field(default=300.0, ge=0.0)
    """Least time at a step before advancing (rollbacks need not wait)."""
    step_timeout_seconds: float = Field(default=3600.0, gt=0.0)
    """A step that reaches no decision within this time is aborted with the reason."""
    assumed_loss_std: float = Field(default=1.0, gt=0.0)
    """Per-example loss standard deviation assumed when metrics carry no loss variance."""
    guard_min_requests: int = Field(default=100, ge=1)
    """Requests (error rate) and latencies (p99) each arm needs in the gateway's window before
    a guard decides; until then the step holds and says so (never a rollback on 2 samples)."""
    max_error_rate: float | None = Field(default=0.05, ge=0.0, le=1.0)
    """Canary error rate (from the gateway) above which it is rolled back; None disables."""
    max_error_rate_increase: float | None = Field(default=0.01, ge=0.0, le=1.0)
    """Canary minus stable error rate above which it is rolled back; None disables."""
    max_latency_p99_ms: float | None = Field(default=None, gt=0.0)
    """Canary p99 latency (ms) above which it is rolled back; None disables."""
    max_latency_ratio: float | None = Field(default=1.5, gt=1.0)
    """Canary p99 over stable p99 above which it is rolled back; None disables."""
    drain_seconds: float = Field(default=30.0, ge=0.0)
    """How long a version stays loaded after it lost its traffic (in-flight requests finish)."""
    shadow_share: float = Field(default=0.0, ge=0.0, le=1.0)
    """Shadow first: share of requests the gateway also scores with each candidate in shadow
    (logged, never returned), judged on the same requests as stable before any user sees it.
    0 sends candidates straight to canary."""
    max_shadows: int = Field(default=2, ge=1, le=8)
    """Candidates shadowed at once; newer ones wait (or preempt one they beat)."""
    shadow_timeout_seconds: float = Field(default=900.0, gt=0.0)
    """A shadow that reaches no decision within this time (from the last shadow change) is
    dropped with the reason."""
    shadow_promote_margin: float | None = Field(default=0.0, ge=0.0)
    """A shadow whose paired bound shows it better than stable by more than this (metric
    units) goes straight to stable; one only no worse goes to canary. None: always canary."""

    GUARD_FIELDS: ClassVar[tuple[str, ...]] = (
        "max_error_rate",
        "max_error_rate_increase",
        "max_latency_p99_ms",
        "max_latency_ratio",
    )

    @field_validator("weights")
    @classmethod
    def _increasing(cls, weights: tuple[float, ...]) -> tuple[float, ...]:
        if not weights:
            raise ValueError("at least one canary step is needed")
        if any(b <= a for a, b in pairwise(weights)):
            raise ValueError("weights must be strictly increasing")
        return weights

    @model_validator(mode="after")
    def _timeout_after_min_step(self) -> RolloutPolicy:
        if self.step_timeout_seconds <= self.min_step_seconds:
            raise ValueError("step_timeout_seconds must be longer than min_step_seconds")
        return self

    @property
    def steps(self) -> int:
        return len(self.weights)

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    def weight_at(self, step: int) -> float:
        """Canary weight at ``step`` (1-based); 0 for the candidate step."""
        return self.weights[step - 1] if step >= 1 else 0.0

    def merged(self, changes: dict[str, Any]) -> RolloutPolicy:
        """A new, validated policy with ``changes`` applied (raises ValidationError)."""
        return RolloutPolicy.model_validate({**self.model_dump(), **changes})


class PolicySet(Event):
    """A per-model policy override set over gRPC (``rollout.policies``, compacted by model)."""

    SCHEMA: ClassVar[str] = "rollout.policy.v1"
    model_name: ModelName
    policy: RolloutPolicy | None = None
    """The override; None clears it (the settings' policy applies again)."""


class PolicyBook:
    """Resolves the policy of a model: gRPC override, else settings per model, else default."""

    def __init__(self, default: RolloutPolicy, per_model: dict[str, RolloutPolicy]) -> None:
        self.default = default
        self.per_model = dict(per_model)
        self.overrides: dict[str, RolloutPolicy] = {}

    def get(self, model: str) -> RolloutPolicy:
        return self.overrides.get(model) or self.per_model.get(model) or self.default

    def apply(self, event: PolicySet) -> None:
        if event.policy is None:
            self.overrides.pop(event.model_name, None)
        else:
            self.overrides[event.model_name] = event.policy


_TASK_METRICS: dict[str, frozenset[str]] = {
    "binary": frozenset({"loss", "log_loss", "accuracy", "auc"}),
    "multiclass": frozenset({"loss", "accuracy"}),
    "regression": frozenset({"loss"}),
}
"""The metrics the joiner reports for each task, hence those a canary can be judged on."""


def spec_policies(project: Path, default: RolloutPolicy) -> dict[str, RolloutPolicy]:
    """Each model spec's policy: its ``rollout`` section over ``default``, checked against
    its task (SpecError names the spec's file and field)."""
    policies: dict[str, RolloutPolicy] = {}
    for name, (source, spec) in load_spec_files(project).items():
        policy = section(spec, source, "rollout", RolloutPolicy, base=default)
        if policy.metric not in _TASK_METRICS[spec.task]:
            allowed = ", ".join(sorted(_TASK_METRICS[spec.task]))
            raise SpecError(
                f"{source}: rollout.metric",
                f"{policy.metric!r} is not reported for a {spec.task} model (use {allowed})",
            )
        if spec.rollout:
            policies[name] = policy
    return policies
