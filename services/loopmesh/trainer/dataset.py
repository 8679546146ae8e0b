"""The training set on disk: append-only partitioned parquet, erasure, dedup, split, cleaning.

Layout under ``root``::

    examples/model=<name>/date=<YYYY-MM-DD>/part-<ns>-<hex>.parquet   one file per flush
    erasures.jsonl                                                    erased entity ids

A flush writes new files (temp name, then rename); files are never rewritten per event. The
only rewrite is ``purge_erased``, which removes erased entities' rows for good (right to
erasure); until it ran, ``load`` already excludes them. Features are wide columns named
``feature:<name>`` so a file is truly columnar; files with other feature sets unify on read
(missing values are null, imputed later). Clipping, standardisation and the time split of
the loaded rows are in ``prepare``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loopmesh.mesh import model_repo
from loopmesh.mesh.events import LabelledExample

FEATURE_PREFIX = "feature:"
CATEGORICAL_PREFIX = "categorical:"
_TS = pa.timestamp("us", tz="UTC")
_BASE_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("prediction_id", pa.string()),
        ("entity_id", pa.string()),
        ("model_name", pa.string()),
        ("model_version", pa.int64()),
        ("target", pa.float64()),
        ("score", pa.float64()),
        ("predicted_at", _TS),
        ("feedback_at", _TS),
    ]
)
FloatArray = npt.NDArray[np.float64]


@dataclass
class Frame:
    """Clean examples of one model, oldest prediction first."""

    prediction_ids: npt.NDArray[np.str_]
    entity_ids: npt.NDArray[np.str_]
    predicted_at: FloatArray
    """Epoch seconds."""
    labels: FloatArray
    """The targets: 0/1 (binary), a class index (multiclass), a value (regression)."""
    scores: FloatArray
    model_versions: npt.NDArray[np.int64]
    features: dict[str, FloatArray]
    """Raw values by feature name; NaN where an example lacked the feature."""
    categorical: dict[str, npt.NDArray[np.str_]] = field(default_factory=dict)
    """Categorical inputs as sent, by name; "" where an example lacked it."""

    def __len__(self) -> int:
        return int(self.labels.size)

    def take(self, index: npt.NDArray[np.int64]) -> Frame:
        return Frame(
            prediction_ids=self.prediction_ids[index],
            entity_ids=self.entity_ids[index],
            predicted_at=self.predicted_at[index],
            labels=self.labels[index],
            scores=self.scores[index],
            model_versions=self.model_versions[index],
            features={k: v[index] for k, v in self.features.items()},
            categorical={k: v[index] for k, v in self.categorical.items()},
        )

    def matrix(self, feature_names: Sequence[str]) -> FloatArray:
        """[n, len(feature_names)] raw inputs; NaN for features the examples lack."""
        missing = np.full(len(self), np.nan)
        columns = [self.features.get(name, missing) for name in feature_names]
        return np.column_stack(columns) if columns else np.empty((len(self), 0))


class Dataset:
    """The append-only example store of one trainer (thread-safe)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.examples_dir = self.root / "examples"
        self.erasures_path = self.root / "erasures.jsonl"
        self.examples_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._counts: dict[str, int] | None = None

    # -- writing -----------------------------------------------------------------------------

    def append(self, examples: Sequence[LabelledExample]) -> list[Path]:
        """Write ``examples`` as new files (one per model and day); durable when it returns.

        Examples of erased entities are dropped.
        """
        groups: dict[tuple[str, str], list[LabelledExample]] = defaultdict(list)
        written = []
        with self._lock:
            # Read under the lock: an erasure recorded meanwhile is not missed. An erased
            # entity's late examples (joined after the erasure) never reach disk.
            erased = self.erased()
            for example in examples:
                if example.entity_id in erased:
                    continue
                day = example.predicted_at.astimezone(UTC).date().isoformat()
                groups[(example.model_name, day)].append(example)
            counts = self._row_counts()
            for (model_name, day), group in sorted(groups.items()):
                directory = self._model_dir(model_name) / f"date={day}"
                _make_dirs_durably(directory)
                path = directory / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
                _write_atomic(_to_table(group), path)
                counts[model_name] = counts.get(model_name, 0) + len(group)
                written.append(path)
        return written

    def record_erasures(self, entity_ids: Iterable[str]) -> None:
        """Remember erased entities durably; ``load`` excludes them from then on."""
        lines = "".join(json.dumps({"entity_id": e}) + "\n" for e in entity_ids)
        if not lines:
            return
        with self._lock, self.erasures_path.open("a") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())

    def erased(self) -> set[str]:
        if not self.erasures_path.exists():
            return set()
        out = set()
        for line in self.erasures_path.read_text().splitlines():
            if line.strip():
                out.add(str(json.loads(line)["entity_id"]))
        return out

    def purge_erased(self) -> int:
        """Rewrite the files holding erased entities without them; returns rows removed."""
        erased = pa.array(sorted(self.erased()), pa.string())
        if len(erased) == 0:
            return 0
        removed = 0
        with self._lock:
            for path in self._files():
                ids = pq.read_table(path, columns=["entity_id"]).column("entity_id")
                hits = int(pc.sum(pc.is_in(ids, value_set=erased)).as_py() or 0)
                if not hits:
                    continue
                table = pq.read_table(path)
                keep = table.filter(pc.invert(pc.is_in(table.column("entity_id"), erased)))
                if keep.num_rows:
                    _write_atomic(keep, path)
                else:
                    path.unlink()
                removed += hits
            self._counts = None
        return removed

    # -- reading -----------------------------------------------------------------------------

    def row_count(self, model_name: str) -> int:
        """Rows ever appended for the model (duplicates included, purged rows not)."""
        with self._lock:
            return self._row_counts().get(model_name, 0)

    def load(
        self,
        model_name: str,
        *,
        window_rows: int | None = None,
        window_seconds: float | None = None,
        since: float | None = None,
        since_min_rows: int = 0,
    ) -> Frame:
        """Clean examples: erased entities out, unlabelled rows out, one row per prediction.

        ``since`` (epoch seconds) keeps only rows predicted at or after it, unless fewer than
        ``since_min_rows`` are: then the newest ``since_min_rows`` (a drift's change point as
        the window's floor, never below a trainable set). The row and time windows bound the
        result as well.

        Only the days a window can reach are read (files live in ``date=YYYY-MM-DD`` folders
        of their rows' prediction day): newest days first, until ``window_seconds`` back from
        the newest day, until ``window_rows`` clean rows, or until ``since``'s day once that
        holds ``since_min_rows``; everything without a window.
        """
        # Under the lock: a purge after an erasure rewrites files.
        with self._lock:
            paths = [p for p in self._files() if p.is_relative_to(self._model_dir(model_name))]
            days = sorted({p.parent.name for p in paths}, reverse=True)
            if window_seconds is not None and days:
                newest = date.fromisoformat(days[0].removeprefix("date="))
                reach = math.ceil(window_seconds / 86400.0)
                oldest = (newest - timedelta(days=reach)).isoformat()
                days = [d for d in days if d.removeprefix("date=") >= oldest]
            since_day = (
                None
                if since is None
                else "date=" + datetime.fromtimestamp(since, UTC).date().isoformat()
            )
            read: dict[Path, pa.Table] = {}
            taken: set[str] = set()
            table: pa.Table | None = None
            for day in days:
                taken.add(day)
                reached = since_day is not None and day <= since_day
                if window_rows is None and not reached and day != days[-1]:
                    continue  # no row bound: every day in reach, read at once below
                # Oldest file first (the global order), so a prediction's first row is kept.
                chosen = [p for p in paths if p.parent.name in taken]
                for path in chosen:
                    if path not in read:
                        read[path] = pq.read_table(path)
                table = self._clean([read[p] for p in chosen])
                if window_rows is not None and table.num_rows >= window_rows:
                    break
                if reached and table.num_rows >= since_min_rows:
                    break  # rows before ``since`` matter only to reach since_min_rows
        if table is None or table.num_rows == 0:
            return _empty_frame()
        predicted = pc.cast(table.column("predicted_at"), pa.int64()).to_numpy() / 1e6
        pids = table.column("prediction_id").to_numpy(zero_copy_only=False).astype(str)
        order = np.lexsort((pids, predicted))
        if window_seconds is not None and order.size:
            newest_at = predicted[order[-1]]
            order = order[predicted[order] >= newest_at - window_seconds]
        if since is not None:
            after = order[predicted[order] >= since]
            order = after if after.size >= since_min_rows else order[-since_min_rows:]
        if window_rows is not None:
            order = order[-window_rows:]
        return _frame(table.take(pa.array(order)))

    def _clean(self, tables: list[pa.Table]) -> pa.Table:
        """Erased entities and unlabelled rows out; one row per prediction (its first)."""
        if not tables:
            return pa.table({"prediction_id": pa.array([], pa.string())})
        table = pa.concat_tables(tables, promote_options="default")
        erased = pa.array(sorted(self.erased()), pa.string())
        mask = pc.invert(pc.is_in(table.column("entity_id"), value_set=erased))
        if "label" in table.column_names:
            # Files of the first schema held an int "label" where "target" is now.
            old = pc.cast(table.column("label"), pa.float64())
            table = table.set_column(
                table.column_names.index("target"),
                "target",
                pc.coalesce(table.column("target"), old),
            )
        mask = pc.and_(mask, pc.is_valid(table.column("target")))
        table = table.filter(mask)
        # Files are read oldest first, so the first row of a prediction is its first arrival.
        ids = table.column("prediction_id").to_numpy(zero_copy_only=False).astype(str)
        _, first = np.unique(ids, return_index=True)
        return table.take(pa.array(np.sort(first)))

    # -- internals ---------------------------------------------------------------------------

    def _model_dir(self, model_name: str) -> Path:
        return self.examples_dir / f"model={model_repo.validate_model_name(model_name)}"

    def _files(self) -> list[Path]:
        files = [p for p in self.examples_dir.rglob("part-*.parquet") if p.is_file()]
        return sorted(files, key=lambda p: p.name)

    def _row_counts(self) -> dict[str, int]:
        if self._counts is None:
            counts: dict[str, int] = defaultdict(int)
            for path in self._files():
                model = path.parent.parent.name.removeprefix("model=")
                counts[model] += pq.read_metadata(path).num_rows
            self._counts = dict(counts)
        return self._counts


