"""Typed hostile requests per gRPC method, their right answers, and valid probes (no tests).

``typed_cases(mesh)`` maps each method path to (strategy, the codes a random well-formed
request may get, an optional check of the answer); the doors' cases live in
``tests.test_bad_input_doors``. ``PROBES`` are valid calls each service must still answer.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from loopmesh.gen.loopmesh.v1 import (
    features_pb2,
    feedback_pb2,
    inference_pb2,
    ingestion_pb2,
    rollout_pb2,
    trainer_pb2,
)
from tests.test_bad_input_doors import (
    Checker,
    ingest_cases,
    ingest_stream_cases,
    submit_cases,
    submit_stream_cases,
)
from tests.test_bad_input_mesh import MAX_ENTITIES, Mesh
from tests.test_bad_input_support import (
    INVALID,
    NOT_FOUND,
    OK,
    TRAVERSAL,
    Case,
    any_float,
    bad_model_name,
    bad_version,
    case,
    hostile_text,
    ident,
    model_names,
    versions,
)
from tests.test_inference_support import FEATURES

PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SERVED_OIP = {
    "ServerLive",
    "ServerReady",
    "ServerMetadata",
    "ModelReady",
    "ModelMetadata",
    "ModelConfig",
    "ModelInfer",
}
"""The Open Inference Protocol methods the gateway serves; the others must be UNIMPLEMENTED."""


# --- features -----------------------------------------------------------------------------------

KNOWN_REFS = [ref for ref in FEATURES if ":" in ref]


def _bad_entity(entity_id: str) -> bool:
    return not entity_id.strip() or entity_id != entity_id.strip() or len(entity_id) > 256


def _online(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    def as_case(ids: list[str], refs: list[str]) -> Case:
        bad = []
        if not ids or len(ids) > MAX_ENTITIES:
            bad.append("entity_ids:")
        bad += [f"entity_ids[{i}]:" for i, e in enumerate(ids) if _bad_entity(e)]
        bad += [f"feature_refs[{i}]:" for i, r in enumerate(refs) if r not in KNOWN_REFS]
        request = features_pb2.GetOnlineFeaturesRequest(entity_ids=ids, feature_refs=refs)
        return case([request], INVALID if bad else OK, fields=bad)

    ids = st.lists(st.one_of(ident(), hostile_text()), max_size=MAX_ENTITIES + 3)
    refs = st.lists(st.one_of(st.sampled_from(KNOWN_REFS), hostile_text()), max_size=4)
    return st.builds(as_case, ids, refs), (OK, INVALID), None


def _delete(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    def as_case(entity_id: str, reason: str) -> Case:
        bad = ["entity_id:"] if _bad_entity(entity_id) else []
        bad += ["reason:"] if len(reason) > 1024 else []
        request = features_pb2.DeleteEntityRequest(entity_id=entity_id, reason=reason)
        return case([request], INVALID if bad else OK, fields=bad)

    entity = st.one_of(ident(), hostile_text())
    return st.builds(as_case, entity, hostile_text(1024)), (OK, INVALID), None


# --- inference ----------------------------------------------------------------------------------


def _predict_request(mesh: Mesh, request_id: str | None = None) -> Any:
    def build(entity: str, context: dict[str, float], name: str, version: str, rid: str) -> Any:
        request = inference_pb2.PredictRequest(
            entity_id=entity,
            context=context,
            model_name=name,
            model_version=version,
            request_id=request_id if request_id is not None else rid,
        )
        bad = []
        if _bad_entity(entity) and (entity.strip() == "" or len(entity.strip()) > 256):
            bad.append("entity_id")
        bad += [f"context.{k}" for k, v in context.items() if not math.isfinite(v)]
        bad += ["context"] if any(not k or len(k) > 256 for k in context) else []
        bad += ["model_name"] if name and bad_model_name(name) else []
        bad += ["model_version"] if version and bad_version(version) else []
        bad += ["request_id"] if len(rid) > 256 and request_id is None else []
        return request, bad

    names = st.one_of(st.just(""), model_names([mesh.model]))
    context = st.dictionaries(
        st.one_of(st.sampled_from(FEATURES), hostile_text()), any_float(), max_size=3
    )
    return st.builds(
        build, st.one_of(ident(), hostile_text()), context, names, versions(), hostile_text()
    )


def _predict(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    def as_case(built: tuple[Any, list[str]]) -> Case:
        request, bad = built
        if bad:
            return case([request], INVALID, fields=bad)
        # An unknown model or version is NOT_FOUND naming it (the gateway's contract).
        codes = (OK, INVALID, NOT_FOUND, UNAVAILABLE, PRECONDITION)
        return case([request], *codes, fields=["model_name", "model_version"])

    return _predict_request(mesh).map(as_case), (OK, INVALID, NOT_FOUND, PRECONDITION), None


def _predict_stream(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    def as_case(items: list[tuple[Any, list[str]]]) -> Case:
        for i, (request, _) in enumerate(items):
            request.request_id = f"r{i}"
        return case([r for r, _ in items], OK, meta=[bad for _, bad in items])

    def check(c: Case, code: Any, details: str, replies: list[Any]) -> None:
        if c.meta is None:
            return
        by_id = {r.request_id: r for r in replies}
        assert len(by_id) == len(c.meta) == len(replies)
        for i, bad in enumerate(c.meta):
            answer = by_id[f"r{i}"]
            if bad:
                assert answer.error.code == INVALID.value[0], (i, answer.error)
                assert any(answer.error.message.startswith(f) for f in bad), (bad, answer.error)
            elif answer.HasField("error"):
                allowed = {c.value[0] for c in (NOT_FOUND, UNAVAILABLE, PRECONDITION)}
                unknown = answer.error.field in ("model_name", "model_version")
                assert answer.error.code in allowed or unknown, (i, answer.error)

    items = st.lists(_predict_request(mesh, request_id=""), max_size=5)
    return items.map(as_case), (OK,), check


def _set_route(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    def as_case(name: str, stable: int, canary: int, weight: float) -> Case:
        request = inference_pb2.SetRouteRequest(
            model_name=name, stable_version=stable, canary_version=canary, canary_weight=weight
        )
        bad = ["model_name"] if bad_model_name(name) else []
        bad += [f for f, v in (("stable_version", stable), ("canary_version", canary)) if v < 0]
        bad += ["canary_weight"] if not (math.isfinite(weight) and 0 <= weight <= 1) else []
        if not bad and not stable and not canary:
            bad.append("stable_version")
        if not bad and not canary and weight > 0:
            bad.append("canary_weight")
        return case([request], INVALID if bad else OK, fields=bad[:1] if bad else ())

    # Never the served model: its route must stay as it is for the other properties.
    names = st.one_of(
        ident(16).map(lambda s: f"r{s}"), st.sampled_from(TRAVERSAL), hostile_text(64)
    )
    ints = st.one_of(st.integers(-3, 3), st.sampled_from([2**63 - 1, -(2**63)]))
    return st.builds(as_case, names, ints, ints, any_float()), (OK, INVALID), None


def _model_field(field_name: str, message: type[Message], mesh: Mesh, **extra: Any) -> Any:
    def as_case(name: str) -> Case:
        request = message(**{field_name: name}, **extra)
        if bad_model_name(name):
            return case([request], INVALID, fields=[field_name])
        return case([request], OK, NOT_FOUND)

    return model_names([mesh.model]).map(as_case), (OK, INVALID, NOT_FOUND), None


def _oip_model(method: str, mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    request_type = getattr(service_pb2, f"{method}Request")

    def as_case(name: str, version: str) -> Case:
        request = request_type(name=name, version=version)
        bad = ["name"] if bad_model_name(name) else []
        bad += ["version"] if version and bad_version(version) else []
        if bad:
            return case([request], INVALID, fields=bad)
        return case([request], OK, NOT_FOUND, UNAVAILABLE)

    strategy = st.builds(as_case, model_names([mesh.model]), versions())
    return strategy, (OK, INVALID, NOT_FOUND, UNAVAILABLE), None


DATATYPES = ["FP32", "FP64", "INT64", "BYTES", "BOOL", "fp32", "", "X" * 300]


def _model_infer(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    n = len(FEATURES)

    def as_case(
        name: str, version: str, dtype: str, shape: list[int], count: int, raw: bool
    ) -> Case:
        tensor = service_pb2.ModelInferRequest.InferInputTensor(
            name="INPUT__0", datatype=dtype, shape=shape
        )
        request = service_pb2.ModelInferRequest(model_name=name, model_version=version)
        values = [0.5] * count
        if raw:
            request.raw_input_contents.append(b"\x00" * (4 * count + (count % 3)))
        else:
            tensor.contents.fp32_contents.extend(values)
        request.inputs.append(tensor)
        bad = ["model_name"] if not name or bad_model_name(name) else []
        bad += ["model_version"] if version and bad_version(version) else []
        if bad:
            return case([request], INVALID, fields=bad[:1])
        fits = dtype == "FP32" and shape == [1, n] and count == n and (not raw or count % 3 == 0)
        if fits and name == mesh.model and version in ("", "1"):
            return case([request], OK)
        return case([request], OK, INVALID, NOT_FOUND, UNAVAILABLE)

    shapes = st.one_of(
        st.just([1, n]), st.lists(st.integers(-2, 2**40), max_size=4), st.just([10**6, n])
    )
    strategy = st.builds(
        as_case,
        st.one_of(st.just(mesh.model), model_names([mesh.model])),
        st.one_of(st.just(""), versions()),
        st.sampled_from(DATATYPES),
        shapes,
        st.sampled_from([0, 1, n, n + 1, 3 * n]),
        st.booleans(),
    )
    return strategy, (OK, INVALID, NOT_FOUND, UNAVAILABLE), None


# --- trainer and rollout ------------------------------------------------------------------------


def _trainer_model(mesh: Mesh, message: type[Message], **extra: Any) -> Any:
    def as_case(name: str, reason: str) -> Case:
        fields = {"model_name": name, **({"reason": reason} if "reason" in extra else {})}
        request = message(**fields)
        bad = ["model_name"] if name and bad_model_name(name) else []
        bad += ["reason"] if "reason" in extra and len(reason.strip()) > 256 else []
        if bad:
            return case([request], INVALID, fields=bad)
        if name and name != mesh.trainer_model:
            return case([request], NOT_FOUND, fields=["model_name"])
        return case([request], OK)

    names = st.one_of(st.just(""), model_names([mesh.trainer_model]))
    return st.builds(as_case, names, hostile_text()), (OK, INVALID, NOT_FOUND), None


def _add_examples(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    """One example with one hostile field (or none); the trainer's model is binary."""

    def as_case(which: str, text: str, number: float) -> Case:
        example = trainer_pb2.Example(
            example_id=uuid.uuid4().hex, entity_id="probe", features={"x": 1.0}, target=1.0
        )
        bad: list[str] = []
        if which == "example_id":
            example.example_id = text
            bad = [] if 0 < len(text.strip()) <= 256 else ["examples[0].example_id"]
        elif which == "entity_id":
            example.entity_id = text
            bad = [] if 0 < len(text.strip()) <= 256 else ["examples[0].entity_id"]
        elif which == "feature":
            example.features["x"] = number
            bad = [] if math.isfinite(number) else ["examples[0].features.x"]
        elif which == "target":
            example.target = number
            bad = [] if number in (0.0, 1.0) else ["examples[0].target"]
        elif which == "categorical":
            example.categorical[text or "c"] = "v"  # the model declares none
            bad = ["examples[0].categorical"]
        request = trainer_pb2.AddExamplesRequest(examples=[example])
        if which == "empty":
            request = trainer_pb2.AddExamplesRequest(model_name=mesh.trainer_model)
            bad = ["examples"]
        if bad:
            return case([request], INVALID, fields=bad)
        return case([request], OK, UNAVAILABLE)

    fields = st.sampled_from(
        ["example_id", "entity_id", "feature", "target", "categorical", "empty", "none"]
    )
    targets = st.one_of(any_float(), st.sampled_from([0.0, 1.0, 2.0, -1.0]))
    return st.builds(as_case, fields, hostile_text(), targets), (OK, INVALID, UNAVAILABLE), None


