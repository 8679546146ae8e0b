"""gRPC adapter of ``loopmesh.v1.TrainerService``: validates via ``api``, calls ``TrainerCore``.

Errors are the kernel's (InvalidArgument, UnknownModel, Unavailable), mapped to a status by the
server's ``ErrorMapping``. Reads of the run history and the repository run in a thread.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from loopmesh.gen.loopmesh.v1 import trainer_pb2, trainer_pb2_grpc
from loopmesh.mesh.auth import Role
from loopmesh.mesh.errors import InvalidArgument, Unavailable
from loopmesh.mesh.events import LabelledExample
from loopmesh.mesh.telemetry import tracer
from loopmesh.trainer.api import (
    AddExamplesRequest,
    ListRunsRequest,
    ListVersionsRequest,
    TriggerRequest,
    check_model,
    check_target,
    parse,
)
from loopmesh.trainer.core import TrainerCore, VersionInfo
from loopmesh.trainer.plan import ModelPlan
from loopmesh.trainer.runs import RunRecord

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
# Every trainer call is an operator's: runs and versions reveal model figures, and a
# manual run costs compute.
METHOD_ROLES: dict[str, Role] = {f"/{SERVICE_NAME}/": "operator"}
_tracer = tracer("loopmesh.trainer")
_STATUS = {
    "running": trainer_pb2.RUN_STATUS_RUNNING,
    "published": trainer_pb2.RUN_STATUS_PUBLISHED,
    "rejected": trainer_pb2.RUN_STATUS_REJECTED,
    "failed": trainer_pb2.RUN_STATUS_FAILED,
}
_DEFAULT_LIMIT = 100


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def run_message(record: RunRecord) -> trainer_pb2.TrainingRun:
    return trainer_pb2.TrainingRun(
        run_id=record.run_id,
        model_name=record.model_name,
        status=_STATUS[record.status],
        reasons=record.reasons,
        started_at=_timestamp(record.started_at),
        finished_at=_timestamp(record.finished_at),
        dataset_rows=record.dataset_rows,
        train_rows=record.train_rows,
        validation_rows=record.validation_rows,
        holdout_rows=record.holdout_rows,
        candidate=record.candidate,
        reference=record.reference,
        reference_kind=record.reference_kind,
        reference_version=record.reference_version or 0,
        decision=record.decision,
        version=record.version or 0,
        warm_started=record.warm_started,
        epochs=record.epochs,
        device=record.device,
        train_seconds=record.train_seconds,
        error=record.error,
        feature_names=record.feature_names,
    )


def version_message(info: VersionInfo, stable: int | None) -> trainer_pb2.ModelVersion:
    meta: dict[str, Any] = info.metadata
    created = meta.get("created_at")
    metrics = {
        str(k): float(v)
        for k, v in (meta.get("metrics") or {}).items()
        if isinstance(v, int | float)
    }
    return trainer_pb2.ModelVersion(
        version=info.version,
        created_at=_timestamp(
            datetime.fromisoformat(created) if isinstance(created, str) else None
        ),
        parent_version=int(meta.get("parent_version") or 0),
        sha256=str(meta.get("sha256", "")),
        intact=info.intact,
        metrics=metrics,
        feature_names=[str(n) for n in meta.get("feature_names") or []],
        run_id=str(meta.get("run_id") or ""),
        stable=info.version == stable,
    )


Publish = Callable[[list[LabelledExample]], Awaitable[None]]
"""Write examples to the trainer's examples topic (acknowledged before it returns)."""
_IMPORTED = uuid.UUID("0d9c3a51-77f0-4d61-a3c4-6a2b2e0c8f15")


