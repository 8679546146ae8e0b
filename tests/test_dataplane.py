"""The native data plane (``loopmesh-dataplane``) on its own: the checks it makes before any
request reaches Triton, its admin API and its config errors.

Triton and the backend are addresses where nothing listens: a request the data plane lets
through fails UNAVAILABLE there, a request it refuses is INVALID_ARGUMENT naming the input.
Routing, fallback, proxying and metrics against a real Triton are in
``test_inference_gateway.py`` and ``test_inference_operational.py``.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2

from loopmesh.devstack.process import free_port
from loopmesh.inference.dataplane import find_binary

pytestmark = pytest.mark.integration
INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class Plane:
    proc: subprocess.Popen[bytes]
    grpc: str
    admin: str

    def admin_call(self, method: str, path: str, body: Any = None) -> tuple[int, str]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://{self.admin}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()


def _config(**overrides: Any) -> dict[str, Any]:
    nowhere = f"127.0.0.1:{free_port()}"
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "backend": nowhere,
        "tls": None,
        "tokens": [],
        "triton": {"address": nowhere, "channels": 1, "timeout_s": 1.0, "tls": None},
        "admin_listen": "127.0.0.1:0",
        "metrics_listen": None,
        "max_message_bytes": 1 << 20,
        "max_concurrent_streams": 64,
        "otlp_endpoint": None,
        "service_name": "inference-dataplane",
    }
    config.update(overrides)
    return config


def _start(config: dict[str, Any]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [str(find_binary(None)), "--config", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(config).encode())
    proc.stdin.close()
    return proc


@pytest.fixture(scope="module")
def plane() -> Iterator[Plane]:
    proc = _start(_config())
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once every listener is bound
    assert line, proc.stderr.read().decode() if proc.stderr else ""
    said = json.loads(line)
    try:
        yield Plane(proc, said["grpc"], said["admin"])
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


@pytest.fixture
async def infer(plane: Plane) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(plane.grpc) as channel:
        yield channel.unary_unary(
            INFER,
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )


async def _status(infer: Any, request: service_pb2.ModelInferRequest) -> tuple[Any, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await infer(request, timeout=10)
    return caught.value.code(), caught.value.details() or ""


def _tensor_request(datatype: str, shape: list[int]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype)
    tensor.shape.extend(shape)
    return request


def _bytes_elements(*items: bytes) -> bytes:
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


@pytest.mark.parametrize(
    ("datatype", "shape", "raw"),
    [
        ("FP32", [2, 3], bytes(24)),
        ("FP16", [1, 4], bytes(8)),
        ("INT64", [0, 3], b""),
        ("BOOL", [5], bytes(5)),
        ("BYTES", [1, 2], _bytes_elements(b"ab", b"")),
    ],
)
async def test_raw_tensors_whose_bytes_match_their_shape_go_on_to_triton(
    infer: Any, datatype: str, shape: list[int], raw: bytes
) -> None:
    request = _tensor_request(datatype, shape)
    request.raw_input_contents.append(raw)
    code, details = await _status(infer, request)
    assert code == grpc.StatusCode.UNAVAILABLE, details  # Triton is not there
    assert details.startswith("triton: "), details


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "says"),
    [
        ("FP32", [1, 8], bytes(64), "FP32 shape [1, 8] needs 32 bytes, raw_input_contents has 64"),
        ("FP32", [1, 8], b"", "needs 32 bytes, raw_input_contents has 0"),
        ("FP64", [2], bytes(15), "needs 16 bytes"),
        ("BYTES", [2], _bytes_elements(b"a"), "declares 2 elements, raw_input_contents holds 1"),
        ("BYTES", [1], _bytes_elements(b"a", b"b"), "holds more"),
        ("BYTES", [1], b"\x05\x00\x00\x00ab", "BYTES element 0 is longer than the data left"),
        ("BYTES", [1], _bytes_elements(b"a") + b"\x01", "element 1 has a truncated length prefix"),
        ("FP32", [-1, 8], b"", "shape [-1, 8] has a negative dimension"),
        ("COMPLEX", [1], b"", "unknown datatype 'COMPLEX'"),
    ],
)
async def test_raw_tensors_that_do_not_match_are_refused_naming_the_input(
    infer: Any, datatype: str, shape: list[int], raw: bytes, says: str
) -> None:
    request = _tensor_request(datatype, shape)
    request.raw_input_contents.append(raw)
    code, details = await _status(infer, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("inputs[0] (x): ") and says in details, details


async def test_typed_contents_must_match_shape_and_datatype(infer: Any) -> None:
    fits = _tensor_request("FP32", [2, 2])
    fits.inputs[0].contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    assert (await _status(infer, fits))[0] == grpc.StatusCode.UNAVAILABLE
    fits.inputs[0].contents.fp32_contents.append(5.0)
    refused = [
        (fits, "FP32 shape [2, 2] declares 4 elements, contents hold 5"),
    ]
    wrong = _tensor_request("FP32", [1])
    wrong.inputs[0].contents.int_contents.append(1)
    refused.append((wrong, "contents.int_contents cannot hold FP32"))
    half = _tensor_request("FP16", [1])
    refused.append((half, "declares 1 elements, contents hold 0"))
    for request, says in refused:
        code, details = await _status(infer, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and says in details, details
    text = _tensor_request("BYTES", [2])
    text.inputs[0].contents.bytes_contents.extend([b"a", b"b"])
    assert (await _status(infer, text))[0] == grpc.StatusCode.UNAVAILABLE


async def test_raw_contents_go_with_every_input_or_none(infer: Any) -> None:
    two = _tensor_request("FP32", [1])
    two.inputs.add(name="y", datatype="FP32", shape=[1])
    two.raw_input_contents.append(bytes(4))
    both = _tensor_request("FP32", [1])
    both.inputs[0].contents.fp32_contents.append(1.0)
    both.raw_input_contents.append(bytes(4))
    shm = _tensor_request("FP32", [1])
    shm.inputs[0].parameters["shared_memory_region"].string_param = "r"
    for request, says in [
        (two, "raw_input_contents: 1 entries for 2 inputs"),
        (both, "inputs[0] (x): contents given together with raw_input_contents"),
        (shm, "inputs[0] (x): shared memory is not served through the gateway"),
    ]:
        code, details = await _status(infer, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and says in details, details


async def test_names_and_versions_are_checked_before_anything_else(infer: Any) -> None:
    cases = [
        (service_pb2.ModelInferRequest(), "model_name: required"),
        (service_pb2.ModelInferRequest(model_name="../etc"), "model_name: invalid model name"),
        (
            service_pb2.ModelInferRequest(model_name="m", model_version="01"),
            "model_version: invalid model version '01'",
        ),
    ]
    for request, says in cases:
        code, details = await _status(infer, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(says), details


async def test_garbage_bytes_are_refused(plane: Plane) -> None:
    async with grpc.aio.insecure_channel(plane.grpc) as channel:
        raw = channel.unary_unary(INFER)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(b"\xff\xff\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_admin_takes_a_whole_route_table_and_refuses_a_bad_one(plane: Plane) -> None:
    table = {
        "ready": True,
        "routes": {"m": {"stable": 1, "canary": 2, "weight": 0.25, "known": [1, 2]}},
    }
    assert plane.admin_call("PUT", "/routes", table)[0] == 204
    status, body = plane.admin_call("GET", "/routes")
    assert status == 200 and json.loads(body)["routes"]["m"]["canary"] == 2
    for bad in (
        {"ready": True, "routes": {"m": {"stable": 1, "canary": 2, "weight": 1.5, "known": []}}},
        {"ready": True, "routes": {"a.b": {"stable": 1, "canary": None, "weight": 0, "known": []}}},
        {"ready": True, "routes": {"m": {"stable": 0, "canary": None, "weight": 0, "known": []}}},
    ):
        assert plane.admin_call("PUT", "/routes", bad)[0] == 400, bad
    # A refused table leaves the one in force.
    assert json.loads(plane.admin_call("GET", "/routes")[1])["routes"]["m"]["stable"] == 1


def test_a_config_error_names_the_key_and_exits_2() -> None:
    proc = _start(_config(listne="127.0.0.1:0"))
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.wait(timeout=30) == 2
    out, err = proc.stdout.read(), proc.stderr.read()
    assert not out  # no "listening" line
    assert b"listne" in err