def _list_runs(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    def as_case(limit: int) -> Case:
        request = trainer_pb2.ListRunsRequest(limit=limit)
        return case([request], INVALID, fields=["limit"]) if limit > 1000 else case([request], OK)

    return st.integers(0, 2**32 - 1).map(as_case), (OK, INVALID), None


def _rollout_named(message: type[Message], **extra: Any) -> Any:
    def as_case(name: str, reason: str) -> Case:
        request = message(model_name=name, **({"reason": reason} if extra else {}))
        if bad_model_name(name):
            return case([request], INVALID, fields=["model_name"])
        return case([request], NOT_FOUND, PRECONDITION, fields=["model_name"])

    names = st.one_of(
        ident(16).map(lambda s: f"u{s}"), st.sampled_from(TRAVERSAL), hostile_text(64)
    )
    return st.builds(as_case, names, hostile_text()), (OK, INVALID, NOT_FOUND), None


def _set_policy(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    def as_case(
        name: str, weights: list[float], scalars: dict[str, float], guards: list[str]
    ) -> Case:
        policy = rollout_pb2.RolloutPolicy(weights=weights, **scalars)
        request = rollout_pb2.SetPolicyRequest(
            model_name=name, policy=policy, disable_guards=guards
        )
        if bad_model_name(name):
            return case([request], INVALID, fields=["model_name"])
        return case([request], OK, INVALID, fields=["policy", "disable_guards"])

    scalars = st.dictionaries(
        st.sampled_from(["confidence", "max_regression", "min_step_seconds", "max_error_rate"]),
        any_float(),
        max_size=2,
    )
    guards = st.lists(st.one_of(st.just("max_latency_ratio"), hostile_text(64)), max_size=2)
    names = st.one_of(ident(16).map(lambda s: f"p{s}"), st.sampled_from(TRAVERSAL))
    strategy = st.builds(as_case, names, st.lists(any_float(), max_size=4), scalars, guards)
    return strategy, (OK, INVALID), None


def _list_rollouts(mesh: Mesh) -> tuple[st.SearchStrategy[Case], Any, Checker]:
    def as_case(name: str, limit: int) -> Case:
        request = rollout_pb2.ListRolloutsRequest(model_name=name, limit=limit)
        if name and bad_model_name(name):
            return case([request], INVALID, fields=["model_name"])
        if name:  # a valid name with no rollout (e.g. "A") is NOT_FOUND naming the field
            return case([request], OK, NOT_FOUND, fields=["model_name"])
        return case([request], OK)

    names = st.one_of(st.just(""), st.sampled_from(TRAVERSAL), hostile_text(64))
    return st.builds(as_case, names, st.integers(0, 2**32 - 1)), (OK, INVALID, NOT_FOUND), None


def _nothing(normal: Sequence[grpc.StatusCode]) -> Any:
    return st.nothing(), tuple(normal), None


def typed_cases(mesh: Mesh) -> dict[str, tuple[st.SearchStrategy[Case], Any, Checker]]:
    ing, fb, ft = (
        "loopmesh.v1.IngestionService",
        "loopmesh.v1.FeedbackService",
        "loopmesh.v1.FeatureService",
    )
    inf, oip, tr = (
        "loopmesh.v1.InferenceService",
        "inference.GRPCInferenceService",
        "loopmesh.v1.TrainerService",
    )
    ro = "loopmesh.v1.RolloutService"
    return {
        f"/{ing}/Ingest": ingest_cases(mesh),
        f"/{ing}/IngestStream": ingest_stream_cases(mesh),
        f"/{fb}/Submit": submit_cases(mesh),
        f"/{fb}/SubmitStream": submit_stream_cases(mesh),
        f"/{ft}/GetOnlineFeatures": _online(mesh),
        f"/{ft}/GetFeatureSchema": _nothing([OK]),
        f"/{ft}/DeleteEntity": _delete(mesh),
        f"/{inf}/Predict": _predict(mesh),
        f"/{inf}/PredictStream": _predict_stream(mesh),
        f"/{inf}/SetRoute": _set_route(mesh),
        f"/{inf}/GetRoute": _model_field("model_name", inference_pb2.GetRouteRequest, mesh),
        f"/{oip}/ServerLive": _nothing([OK]),
        f"/{oip}/ServerReady": _nothing([OK]),
        f"/{oip}/ServerMetadata": _nothing([OK]),
        f"/{oip}/ModelReady": _oip_model("ModelReady", mesh),
        f"/{oip}/ModelMetadata": _oip_model("ModelMetadata", mesh),
        f"/{oip}/ModelConfig": _oip_model("ModelConfig", mesh),
        f"/{oip}/ModelInfer": _model_infer(mesh),
        f"/{tr}/GetStatus": _nothing([OK]),
        f"/{tr}/ListRuns": _list_runs(mesh),
        f"/{tr}/ListVersions": _trainer_model(mesh, trainer_pb2.ListVersionsRequest),
        f"/{tr}/TriggerTraining": _trainer_model(
            mesh, trainer_pb2.TriggerTrainingRequest, reason=True
        ),
        f"/{tr}/AddExamples": _add_examples(mesh),
        f"/{ro}/GetRollout": _rollout_named(rollout_pb2.GetRolloutRequest),
        f"/{ro}/ListRollouts": _list_rollouts(mesh),
        f"/{ro}/Promote": _rollout_named(rollout_pb2.PromoteRequest, reason=True),
        f"/{ro}/Rollback": _rollout_named(rollout_pb2.RollbackRequest, reason=True),
        f"/{ro}/Pause": _rollout_named(rollout_pb2.PauseRequest, reason=True),
        f"/{ro}/Resume": _rollout_named(rollout_pb2.ResumeRequest, reason=True),
        f"/{ro}/GetPolicy": _model_field("model_name", rollout_pb2.GetPolicyRequest, mesh),
        f"/{ro}/SetPolicy": _set_policy(mesh),
    }


# --- valid calls that must still succeed afterwards ---------------------------------------------


def _ok(check: Callable[[bytes], bool] = lambda _: True) -> Callable[[bytes], None]:
    def verify(raw: bytes) -> None:
        assert check(raw), raw[:200]

    return verify


def _valid_event() -> ingestion_pb2.IngestRequest:
    event = ingestion_pb2.InteractionEvent(
        event_id=uuid.uuid4().hex, entity_id="probe", event_type="click"
    )
    return ingestion_pb2.IngestRequest(events=[event])


def _ready(raw: bytes) -> bool:
    return bool(service_pb2.ServerReadyResponse.FromString(raw).ready)


def _infer(mesh: Mesh) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=mesh.model, model_version="1")
    tensor = request.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, len(FEATURES)])
    tensor.contents.fp32_contents.extend([0.5] * len(FEATURES))
    return request