def _to_table(examples: Sequence[LabelledExample]) -> pa.Table:
    names = sorted({name for e in examples for name in e.features})
    columns: dict[str, list[object]] = {
        "event_id": [e.event_id for e in examples],
        "prediction_id": [e.prediction_id for e in examples],
        "entity_id": [e.entity_id for e in examples],
        "model_name": [e.model_name for e in examples],
        "model_version": [e.model_version for e in examples],
        "target": [e.target for e in examples],
        "score": [e.score for e in examples],
        "predicted_at": [e.predicted_at for e in examples],
        "feedback_at": [e.feedback_at for e in examples],
    }
    arrays = [pa.array(columns[f.name], f.type) for f in _BASE_SCHEMA]
    fields = list(_BASE_SCHEMA)
    for name in names:
        arrays.append(pa.array([e.features.get(name) for e in examples], pa.float64()))
        fields.append(pa.field(FEATURE_PREFIX + name, pa.float64()))
    for name in sorted({name for e in examples for name in e.categorical}):
        arrays.append(pa.array([e.categorical.get(name) for e in examples], pa.string()))
        fields.append(pa.field(CATEGORICAL_PREFIX + name, pa.string()))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _write_atomic(table: pa.Table, path: Path) -> None:
    # Readers skip dot files, so a half-written file is never read.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    # The rename is durable only once its directory is synced: without it a power loss could
    # drop a file whose examples' offsets are already committed.
    model_repo.fsync_dir(path.parent)


