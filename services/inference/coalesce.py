"""Coalescing of concurrent Open Inference Protocol requests into one batched Triton request.

A request that arrives while nothing of its kind is in flight goes to Triton as its original
bytes (the common, idle case: no decode, no encode). Under load, compatible requests queue for
at most ``max_delay`` and leave as one request whose tensors are the callers' rows stacked on
the batch dimension; the answer is cut back into one answer per caller by rows. That is one
gRPC call and one model execution instead of N, which is where a proxy's time goes.

Only plain requests are merged: same model, version, input names/types/trailing shape, same
requested outputs, every tensor in ``raw_input_contents``, no BYTES tensors, no parameters
except ``routing_key`` (no sequences, priorities or shared memory), and a model whose config
batches (``max_batch_size > 0``, known from Triton's ModelConfig). Anything else is forwarded
alone. If a merged request fails for a reason other than availability, each member is retried
alone, so one caller's bad tensor cannot fail its neighbours.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

from services.inference.batching import Coalescer
from services.inference.triton import RETRYABLE, TritonPool

Key = tuple[Any, ...]
Outcome = bytes | Exception
"""A serialized answer, or the grpc error (an AioRpcError) of that one request."""


class _Item:
    __slots__ = ("parsed", "raw", "rows")

    def __init__(self, parsed: Any, raw: bytes, rows: int) -> None:
        self.parsed = parsed
        self.raw = raw
        self.rows = rows


class InferCoalescer:
    """``infer(parsed, raw, version)`` -> serialized ModelInferResponse (or AioRpcError)."""

    def __init__(
        self,
        triton: TritonPool,
        *,
        max_rows: int,
        max_delay_s: float,
        max_inflight: int,
        config_ttl_s: float = 30.0,
    ) -> None:
        self._triton = triton
        self._max_rows = max_rows
        self._limits = (max_delay_s, max_inflight)
        self._config_ttl = config_ttl_s
        self._max_batch: dict[str, tuple[float, int]] = {}
        self._coalescers: dict[Key, Coalescer[_Item, Outcome]] = {}
        self.merged_requests = 0
        self.merged_items = 0

    async def infer(self, parsed: Any, raw: bytes, version: int | None, timeout: float) -> bytes:
        key, rows = await self._key(parsed, version)
        if key is None:
            return await self._triton.forward_infer(raw, timeout)
        coalescer = self._coalescers.get(key)
        if coalescer is None:
            delay, inflight = self._limits
            model_max = self._max_batch[parsed.model_name][1]
            per_batch = max(1, min(self._max_rows, model_max) // rows)

            async def flush(items: Sequence[_Item]) -> list[Outcome]:
                return await self._flush(items, version)

            coalescer = Coalescer(
                flush, max_size=per_batch, max_delay_s=delay, max_inflight=inflight
            )
            self._coalescers[key] = coalescer
        outcome = await coalescer.submit(_Item(parsed, raw, rows))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _key(self, parsed: Any, version: int | None) -> tuple[Key | None, int]:
        if any(name != "routing_key" for name in parsed.parameters):
            return None, 0
        inputs = parsed.inputs
        if not inputs or len(parsed.raw_input_contents) != len(inputs):
            return None, 0
        rows = inputs[0].shape[0] if inputs[0].shape else 0
        shapes = []
        for tensor in inputs:
            if (
                tensor.datatype == "BYTES"
                or tensor.parameters
                or not tensor.shape
                or tensor.shape[0] != rows
            ):
                return None, 0
            shapes.append((tensor.name, tensor.datatype, tuple(tensor.shape[1:])))
        if rows < 1 or any(out.parameters for out in parsed.outputs):
            return None, 0
        model_max = await self._model_max_batch(parsed.model_name)
        if model_max < 2 or rows * 2 > min(model_max, self._max_rows):
            return None, 0
        outputs = tuple(out.name for out in parsed.outputs)
        key = (parsed.model_name, version or parsed.model_version, tuple(shapes), outputs, rows)
        return key, rows

    async def _model_max_batch(self, model_name: str) -> int:
        cached = self._max_batch.get(model_name)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self._config_ttl:
            return cached[1]
        request = service_pb2.ModelConfigRequest(name=model_name)
        try:
            answer = await self._triton.stub().ModelConfig(request, timeout=self._triton.timeout_s)
            value = int(answer.config.max_batch_size)
        except grpc.aio.AioRpcError:
            value = 0  # unknown: forward alone; Triton will say what is wrong
        self._max_batch[model_name] = (now, value)
        return value

    async def _flush(self, items: Sequence[_Item], version: int | None) -> list[Outcome]:
        timeout = self._triton.timeout_s
        if len(items) == 1:
            return [await self._alone(items[0], timeout)]
        self.merged_requests += 1
        self.merged_items += len(items)
        merged = _merge(items, version)
        try:
            answer = await self._triton.forward_infer(merged, timeout)
            return _split(answer, items)
        except grpc.aio.AioRpcError as err:
            if err.code() in RETRYABLE:
                return [err] * len(items)
        except ValueError:
            pass  # an answer that cannot be cut by rows: ask for each alone
        return [await self._alone(item, timeout) for item in items]

    async def _alone(self, item: _Item, timeout: float) -> Outcome:
        try:
            return await self._triton.forward_infer(item.raw, timeout)
        except grpc.aio.AioRpcError as err:
            failed: Exception = err
            return failed


def _merge(items: Sequence[_Item], version: int | None) -> bytes:
    first = items[0].parsed
    merged = service_pb2.ModelInferRequest(
        model_name=first.model_name,
        model_version=str(version) if version is not None else first.model_version,
    )
    rows = sum(item.rows for item in items)
    for j, tensor in enumerate(first.inputs):
        out = merged.inputs.add(name=tensor.name, datatype=tensor.datatype)
        out.shape.extend([rows, *tensor.shape[1:]])
        merged.raw_input_contents.append(b"".join(i.parsed.raw_input_contents[j] for i in items))
    merged.outputs.extend(first.outputs)
    data: bytes = merged.SerializeToString()
    return data


def _split(answer: bytes, items: Sequence[_Item]) -> list[Outcome]:
    response = service_pb2.ModelInferResponse.FromString(answer)
    rows = sum(item.rows for item in items)
    if len(response.raw_output_contents) != len(response.outputs):
        raise ValueError("outputs without raw contents")
    widths = []
    for tensor, content in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES" or not tensor.shape or tensor.shape[0] != rows:
            raise ValueError(f"output {tensor.name} cannot be split by rows")
        if len(content) % rows:
            raise ValueError(f"output {tensor.name} is not {rows} equal rows")
        widths.append(len(content) // rows)
    outcomes: list[Outcome] = []
    offset = 0
    for item in items:
        part = service_pb2.ModelInferResponse(
            model_name=response.model_name,
            model_version=response.model_version,
            id=item.parsed.id,
        )
        for tensor, content, width in zip(
            response.outputs, response.raw_output_contents, widths, strict=True
        ):
            out = part.outputs.add(name=tensor.name, datatype=tensor.datatype)
            out.shape.extend([item.rows, *tensor.shape[1:]])
            part.raw_output_contents.append(content[offset * width : (offset + item.rows) * width])
        offset += item.rows
        outcomes.append(part.SerializeToString())
    return outcomes