PROBES: dict[str, Callable[[Mesh], list[tuple[str, Message, Callable[[bytes], None]]]]] = {
    "loopmesh.v1.IngestionService": lambda m: [("Ingest", _valid_event(), _ok())],
    "loopmesh.v1.FeedbackService": lambda m: [
        (
            "Submit",
            feedback_pb2.SubmitRequest(
                feedback=feedback_pb2.Feedback(prediction_id="probe", label=1)
            ),
            _ok(),
        )
    ],
    "loopmesh.v1.FeatureService": lambda m: [
        ("GetFeatureSchema", features_pb2.GetFeatureSchemaRequest(), _ok(bool))
    ],
    "loopmesh.v1.InferenceService": lambda m: [
        ("Predict", inference_pb2.PredictRequest(entity_id="probe"), _ok(bool))
    ],
    "inference.GRPCInferenceService": lambda m: [
        ("ServerReady", service_pb2.ServerReadyRequest(), _ok(_ready)),
        ("ModelInfer", _infer(m), _ok(bool)),
    ],
    "loopmesh.v1.TrainerService": lambda m: [("GetStatus", trainer_pb2.GetStatusRequest(), _ok())],
    "loopmesh.v1.RolloutService": lambda m: [
        ("GetPolicy", rollout_pb2.GetPolicyRequest(model_name="probe"), _ok(bool))
    ],
}