def _make_dirs_durably(directory: Path) -> None:
    """``mkdir -p`` whose new entries survive a power loss (each new one's parent synced)."""
    missing = []
    at = directory
    while not at.exists():
        missing.append(at)
        at = at.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        model_repo.fsync_dir(new.parent)


def _frame(table: pa.Table) -> Frame:
    def floats(name: str) -> FloatArray:
        column = pc.cast(table.column(name), pa.float64()).fill_null(np.nan)
        return np.asarray(column.to_numpy(), dtype=np.float64)

    features = {
        name.removeprefix(FEATURE_PREFIX): floats(name)
        for name in table.column_names
        if name.startswith(FEATURE_PREFIX)
    }
    return Frame(
        prediction_ids=table.column("prediction_id").to_numpy(zero_copy_only=False).astype(str),
        entity_ids=table.column("entity_id").to_numpy(zero_copy_only=False).astype(str),
        predicted_at=pc.cast(table.column("predicted_at"), pa.int64()).to_numpy() / 1e6,
        labels=floats("target"),
        scores=floats("score"),
        model_versions=table.column("model_version").to_numpy().astype(np.int64),
        features=features,
        categorical={
            name.removeprefix(CATEGORICAL_PREFIX): np.asarray(
                table.column(name).fill_null("").to_numpy(zero_copy_only=False), dtype=np.str_
            )
            for name in table.column_names
            if name.startswith(CATEGORICAL_PREFIX)
        },
    )


def _empty_frame() -> Frame:
    empty = np.empty(0)
    return Frame(
        prediction_ids=np.empty(0, dtype=str),
        entity_ids=np.empty(0, dtype=str),
        predicted_at=empty,
        labels=empty,
        scores=empty,
        model_versions=np.empty(0, dtype=np.int64),
        features={},
    )
