"""Model specs: one declarative file per model in the user's project (``models/<name>.yaml``).

Why a declarative file and not a Python object: every deployable reads the spec (the trainer
trains it, inference builds its inputs, the joiner and the rollout controller judge it by its
task), and most of them must never import a user's module (no torch outside the trainer and
Triton, docs/architecture.md). A YAML file is read everywhere without running user code; only
the trainer imports ``module.factory``. pydantic validates it, and every error names the file
and the field (``models/ctr.yaml: label.threshold: ...``).

The kernel owns the shape shared by all; the sections one deployable alone understands
(``training``, ``gate``, ``rollout``) are kept as mappings here and validated by that
deployable with its own settings model, through ``section``, with the same kind of error.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loopmesh.mesh.errors import SetupError
from loopmesh.mesh.events import MAX_CLASSES, Task
from loopmesh.mesh.model_repo import MODEL_NAME_PATTERN

SPEC_DIR = "models"
"""Where a project keeps its model specs."""
DEFAULT_FACTORY = "loopmesh.trainer.models:mlp"
"""The built-in MLP (``module.factory`` when a spec names none)."""
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
M = TypeVar("M", bound=BaseModel)


class SpecError(SetupError):
    """A model spec that cannot be used: ``field`` is ``<file>: <field path>``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContextField(_Strict):
    """A field the caller sends with Predict (not read from the feature store)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    kind: Literal["numeric", "categorical"] = "numeric"
    buckets: int | None = Field(default=None, ge=2, le=1 << 20)
    """Categorical only: hashed into this many embedding rows."""
    vocabulary: tuple[str, ...] | None = None
    """Categorical only: known values (others share one out-of-vocabulary row)."""

    @model_validator(mode="after")
    def _categorical_encoding(self) -> ContextField:
        if self.kind == "categorical" and (self.buckets is None) == (self.vocabulary is None):
            raise ValueError("a categorical field needs buckets or a vocabulary (one of them)")
        if self.kind == "numeric" and (self.buckets is not None or self.vocabulary is not None):
            raise ValueError("buckets and vocabulary are for categorical fields")
        return self

    @property
    def cardinality(self) -> int:
        """Embedding rows a categorical field needs (a vocabulary's extra row: unknown values)."""
        if self.buckets is not None:
            return self.buckets
        return len(self.vocabulary or ()) + 1

    def index(self, value: str) -> int:
        """The embedding row of ``value``: the same in the trainer and the gateway.

        Hashed fields use blake2b (Python's ``hash`` is salted per process); a vocabulary
        maps its values to 1..n and anything else to 0.
        """
        if self.buckets is not None:
            digest = hashlib.blake2b(value.encode(), digest_size=8).digest()
            return int.from_bytes(digest, "big") % self.buckets
        vocabulary = self.vocabulary or ()
        try:
            return vocabulary.index(value) + 1
        except ValueError:
            return 0


class Inputs(_Strict):
    """What the model reads: online features of the project, and the request's context."""

    feature_service: str | None = None
    """A Feast ``FeatureService`` of the project."""
    features: tuple[str, ...] = ()
    """``view:feature`` references (when no feature service is named)."""
    context: tuple[ContextField, ...] = ()

    @model_validator(mode="after")
    def _some_input(self) -> Inputs:
        if self.feature_service is not None and self.features:
            raise ValueError("name a feature_service or list features, not both")
        if self.feature_service is None and not self.features and not self.context:
            raise ValueError("a model needs features, a feature_service or context fields")
        for ref in self.features:
            if ref.count(":") != 1:
                raise ValueError(f"{ref!r} is not a 'view:feature' reference")
        return self


class Label(_Strict):
    """How a feedback event becomes the training target."""

    source: Literal["label", "value", "reward"] = "label"
    """Feedback's ``label`` (0/1, or a class index), a numeric ``value``, or ``reward``."""
    threshold: float | None = None
    """binary from value or reward: positive when above this."""


class Module(_Strict):
    """The PyTorch module: an import path to a factory returning a ``torch.nn.Module``."""

    factory: str = DEFAULT_FACTORY
    """``package.module:callable``; called with (n_inputs, n_outputs, **args)."""
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _import_path(self) -> Module:
        if not _FACTORY.match(self.factory):
            raise ValueError(f"factory {self.factory!r} is not 'package.module:callable'")
        return self


class ModelSpec(_Strict):
    """One model of the project."""

    name: str = Field(pattern=rf"^{MODEL_NAME_PATTERN}$")
    task: Task
    classes: int | None = Field(default=None, ge=3, le=MAX_CLASSES)
    """multiclass only: how many classes (labels 0 .. classes-1)."""
    inputs: Inputs
    label: Label = Label()
    module: Module = Module()
    training: dict[str, Any] = Field(default_factory=dict)
    """The trainer's settings for this model (validated by the trainer)."""
    gate: dict[str, Any] = Field(default_factory=dict)
    """What a candidate must beat to be published (validated by the trainer)."""
    rollout: dict[str, Any] = Field(default_factory=dict)
    """Rollout policy overrides (validated by the rollout controller)."""
    triggers: dict[str, Any] = Field(default_factory=dict)
    """When the trainer retrains this model: new examples, drift (``drift_detector``: ADWIN
    or Page-Hinkley over the stable version's per-example loss, and their parameters), age
    (validated by the trainer)."""

    @model_validator(mode="after")
    def _task_rules(self) -> ModelSpec:
        if (self.task == "multiclass") != (self.classes is not None):
            raise ValueError("classes is required for multiclass and only for it")
        if self.task == "binary" and self.label.source != "label" and self.label.threshold is None:
            raise ValueError(f"a binary label from {self.label.source} needs label.threshold")
        if self.task == "regression" and self.label.source == "label":
            raise ValueError("a regression target comes from feedback value or reward")
        if self.task != "binary" and self.label.threshold is not None:
            raise ValueError("label.threshold makes a binary label: only for task binary")
        return self

    @property
    def outputs(self) -> int:
        """Width of the module's output: 1 (a logit or a value), or one logit per class."""
        return self.classes if self.task == "multiclass" and self.classes else 1


def _where(error: Mapping[str, Any]) -> str:
    return ".".join(str(part) for part in error["loc"]) or "(top level)"


def parse(text: str, source: str) -> ModelSpec:
    """The spec in ``text`` (YAML); SpecError names ``source`` and the first bad field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(source, f"not YAML: {err}") from None
    if not isinstance(data, dict):
        raise SpecError(source, "a model spec is a mapping (name, task, inputs, ...)")
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise SpecError(f"{source}: {_where(first)}", first["msg"]) from None


def load_spec_files(project: Path) -> dict[str, tuple[str, ModelSpec]]:
    """Every ``models/*.yaml`` of ``project`` by model name, with its file (``models/x.yaml``)."""
    directory = project / SPEC_DIR
    specs: dict[str, tuple[str, ModelSpec]] = {}
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    for path in files:
        source = f"{SPEC_DIR}/{path.name}"
        spec = parse(path.read_text(), source)
        if spec.name in specs:
            raise SpecError(f"{source}: name", f"model {spec.name!r} is specified twice")
        specs[spec.name] = (source, spec)
    return specs


def load_specs(project: Path) -> dict[str, ModelSpec]:
    """Every ``models/*.yaml`` of ``project`` by model name (none: an empty mapping)."""
    return {name: spec for name, (_, spec) in load_spec_files(project).items()}


def section(spec: ModelSpec, source: str, name: str, model: type[M], base: M | None = None) -> M:
    """One deployable's section of the spec as its own settings model (over ``base``)."""
    data: Mapping[str, Any] = getattr(spec, name)
    merged = {**(base.model_dump() if base is not None else {}), **data}
    try:
        return model.model_validate(merged)
    except ValidationError as err:
        first = err.errors()[0]
        raise SpecError(f"{source}: {name}.{_where(first)}", first["msg"]) from None


def check_features(
    spec: ModelSpec, source: str, known: Iterable[str], services: Mapping[str, Iterable[str]]
) -> list[str]:
    """The spec's feature references, each one declared by the project; SpecError if not.

    ``known``: every ``view:feature`` of the project; ``services``: its FeatureServices and
    the references each serves.
    """
    declared = set(known)
    if spec.inputs.feature_service is not None:
        refs = services.get(spec.inputs.feature_service)
        if refs is None:
            raise SpecError(
                f"{source}: inputs.feature_service",
                f"the project declares no FeatureService {spec.inputs.feature_service!r}",
            )
        return list(refs)
    for i, ref in enumerate(spec.inputs.features):
        if ref not in declared:
            raise SpecError(f"{source}: inputs.features[{i}]", f"the project declares no {ref!r}")
    return list(spec.inputs.features)


def importable(project: Path) -> None:
    """Put ``project`` first on the import path (once): a team's modules beside its specs."""
    if str(project) not in sys.path:
        sys.path.insert(0, str(project))


def import_factory(spec: ModelSpec, source: str, project: Path | None = None) -> Callable[..., Any]:
    """The module factory the spec names; SpecError when it cannot be imported.

    The module is looked up in ``project`` first (a team keeps its torch code beside its
    specs), then in what is installed.
    """
    if project is not None:
        importable(project)
    module_name, _, attribute = spec.module.factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a user's module may fail in any way while importing
        raise SpecError(
            f"{source}: module.factory", f"cannot import {module_name!r}: {err}"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise SpecError(
            f"{source}: module.factory", f"{module_name!r} has no callable {attribute!r}"
        )
    return factory  # type: ignore[no-any-return]
