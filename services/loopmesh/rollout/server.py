"""gRPC adapter of ``loopmesh.v1.RolloutService``: converts messages and calls the controller.

Errors map once, here: an invalid model name or policy field -> INVALID_ARGUMENT naming the
field; a model without rollouts -> NOT_FOUND; a command that does not apply to the state ->
FAILED_PRECONDITION; Kafka or Triton failing during a command -> UNAVAILABLE (nothing changed);
every call to a standby (or to a leader losing the leadership) -> UNAVAILABLE, to be retried
at the leader.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import grpc
from aiokafka.errors import KafkaError
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import ValidationError

from loopmesh.gen.loopmesh.v1 import rollout_pb2, rollout_pb2_grpc
from loopmesh.mesh import model_repo
from loopmesh.mesh.auth import Role
from loopmesh.mesh.errors import InvalidArgument, Unavailable
from loopmesh.mesh.events import RolloutChanged
from loopmesh.rollout.core import HistoryEntry, NotLeader, RolloutController, Status
from loopmesh.rollout.policy import RolloutPolicy
from loopmesh.rollout.triton import LoadError

SERVICE_NAME = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name
# Every rollout call, reads included, is an operator's: the history reveals model figures.
METHOD_ROLES: dict[str, Role] = {f"/{SERVICE_NAME}/": "operator"}
DEFAULT_HISTORY = 50
T = TypeVar("T")

_SCALAR_POLICY_FIELDS = (
    "metric",
    "method",
    "confidence",
    "max_regression",
    "min_samples",
    "min_step_seconds",
    "step_timeout_seconds",
    "assumed_loss_std",
    "max_error_rate",
    "max_error_rate_increase",
    "max_latency_p99_ms",
    "max_latency_ratio",
    "drain_seconds",
    "guard_min_requests",
    "shadow_share",
    "max_shadows",
    "shadow_timeout_seconds",
    "shadow_promote_margin",
)


def _stamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def rollout_message(status: Status) -> rollout_pb2.Rollout:
    record = status.record
    out = rollout_pb2.Rollout(
        model_name=record.model_name,
        state=record.state,
        canary_weight=record.canary_weight,
        step=record.step,
        steps=status.policy.steps,
        reason=record.reason,
        changed_at=_stamp(record.changed_at),
        canary_requests_estimate=status.canary_requests_estimate,
        shadow_versions=list(record.shadows),
        shadow_share=record.shadow_share if record.shadows else 0.0,
    )
    if record.stable_version is not None:
        out.stable_version = record.stable_version
    if record.canary_version is not None:
        out.canary_version = record.canary_version
    if status.evaluation is not None:
        ev = status.evaluation
        out.analysis.CopyFrom(
            rollout_pb2.Analysis(
                action=ev.action,
                reason=ev.reason,
                figures=ev.figures,
                evaluated_at=_stamp(ev.at),
            )
        )
    return out


def change_message(entry: HistoryEntry) -> rollout_pb2.RolloutChange:
    event: RolloutChanged = entry.event
    out = rollout_pb2.RolloutChange(
        event_id=event.event_id,
        model_name=event.model_name,
        state=event.state,
        canary_weight=event.canary_weight,
        step=event.step,
        reason=event.reason,
        event_time=_stamp(event.event_time),
        figures=entry.figures,
        shadow_versions=event.shadow_versions,
    )
    if event.stable_version is not None:
        out.stable_version = event.stable_version
    if event.canary_version is not None:
        out.canary_version = event.canary_version
    return out


def policy_message(policy: RolloutPolicy) -> rollout_pb2.RolloutPolicy:
    values = policy.model_dump()
    out = rollout_pb2.RolloutPolicy(weights=list(policy.weights))
    for name in _SCALAR_POLICY_FIELDS:
        if values[name] is not None:
            setattr(out, name, values[name])
    return out


def policy_changes(request: rollout_pb2.SetPolicyRequest) -> dict[str, Any]:
    """The fields a SetPolicy request sets (unset ones keep their values)."""
    changes: dict[str, Any] = {}
    if request.policy.weights:
        changes["weights"] = tuple(request.policy.weights)
    for name in _SCALAR_POLICY_FIELDS:
        if request.policy.HasField(name):  # type: ignore[arg-type]
            changes[name] = getattr(request.policy, name)
    for i, name in enumerate(request.disable_guards):
        if name not in RolloutPolicy.GUARD_FIELDS:
            known = ", ".join(RolloutPolicy.GUARD_FIELDS)
            raise ValueError(f"disable_guards[{i}]: {model_repo.shown(name)} is not one of {known}")
        changes[name] = None
    return changes


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    """``current()`` is the leader's controller, None on a standby (``app``)."""

    def __init__(self, current: Callable[[], RolloutController | None]) -> None:
        self._current = current

    @property
    def controller(self) -> RolloutController:
        controller = self._current()
        if controller is None:
            raise NotLeader(
                "this rollout controller is a standby (another one leads): retry at the leader"
            )
        return controller

    async def GetRollout(
        self, request: rollout_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rollout_pb2.Rollout:
        model = await _model(request.model_name, context)
        status = await _call(context, lambda: _sync(self.controller.status, model))
        return rollout_message(status)

    async def ListRollouts(
        self,
        request: rollout_pb2.ListRolloutsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> rollout_pb2.ListRolloutsResponse:
        model = await _model(request.model_name, context) if request.model_name else None
        limit = request.limit or DEFAULT_HISTORY
        statuses, history = await _call(context, lambda: _sync(self.controller.list, model, limit))
        return rollout_pb2.ListRolloutsResponse(
            rollouts=[rollout_message(s) for s in statuses],
            history=[change_message(h) for h in history],
        )

    async def Promote(
        self, request: rollout_pb2.PromoteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rollout_pb2.Rollout:
        model = await _model(request.model_name, context)
        status = await _call(
            context,
            lambda: self.controller.promote(
                model, to_stable=request.to_stable, reason=request.reason
            ),
        )
        return rollout_message(status)

    async def Rollback(
        self, request: rollout_pb2.RollbackRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rollout_pb2.Rollout:
        model = await _model(request.model_name, context)
        status = await _call(
            context, lambda: self.controller.rollback(model, reason=request.reason)
        )
        return rollout_message(status)

    async def Pause(
        self, request: rollout_pb2.PauseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rollout_pb2.Rollout:
        model = await _model(request.model_name, context)
        status = await _call(context, lambda: self.controller.pause(model, reason=request.reason))
        return rollout_message(status)

    async def Resume(
        self, request: rollout_pb2.ResumeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rollout_pb2.Rollout:
        model = await _model(request.model_name, context)
        status = await _call(context, lambda: self.controller.resume(model, reason=request.reason))
        return rollout_message(status)

    async def GetPolicy(
        self, request: rollout_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rollout_pb2.RolloutPolicy:
        model = await _model(request.model_name, context)
        return policy_message(self.controller.policies.get(model))

    async def SetPolicy(
        self, request: rollout_pb2.SetPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rollout_pb2.RolloutPolicy:
        model = await _model(request.model_name, context)
        try:
            changes = policy_changes(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        policy = await _call(
            context, lambda: self.controller.set_policy(model, changes, reset=request.reset)
        )
        return policy_message(policy)


def _policy_errors(err: ValidationError) -> str:
    """Each error with its field as a path in the request, e.g. ``policy.min_samples: ...``."""
    parts = []
    for item in err.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"policy.{where}: {item['msg']}" if where else f"policy: {item['msg']}")
    return "; ".join(parts)


async def _sync(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


async def _model(name: str, context: grpc.aio.ServicerContext[Any, Any]) -> str:
    try:
        return model_repo.validate_model_name(name)
    except ValueError as exc:
        raise InvalidArgument("model_name", str(exc)) from None


async def _call(context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[T]]) -> T:
    """Run a controller call; kernel errors pass through to the server's ErrorMapping."""
    try:
        return await call()
    except ValidationError as exc:
        raise InvalidArgument(_policy_errors(exc)) from None
    except (KafkaError, LoadError, grpc.aio.AioRpcError, TimeoutError) as exc:
        # Kafka or Triton: the change was not made, and the caller may retry. Anything else
        # is a bug, answered INTERNAL by the ErrorMapping.
        raise Unavailable(f"rollout change not made: {exc}") from exc