def imported_examples(
    request: trainer_pb2.AddExamplesRequest, model_name: str, plan: ModelPlan
) -> list[LabelledExample]:
    """The request's examples as LabelledExamples, each checked against the model's plan."""
    parsed = parse(
        AddExamplesRequest,
        model_name=request.model_name,
        examples=[
            {
                "example_id": e.example_id,
                "entity_id": e.entity_id,
                "features": dict(e.features),
                "categorical": dict(e.categorical),
                "target": e.target,
                "event_time": e.event_time.ToDatetime(tzinfo=UTC)
                if e.HasField("event_time")
                else None,
            }
            for e in request.examples
        ],
    )
    check_model(parsed.model_name, model_name)
    declared = {f.name for f in plan.categorical}
    now = datetime.now(UTC)
    out = []
    for i, example in enumerate(parsed.examples):
        check_target(plan.task, plan.classes, example.target, f"examples[{i}].target")
        for name in example.categorical:
            if name not in declared:
                raise InvalidArgument(
                    f"examples[{i}].categorical.{name}", "the model has no such categorical input"
                )
        at = example.event_time or now
        out.append(
            LabelledExample(
                event_id=uuid.uuid5(_IMPORTED, f"{model_name}/{example.example_id}").hex,
                event_time=at,
                prediction_id=f"example:{example.example_id}",
                entity_id=example.entity_id,
                model_name=model_name,
                model_version=0,
                features=example.features,
                categorical=example.categorical,
                task=plan.task,
                target=example.target,
                score=0.0,
                predicted_at=at,
                feedback_at=at,
            )
        )
    return out


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, core: TrainerCore, publish: Publish | None = None) -> None:
        self.core = core
        self._publish = publish

    async def GetStatus(
        self, request: trainer_pb2.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trainer_pb2.GetStatusResponse:
        with _tracer.start_as_current_span("TrainerService/GetStatus"):
            status = await asyncio.to_thread(self.core.status)
        response = trainer_pb2.GetStatusResponse(
            model_name=status.model_name,
            dataset_rows=status.dataset_rows,
            new_examples=max(status.new_examples, 0),
            stable_version=status.stable_version or 0,
            newest_version=status.newest_version or 0,
            # The proto's drift fields predate the loss detector: the detector and its loss,
            # and the mean loss of its current stream (no "best" window any more).
            drift_metric=f"{status.drift_detector}: loss" if status.drift_detector else "",
            runs_total=status.runs_total,
        )
        if status.running is not None:
            response.running.CopyFrom(run_message(status.running))
        if status.last_run is not None:
            response.last_run.CopyFrom(run_message(status.last_run))
        if status.drift_loss is not None:
            response.drift_current = status.drift_loss
        if (drift := status.last_drift) is not None:
            response.last_drift.CopyFrom(
                trainer_pb2.DriftDetection(
                    detector=drift.detector,
                    model_version=drift.model_version,
                    change_at=_timestamp(drift.change_at),
                    detected_at=_timestamp(drift.detected_at),
                    delay_examples=drift.delay_examples,
                    delay_seconds=drift.delay_seconds,
                    loss_before=drift.loss_before,
                    loss_after=drift.loss_after,
                )
            )
        return response

    async def ListRuns(
        self, request: trainer_pb2.ListRunsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trainer_pb2.ListRunsResponse:
        parsed = parse(ListRunsRequest, limit=request.limit)
        with _tracer.start_as_current_span("TrainerService/ListRuns"):
            runs = await asyncio.to_thread(self.core.runs, parsed.limit or _DEFAULT_LIMIT)
        return trainer_pb2.ListRunsResponse(runs=[run_message(r) for r in runs])

    async def ListVersions(
        self, request: trainer_pb2.ListVersionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trainer_pb2.ListVersionsResponse:
        parsed = parse(ListVersionsRequest, model_name=request.model_name)
        model_name = check_model(parsed.model_name, self.core.model_name)
        with _tracer.start_as_current_span("TrainerService/ListVersions"):
            infos = await asyncio.to_thread(self.core.versions)
            stable = await asyncio.to_thread(self.core.stable_version)
        return trainer_pb2.ListVersionsResponse(
            model_name=model_name, versions=[version_message(i, stable) for i in infos]
        )

    async def TriggerTraining(
        self,
        request: trainer_pb2.TriggerTrainingRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trainer_pb2.TriggerTrainingResponse:
        parsed = parse(
            TriggerRequest, model_name=request.model_name, reason=request.reason, wait=request.wait
        )
        check_model(parsed.model_name, self.core.model_name)
        with _tracer.start_as_current_span("TrainerService/TriggerTraining") as span:
            started, record = self.core.trigger([f"manual: {parsed.reason or 'TriggerTraining'}"])
            span.set_attribute("loopmesh.run_id", record.run_id)
            span.set_attribute("loopmesh.started", started)
            if started and parsed.wait:
                record = await self.core.wait_idle() or record
        return trainer_pb2.TriggerTrainingResponse(started=started, run=run_message(record))

    async def AddExamples(
        self,
        request: trainer_pb2.AddExamplesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trainer_pb2.AddExamplesResponse:
        examples = imported_examples(request, self.core.model_name, self.core.plan)
        if self._publish is None:
            raise Unavailable("this trainer takes no examples over gRPC (no producer)")
        with _tracer.start_as_current_span("TrainerService/AddExamples") as span:
            span.set_attribute("loopmesh.examples", len(examples))
            await self._publish(examples)
        return trainer_pb2.AddExamplesResponse(accepted=len(examples))
