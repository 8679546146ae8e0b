"""Checks that each input tensor of a ModelInferRequest carries exactly the data it declares.

The gateway forwards one caller's request as one Triton request (no merging with other
callers: Triton's dynamic batcher already batches), so a malformed tensor can only hurt its
own caller. Still it is refused here, naming the input: Triton 2.45's python backend answers
some malformed requests (bytes for two rows under a one-row shape) instead of refusing them.
"""

from __future__ import annotations

import math
import struct
from typing import Any

# Bytes per element of each fixed-size Open Inference Protocol datatype.
ELEMENT_BYTES = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
}

# The InferTensorContents field that holds each datatype's typed values (FP16 and BF16 have
# none: they travel only as raw bytes).
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_TYPED = sorted(set(TYPED_FIELD.values()))
_SHM = "shared_memory_region"


class TensorError(ValueError):
    """A tensor whose data does not match its declaration; the message names the input."""


def check_infer_inputs(request: Any) -> None:
    """Raise :class:`TensorError` unless every input's data matches its shape and datatype."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise TensorError(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs "
            "(raw contents must be given for every input or for none)"
        )
    for index, tensor in enumerate(request.inputs):
        where = f"inputs[{index}] ({tensor.name or 'unnamed'})"
        _check_tensor(tensor, raw[index] if raw else None, where)


def _check_tensor(tensor: Any, raw: bytes | None, where: str) -> None:
    if _SHM in tensor.parameters:
        # The region would have to be registered with Triton through us; we serve no such call.
        raise TensorError(f"{where}: shared memory is not served through the gateway")
    datatype = tensor.datatype
    if datatype != "BYTES" and datatype not in ELEMENT_BYTES:
        raise TensorError(f"{where}: unknown datatype {datatype!r}")
    if any(dim < 0 for dim in tensor.shape):
        raise TensorError(f"{where}: shape {list(tensor.shape)} has a negative dimension")
    elements = math.prod(tensor.shape)
    typed = [name for name in _ALL_TYPED if len(getattr(tensor.contents, name))]
    if raw is not None:
        if typed:
            raise TensorError(f"{where}: contents given together with raw_input_contents")
        _check_raw(datatype, elements, raw, tensor.shape, where)
        return
    expected = TYPED_FIELD.get(datatype)
    wrong = [name for name in typed if name != expected]
    if wrong:
        raise TensorError(f"{where}: contents.{wrong[0]} cannot hold {datatype}")
    given = len(getattr(tensor.contents, expected)) if expected else 0
    if given != elements:
        raise TensorError(
            f"{where}: {datatype} shape {list(tensor.shape)} declares {elements} elements, "
            f"contents hold {given}"
        )


def _check_raw(datatype: str, elements: int, raw: bytes, shape: Any, where: str) -> None:
    if datatype != "BYTES":
        needed = elements * ELEMENT_BYTES[datatype]
        if len(raw) != needed:
            raise TensorError(
                f"{where}: {datatype} shape {list(shape)} needs {needed} bytes, "
                f"raw_input_contents has {len(raw)}"
            )
        return
    # BYTES travel as a sequence of (4-byte little-endian length, bytes) elements.
    offset = count = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise TensorError(f"{where}: BYTES element {count} has a truncated length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4 + length
        if offset > len(raw):
            raise TensorError(f"{where}: BYTES element {count} is longer than the data left")
        count += 1
        if count > elements:
            break
    if count != elements:
        raise TensorError(
            f"{where}: BYTES shape {list(shape)} declares {elements} elements, "
            f"raw_input_contents holds {count if count <= elements else 'more'}"
        )
