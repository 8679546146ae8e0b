"""What the gateway knows about models from the registry on disk: versions and their specs.

Versions are immutable, so a version's spec is read once and cached; the list of published
versions (used only for models that have no route yet) is re-read after ``refresh_s``. Names
and versions are validated before they touch a path (``loopmesh.mesh.model_repo``).

A version's metadata.json says what Predict sends and reads back: ``feature_names`` (numeric
inputs, in input order), ``categorical`` (``ContextField`` dumps, one input column each after
the numeric ones, holding ``ContextField.index(value)``), ``task`` (absent: binary) and
``n_outputs`` (k, the width of OUTPUT__0; ``classes`` for multiclass). Metadata that
contradicts itself is a ``BadModelSpec`` (FAILED_PRECONDITION), never a wrong answer.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from loopmesh.mesh import model_repo
from loopmesh.mesh.errors import FailedPrecondition, UnknownModel
from loopmesh.mesh.events import MAX_CLASSES, Task
from loopmesh.mesh.model_spec import ContextField

TASKS: tuple[Task, ...] = get_args(Task)


class BadModelSpec(FailedPrecondition):
    """A published version whose metadata cannot drive Predict (no usable feature_names)."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The input contract of one model version."""

    model_name: str
    version: int
    feature_names: tuple[str, ...]
    """Model input order (metadata.json ``feature_names``)."""
    defaults: dict[str, float] = field(default_factory=dict)
    """Declared defaults (metadata.json ``feature_defaults``) merged over the gateway's."""
    store_refs: tuple[str, ...] = ()
    """The names that are feature-service references ("view:feature"), in input order."""
    categorical: tuple[ContextField, ...] = ()
    """Categorical context inputs (metadata.json ``categorical``), one input column each after
    the numeric ones, in this order."""
    task: Task = "binary"
    """metadata.json ``task`` (absent: binary, as every version before tasks)."""
    n_outputs: int = 1
    """Width of the model's output: 1, or the number of classes of a multiclass model."""

    @property
    def n_inputs(self) -> int:
        """Width of the input row: the numeric features, then one column per categorical."""
        return len(self.feature_names) + len(self.categorical)

    def categorical_field(self, name: str) -> ContextField | None:
        for declared in self.categorical:
            if declared.name == name:
                return declared
        return None


def is_store_ref(name: str) -> bool:
    """Feature-service references are "view:feature"; plain names come only from context."""
    view, sep, feature = name.partition(":")
    return bool(sep and view and feature)


