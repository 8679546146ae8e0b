# ruff: noqa: E402 (torch is blocked before feast is imported)
"""Writes golden.json: what the Python FeatureService and Feast compute, for golden_test.go.

Run from the repository root with the project's Python after changing any rule the data
plane mirrors (core.py validation, server.py values, Feast's key and hash layout):

    .venv/bin/python dataplane/internal/features/testdata/golden.py
"""

from __future__ import annotations

import base64
import json
import random
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.modules.setdefault("torch", None)  # type: ignore[arg-type]  # feast imports it, unused here

import mmh3
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Null, Value
from google.protobuf.timestamp_pb2 import Timestamp

from loopmesh.features.core import (
    FeatureSchema,
    FeatureSpec,
    FeatureStatus,
    RequestError,
    StoredValue,
    status_of,
    validate_entity_ids,
)
from loopmesh.features.server import _value
from loopmesh.features.store import _python_value
from loopmesh.gen.loopmesh.v1 import features_pb2
from loopmesh.mesh.model_repo import shown

b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
rng = random.Random(17)  # noqa: S311 (test data)


def random_text(n: int) -> str:
    pools = [
        (0x20, 0x7E),
        (0x00, 0x20),
        (0x7F, 0xA0),
        (0xA0, 0x2FF),
        (0x2000, 0x206F),
        (0xD7F0, 0xD7FF),
        (0xE000, 0xE010),
        (0xFFF0, 0xFFFF),
        (0x1F600, 0x1F64F),
        (0xE0000, 0xE0080),
        (0x10FFF0, 0x10FFFF),
        (0x30000, 0x3134F),
    ]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


texts = ["", "a", "it's", 'say "hi"', "both ' and \"", "back\\slash", "tab\tnl\ncr\r", "\x00\x7f"]
texts += ["é", "\u00a0", "\u2028", "\U0001f600", "\ufeff", "x" * 100, "é" * 90, "'" * 85]
texts += [random_text(rng.randint(1, 40)) for _ in range(400)]
spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
strips = ["a", " a", "a ", "\u3000a", "a\x1c", "\u200ba", "\u180ea", *[s + "x" for s in spaces]]

schema = FeatureSchema(
    [
        FeatureSpec("activity", "count_1h", "Int64", max_age_seconds=3600.0),
        FeatureSpec("activity", "last_type", "String", max_age_seconds=3600.0),
        FeatureSpec("numeric", "mean", "Float64"),
        FeatureSpec("items", "sold", "Int64", join_key="item_id", max_age_seconds=float("inf")),
    ]
)
requests = [
    ([], [], ""),
    (["a"] * 6, [], ""),
    (["a", ""], [], ""),
    (["a", " "], [], ""),
    (["a", " b"], [], ""),
    (["a", "b\u3000"], [], ""),
    (["x" * 256], [], ""),
    (["x" * 257], [], ""),
    (["é" * 257], [], ""),
    (["a"], [], "nope"),
    (["a"], [], "it's"),
    (["a"], [], "x" * 200),
    (["a"], ["activity:nope"], ""),
    (["a"], ["nope"], ""),
    (["a"], ["activity:count_1h", "items:sold"], ""),
    (["a"], ["items:sold"], "entity_id"),
    (["a"], ["activity:count_1h"], "item_id"),
    (["a"], ["a\nb"], ""),
    (["a"], [], "item_id"),
    (["a", "a"], ["activity:count_1h", "activity:count_1h"], ""),
]
validation = []
for ids, refs, join_key in requests:
    try:
        validate_entity_ids(ids, limit=5)
        specs = schema.resolve(refs, join_key or "entity_id")
        validation.append(
            {
                "ids": ids,
                "refs": refs,
                "join_key": join_key,
                "error": None,
                "resolved": [s.ref for s in specs],
            }
        )
    except RequestError as err:
        validation.append({"ids": ids, "refs": refs, "join_key": join_key, "error": str(err)})

