"""Hostile input at every gRPC method of every service: right status codes, nothing lost.

The methods are enumerated from the services' descriptors (our protos and the Open Inference
Protocol the gateway serves), and a method without a strategy fails the suite, so a new
method cannot slip by. For each method hypothesis sends typed hostile requests (huge strings,
control characters, path traversal, NaN and infinities, empty and oversized batches and
streams) and raw bytes (not protobuf, invalid UTF-8 in a string field, over the size limit).

Properties: the status is one that is right for the input (INVALID_ARGUMENT naming the field
at fault, NOT_FOUND for unknown models, RESOURCE_EXHAUSTED for oversized requests), never
UNKNOWN or INTERNAL; the service answers a valid call afterwards; and at the doors (Ingest,
Feedback) every valid item of a mixed batch is accepted and in Kafka, every bad one refused.

grpc-python answers a request that fails to decode with UNKNOWN ("Unexpected DecodeError").
That is wrong for a client's mistake: ``loopmesh.mesh.rpc_guards.DecodeGuard`` makes it
INVALID_ARGUMENT whose details start with ``request:``, which these tests require.

Hypothesis drives synchronous gRPC calls from a worker thread while the servers run on the
test's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from loopmesh.devstack.triton import TritonServer
from loopmesh.gen.loopmesh.v1 import (
    features_pb2,
    feedback_pb2,
    inference_pb2,
    ingestion_pb2,
    rollout_pb2,
    trainer_pb2,
)
from loopmesh.mesh.settings import KafkaSettings
from tests.test_bad_input_cases import PROBES, SERVED_OIP, typed_cases
from tests.test_bad_input_doors import DOOR_LEDGER, Checker
from tests.test_bad_input_mesh import Mesh, running_mesh
from tests.test_bad_input_support import (
    EXHAUSTED,
    OK,
    UNIMPLEMENTED,
    Case,
    generic_cases,
)
from tests.test_ingestion_support import read_all

SERVICES: list[ServiceDescriptor] = [
    ingestion_pb2.DESCRIPTOR.services_by_name["IngestionService"],
    feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"],
    features_pb2.DESCRIPTOR.services_by_name["FeatureService"],
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"],
    rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"],
]
METHODS: list[MethodDescriptor] = [m for s in SERVICES for m in s.methods]
CALL_TIMEOUT = 30.0
EXAMPLES = 15


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


@pytest.fixture(scope="module")
async def mesh(
    kafka_settings: KafkaSettings,
    triton: TritonServer,
    model_repository: Path,
    feast_repo: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Mesh]:
    data = tmp_path_factory.mktemp("bad_input")
    async with running_mesh(
        kafka_settings, triton.grpc_url, model_repository, feast_repo, data
    ) as running:
        yield running


def invoke(channel: grpc.Channel, method: MethodDescriptor, c: Case) -> tuple[Any, str, list[Any]]:
    """(code, details, decoded responses) of one call with the case's bytes."""
    path = path_of(method)
    reply = message_factory.GetMessageClass(method.output_type)
    try:
        if method.client_streaming and method.server_streaming:
            raw = list(channel.stream_stream(path)(iter(c.messages), timeout=CALL_TIMEOUT))
        elif method.client_streaming:
            raw = [channel.stream_unary(path)(iter(c.messages), timeout=CALL_TIMEOUT)]
        elif method.server_streaming:
            raw = list(channel.unary_stream(path)(c.messages[0], timeout=CALL_TIMEOUT))
        else:
            raw = [channel.unary_unary(path)(c.messages[0], timeout=CALL_TIMEOUT)]
    except grpc.RpcError as err:
        return err.code(), err.details() or "", []
    return OK, "", [reply.FromString(r) for r in raw]


def check_status(method: MethodDescriptor, c: Case, code: Any, details: str) -> None:
    where = f"{path_of(method)} with {[m[:200] for m in c.messages]!r}"
    assert code in c.codes, f"{where}: {code} {details[:300]!r}, expected one of {set(c.codes)}"
    if code == grpc.StatusCode.INVALID_ARGUMENT and c.fields:
        assert any(details.startswith(f) for f in c.fields), (
            f"{where}: details {details[:300]!r} name none of {sorted(c.fields)}"
        )


def strategy_for(method: MethodDescriptor, mesh: Mesh) -> tuple[st.SearchStrategy[Case], Checker]:
    path = path_of(method)
    oip = method.containing_service.full_name == "inference.GRPCInferenceService"
    if oip and method.name not in SERVED_OIP:
        # Not served (repository control, shared memory, ...): never passed to Triton.
        unserved = st.binary(max_size=64).map(
            lambda raw: Case((raw,), frozenset({UNIMPLEMENTED, EXHAUSTED}))
        )
        return unserved, None
    typed = typed_cases(mesh)
    if path not in typed:
        pytest.fail(f"{path} has no hostile-input strategy: add one to tests/test_bad_input_cases")
    strategy, normal, checker = typed[path]
    return st.one_of(strategy, generic_cases(method, normal)), checker


def probe(mesh: Mesh, service: str) -> None:
    """The service still answers a valid call and reports SERVING."""
    with grpc.insecure_channel(mesh.addresses[service]) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        for method_name, request, check in PROBES[service](mesh):
            call = channel.unary_unary(
                f"/{service}/{method_name}",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=lambda raw: raw,
            )
            check(call(request, timeout=CALL_TIMEOUT))


def run_property(method: MethodDescriptor, mesh: Mesh) -> None:
    strategy, checker = strategy_for(method, mesh)
    service = method.containing_service.full_name
    with grpc.insecure_channel(mesh.addresses[service]) as channel:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(strategy)
        def hostile(c: Case) -> None:
            code, details, replies = invoke(channel, method, c)
            check_status(method, c, code, details)
            if checker is not None:
                checker(c, code, details, replies)

        hostile()
    probe(mesh, service)


def test_every_method_of_every_service_is_covered() -> None:
    names = {m.containing_service.full_name for m in METHODS}
    assert len(names) == len(SERVICES)
    assert set(PROBES) == names
    # Spot checks that the enumeration sees what the protos declare.
    paths = {path_of(m) for m in METHODS}
    assert "/loopmesh.v1.InferenceService/PredictStream" in paths
    assert "/inference.GRPCInferenceService/RepositoryModelLoad" in paths


@pytest.mark.parametrize("method", METHODS, ids=path_of)
# The servers share the process: their own use of `random` during a run is not ours.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
async def test_hostile_requests_get_the_right_status(mesh: Mesh, method: MethodDescriptor) -> None:
    await asyncio.to_thread(run_property, method, mesh)


async def test_nothing_valid_is_lost_at_the_doors(mesh: Mesh) -> None:
    """Runs after the door methods' properties: what they reported accepted is in Kafka."""

    for topic in (mesh.ingestion_topic, mesh.feedback_topic):
        ledger = DOOR_LEDGER[topic]
        assert ledger.accepted, f"{topic}: no valid item was sent"
        landed = {str(v["event_id"]) for _, v in await read_all(mesh.kafka, topic)}
        missing = ledger.accepted - landed
        assert not missing, f"{topic}: accepted but not in Kafka: {sorted(missing)[:5]}"
        leaked = (ledger.refused - ledger.accepted) & landed
        assert not leaked, f"{topic}: refused but in Kafka: {sorted(leaked)[:5]}"