class ModelCatalog:
    """Reads and caches model specs from a Triton model repository laid out by model_repo."""

    def __init__(
        self,
        repository: Path,
        *,
        refresh_s: float = 5.0,
        defaults: dict[str, float] | None = None,
        default_value: float = 0.0,
    ) -> None:
        if not math.isfinite(default_value):
            raise ValueError("default_value must be finite")
        self.repository = Path(repository)
        self._refresh_s = refresh_s
        self._defaults = dict(defaults or {})
        self.default_value = default_value
        self._specs: dict[tuple[str, int], ModelSpec] = {}
        self._versions: dict[str, tuple[float, list[int]]] = {}

    def versions(self, model_name: str) -> list[int]:
        """Published versions of a (valid) model name, ascending; cached for ``refresh_s``."""
        now = time.monotonic()
        cached = self._versions.get(model_name)
        if cached is not None and now - cached[0] < self._refresh_s:
            return cached[1]
        found = model_repo.list_versions(self.repository, model_name)
        # Only models the repository holds are cached: names come from clients, and caching
        # each unknown one grew this map without bound (a lookup of an absent directory is
        # one stat).
        if found:
            self._versions[model_name] = (now, found)
        else:
            self._versions.pop(model_name, None)
        return found

    @property
    def cached_models(self) -> int:
        """How many model names have their versions cached (at most the repository's)."""
        return len(self._versions)

    def models(self) -> list[str]:
        """Names of the models the repository holds (directories with a valid name)."""
        if not self.repository.is_dir():
            return []
        names = []
        for child in self.repository.iterdir():
            with contextlib.suppress(ValueError):
                if child.is_dir():
                    names.append(model_repo.validate_model_name(child.name))
        return sorted(names)

    def latest(self, model_name: str) -> int:
        found = self.versions(model_name)
        if not found:
            raise UnknownModel("model_name", f"unknown model {model_name!r}")
        return found[-1]

    def has_version(self, model_name: str, version: int) -> bool:
        if (model_name, version) in self._specs:
            return True
        return model_repo.version_dir(self.repository, model_name, version).is_dir()

    def default_for(self, spec: ModelSpec, name: str) -> float:
        return spec.defaults.get(name, self.default_value)

    def spec(self, model_name: str, version: int) -> ModelSpec:
        """The spec of a published version; UnknownModel naming the field otherwise."""
        key = (model_name, version)
        cached = self._specs.get(key)
        if cached is not None:
            return cached
        try:
            meta = model_repo.read_metadata(self.repository, model_name, version)
        except FileNotFoundError:
            if not self.versions(model_name):
                raise UnknownModel("model_name", f"unknown model {model_name!r}") from None
            raise UnknownModel(
                "model_version", f"model {model_name!r} has no version {version}"
            ) from None
        except (ValueError, json.JSONDecodeError) as exc:
            raise BadModelSpec(f"{model_name} version {version}: {exc}") from exc
        spec = self._parse(model_name, version, meta)
        self._specs[key] = spec
        return spec

    def _parse(self, model_name: str, version: int, meta: dict[str, object]) -> ModelSpec:
        where = f"{model_name} version {version} metadata.json"
        names = meta.get("feature_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadModelSpec(f"{where} declares no feature_names; Predict cannot build inputs")
        categorical = _categorical(where, meta.get("categorical"))
        if not names and not categorical:
            raise BadModelSpec(f"{where} declares no inputs; Predict cannot build inputs")
        n_inputs = len(names) + len(categorical)
        n_features = meta.get("n_features")
        if isinstance(n_features, int) and n_features != n_inputs:
            raise BadModelSpec(
                f"{where}: {len(names)} feature_names and {len(categorical)} categorical "
                f"inputs but n_features={n_features}"
            )
        task, n_outputs = _task_and_outputs(where, meta)
        declared = meta.get("feature_defaults") or {}
        if not isinstance(declared, dict):
            raise BadModelSpec(f"{where}: feature_defaults must be an object")
        defaults = dict(self._defaults)
        for name, value in declared.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise BadModelSpec(f"{where}: feature_defaults[{name!r}] is not a finite number")
            defaults[str(name)] = float(value)
        feature_names = tuple(str(n) for n in names)
        return ModelSpec(
            model_name=model_name,
            version=version,
            feature_names=feature_names,
            defaults=defaults,
            store_refs=tuple(n for n in feature_names if is_store_ref(n)),
            categorical=categorical,
            task=task,
            n_outputs=n_outputs,
        )


def _categorical(where: str, raw: object) -> tuple[ContextField, ...]:
    """metadata.json ``categorical``: absent or a list of categorical ``ContextField`` dumps."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BadModelSpec(f"{where}: categorical must be a list of fields")
    fields: list[ContextField] = []
    for i, dump in enumerate(raw):
        try:
            declared = ContextField.model_validate(dump)
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise BadModelSpec(f"{where}: categorical[{i}].{loc}: {first['msg']}") from None
        if declared.kind != "categorical":
            raise BadModelSpec(f"{where}: categorical[{i}] ({declared.name}) is not categorical")
        if any(f.name == declared.name for f in fields):
            raise BadModelSpec(f"{where}: categorical[{i}] repeats the name {declared.name!r}")
        fields.append(declared)
    return tuple(fields)


def _task_and_outputs(where: str, meta: dict[str, object]) -> tuple[Task, int]:
    """(task, k) of a version: binary and regression answer one number, multiclass k >= 2."""
    raw_task = meta.get("task", "binary")
    task = next((t for t in TASKS if t == raw_task), None)
    if task is None:
        raise BadModelSpec(f"{where}: task {model_repo.shown(raw_task)} is not one of {TASKS}")
    n_outputs = meta.get("n_outputs", 1)
    if isinstance(n_outputs, bool) or not isinstance(n_outputs, int) or n_outputs < 1:
        raise BadModelSpec(f"{where}: n_outputs {model_repo.shown(n_outputs)} is not k >= 1")
    if task != "multiclass":
        if n_outputs != 1:
            raise BadModelSpec(
                f"{where}: a {task} model answers one number, not n_outputs={n_outputs}"
            )
        return task, 1
    classes = meta.get("classes", n_outputs)
    if isinstance(classes, list):
        classes = len(classes)
    if isinstance(classes, bool) or not isinstance(classes, int):
        raise BadModelSpec(f"{where}: classes {model_repo.shown(classes)} is not a class count")
    if not 2 <= n_outputs <= MAX_CLASSES or classes != n_outputs:
        raise BadModelSpec(
            f"{where}: a multiclass model needs n_outputs = classes in 2..{MAX_CLASSES}, "
            f"not n_outputs={n_outputs}, classes={classes}"
        )
    return "multiclass", n_outputs