values = [
    Value(),
    Value(int64_val=42),
    Value(int64_val=-(2**63)),
    Value(int64_val=2**53 + 1),
    Value(int32_val=-7),
    Value(double_val=0.0),
    Value(double_val=-1.5e300),
    Value(float_val=0.1),
    Value(bool_val=True),
    Value(bool_val=False),
    Value(string_val=""),
    Value(string_val="héllo"),
    Value(null_val=Null.NULL),
    Value(bytes_val=b"\x00\x01"),
    Value(unix_timestamp_val=5),
]
stored = []
for v in values:
    raw = v.SerializeToString()
    py = _python_value(v)
    stored.append({"raw": b64(raw), "kind": type(py).__name__, "value": py})
# Two oneof members on the wire: the last one wins.
two = Value(int64_val=1).SerializeToString() + Value(string_val="last").SerializeToString()
stored.append({"raw": b64(two), "kind": "str", "value": "last"})

now = 1_800_000_000.0
cells = []
for v in values:
    for event_time in (None, 1_799_990_000, 1_700_000_000):
        for max_age in (3600.0, float("inf")):
            sv = StoredValue(_python_value(v), event_time)
            status = status_of(sv, max_age=max_age, now=now)
            cells.append(
                {
                    "raw": b64(v.SerializeToString()),
                    "seconds": event_time or 0,
                    "max_age": None if max_age == float("inf") else max_age,
                    "status": {
                        FeatureStatus.PRESENT: 1,
                        FeatureStatus.MISSING: 2,
                        FeatureStatus.STALE: 3,
                    }[status],
                    "wire": b64(_value(sv, status).SerializeToString()),
                }
            )
response = features_pb2.GetOnlineFeaturesResponse(
    feature_refs=["v:a", "v:b"],
    entities=[
        features_pb2.EntityFeatures(
            entity_id=e,
            values=[
                _value(StoredValue(1, 1_700_000_000), FeatureStatus.PRESENT),
                _value(StoredValue("t", None), FeatureStatus.PRESENT),
            ],
        )
        for e in ("e1", "é2", "e1")
    ],
)

keys = []
for join_key, entity in [("entity_id", "u1"), ("item_id", "sku-42"), ("entity_id", "é" * 300)]:
    key = EntityKey(join_keys=[join_key], entity_values=[Value(string_val=entity)])
    keys.append(
        {
            "join_key": join_key,
            "id": entity,
            "key": b64(serialize_entity_key(key, entity_key_serialization_version=3)),
        }
    )
hashes = [
    {"text": t, "mmh3": mmh3.hash(t, signed=False), "field": b64(_mmh3(t))}
    for t in ["", "a", "ab", "abc", "abcd", "entity_activity:events_1h", "é:ü", "x" * 1001]
]

times = []
edges = [0, 999_999_000, 999_999_499, 999_999_500, 999_999_999]
for seconds, nanos in [*((1_700_000_000, n) for n in edges), (0, 0), (5, 1)]:
    ts = Timestamp(seconds=seconds, nanos=nanos)
    dt = datetime.fromtimestamp(ts.seconds + ts.nanos / 1_000_000_000.0, tz=UTC)
    out = Timestamp()
    out.FromDatetime(dt)
    times.append(
        {
            "seconds": seconds,
            "nanos": nanos,
            "served": out.seconds,
            "raw": b64(ts.SerializeToString()),
        }
    )

floats = [10.0, 0.5, 1e-05, 0.0001, 1e16, 123456789012345.6, 2.5e-7, 1e300, 3.0]
golden = {
    "python": sys.version.split()[0],
    "repr": [{"text": t, "repr": repr(t), "shown": shown(t)} for t in texts],
    "strip": [{"text": t, "strip": t.strip(), "len": len(t)} for t in strips],
    "float": [{"value": f, "repr": repr(f)} for f in floats],
    "validation": validation,
    "stored": stored,
    "cells": cells,
    "now": now,
    "response": b64(response.SerializeToString()),
    "keys": keys,
    "hashes": hashes,
    "times": times,
}
path = Path(__file__).with_name("golden.json")
path.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
print(f"wrote {path}")
