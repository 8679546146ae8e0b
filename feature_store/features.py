"""Feast definitions for LoopMesh's per-entity online features.

One entity (``entity``, join key ``entity_id``, a string) and two feature views. Each view is
fed through its own ``PushSource``: the features service's faust agents consume
``events.raw``, fold every interaction event into per-entity state and push the resulting row,
so nothing is ever materialized from the batch sources. Those batch ``FileSource`` parquet
files exist only because Feast requires a push source to name one; they live under ``data/``
next to this file (so the path is right from any cwd and, in a copied working repo, never
points back into the source tree).

``entity_activity`` (push source ``entity_activity_push``)
    ``events_1h``, ``events_24h`` (Int64): events with ``latest - 1 h < t <= latest`` (and
    24 h), where ``latest`` is the time of the entity's newest event: windows slide with the
    entity's own event time, never the clock, so arrival order does not change them.
    ``events_total`` (Int64): events seen overall (each ``event_id`` once).
    ``last_event_ts`` (Float64, unix seconds): time of the latest event. Recency
    ("seconds since the last event") changes while nothing happens, so it cannot be stored;
    consumers derive it as ``now - last_event_ts``.

``entity_numeric`` (push source ``entity_numeric_push``)
    Interaction events carry numeric attributes (name -> float) and categorical attributes
    (name -> str). A fixed, small projection of them is served:
    ``value_mean``, ``amount_mean`` (Float64): means of the numeric attributes ``value`` and
    ``amount`` over the events that carried them (null when none did).
    ``last_event_type`` (String): type of the latest event.
    ``last_category`` (String): the categorical attribute ``category`` of the latest event
    that carried one (null when none did).

Every pushed row carries ``entity_id`` and ``event_timestamp`` (the time of the newest event
folded into it; Feast keeps it to the second). The rules (event time, deduplication, allowed
lateness, erasure) are in loopmesh.features.core. The SQLite online store writes whatever
is pushed last, even an older row, so the features service skips pushes older than what is
stored; nor does it apply the TTL on online reads, so the service marks values older than the
TTL as STALE itself.

Online store: SQLite by default; Redis when the features service runs with
``LOOPMESH_FEATURES__ONLINE_STORE=redis`` and ``LOOPMESH_FEATURES__REDIS_URL`` (the registry
still comes from the applied repo; ``loopmesh.features.repo``). ``loopmesh infra up`` and
the tests apply these definitions in a working copy (services/loopmesh/mesh/feature_repo.py).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Float64, Int64, String

# Absolute, so `feast apply` gives the same result whatever the cwd.
DATA_DIR = Path(__file__).resolve().parent / "data"

# Generous: the store only serves the latest value per entity, and a quiet entity's
# features are still the best thing known about it. Older values are served as STALE.
# loopmesh.features.core mirrors it as DEFAULT_MAX_AGE_SECONDS (a test checks they agree).
FEATURE_TTL = timedelta(days=7)

entity = Entity(
    name="entity",
    join_keys=["entity_id"],
    # Declared so Feast never has to infer the key type from the (empty) batch source.
    value_type=ValueType.STRING,
    description="Anything that emits interaction events (a user, a device, an item).",
)


def _push_source(view_name: str) -> PushSource:
    return PushSource(
        name=f"{view_name}_push",
        batch_source=FileSource(
            name=f"{view_name}_batch",
            path=str(DATA_DIR / f"{view_name}.parquet"),
            timestamp_field="event_timestamp",
        ),
    )


entity_activity_push = _push_source("entity_activity")
entity_numeric_push = _push_source("entity_numeric")

entity_activity = FeatureView(
    name="entity_activity",
    entities=[entity],
    ttl=FEATURE_TTL,
    schema=[
        Field(name="entity_id", dtype=String),
        Field(name="events_1h", dtype=Int64, description="Events in the hour before the last."),
        Field(name="events_24h", dtype=Int64, description="Events in the day before the last."),
        Field(name="events_total", dtype=Int64, description="Events seen overall."),
        Field(name="last_event_ts", dtype=Float64, description="Latest event, unix seconds."),
    ],
    online=True,
    source=entity_activity_push,
    tags={"computed_by": "features-service"},
)

entity_numeric = FeatureView(
    name="entity_numeric",
    entities=[entity],
    ttl=FEATURE_TTL,
    schema=[
        Field(name="entity_id", dtype=String),
        Field(name="value_mean", dtype=Float64, description="Mean of numeric attr `value`."),
        Field(name="amount_mean", dtype=Float64, description="Mean of numeric attr `amount`."),
        Field(name="last_event_type", dtype=String, description="Type of the latest event."),
        Field(name="last_category", dtype=String, description="Latest `category` attribute."),
    ],
    online=True,
    source=entity_numeric_push,
    tags={"computed_by": "features-service"},
)
