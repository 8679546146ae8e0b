"""What the trainer builds for its model: the task, the inputs, the module (from its spec).

A model with a spec in the project (``models/<name>.yaml``, ``loopmesh.mesh.model_spec``)
trains what the spec says: its task and classes, its numeric inputs in the spec's order
(``inputs.features`` references and numeric context fields; with a ``feature_service``, the
references its examples carry), its categorical context fields as embeddings, its module
factory with its args, and its ``training`` and ``gate`` sections over the trainer's settings.
A model without a spec is today's binary model on every numeric input its examples carry.

``check`` builds the module once at start and exports it: a factory that cannot be imported,
does not build, or cannot be exported stops the trainer naming the spec's file and field,
before any data arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from torch import nn

from loopmesh.mesh.events import Task
from loopmesh.mesh.model_spec import (
    ContextField,
    ModelSpec,
    SpecError,
    import_factory,
    section,
)
from loopmesh.trainer.export import ExportError, export_module
from loopmesh.trainer.models import mlp
from loopmesh.trainer.prepare import Standardisation
from loopmesh.trainer.scoring import ScoringModule
from loopmesh.trainer.settings import (
    GateSettings,
    TrainerScope,
    TrainingSettings,
    TriggerSettings,
)

Factory = Callable[..., nn.Module]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ModelPlan:
    """The task and inputs of the trainer's model, and how to build its module."""

    task: Task = "binary"
    classes: int | None = None
    numeric: tuple[str, ...] | None = None
    """Numeric inputs in order; None: every numeric input the examples carry, sorted."""
    store_inputs: bool = False
    """The spec names a feature service: its references are taken from the examples."""
    categorical: tuple[ContextField, ...] = ()
    factory: Factory = mlp
    args: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    """The spec's file (``models/ctr.yaml``), or "" without a spec."""

    @property
    def n_outputs(self) -> int:
        return self.classes if self.task == "multiclass" and self.classes else 1

    @property
    def cardinalities(self) -> list[int]:
        return [f.cardinality for f in self.categorical]

    def inputs_from(self, carried: Sequence[str]) -> list[str] | None:
        """The numeric inputs of a run whose examples carry ``carried`` (None: choose)."""
        if self.store_inputs:
            refs = [name for name in sorted(carried) if ":" in name]
            return [*refs, *(self.numeric or ())]
        return list(self.numeric) if self.numeric is not None else None

    def build(self, n_inputs: int, hidden: Sequence[int]) -> nn.Module:
        """A fresh module from the factory (``hidden`` for the built-in one)."""
        args = dict(self.args)
        if self.factory is mlp:
            args.setdefault("hidden", tuple(hidden))
        if self.categorical:
            args["cardinalities"] = self.cardinalities
        try:
            module = self.factory(n_inputs, self.n_outputs, **args)
        except Exception as exc:  # a user's factory may fail in any way
            raise SpecError(
                f"{self.source}: module", f"the factory failed: {type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(module, nn.Module):
            raise SpecError(
                f"{self.source}: module.factory",
                f"returned {type(module).__name__}, not a torch.nn.Module",
            )
        return module

    def encode(self, categorical: Mapping[str, npt.NDArray[np.str_]], rows: int) -> FloatArray:
        """``[rows, m]`` embedding rows (as floats: the input row's tail) of the examples'
        categorical values; a value an example lacks is encoded as the gateway does, ``""``."""
        columns: list[list[float]] = []
        for spec in self.categorical:
            values = categorical.get(spec.name)
            if values is None:
                values = np.full(rows, "", dtype=np.str_)
            # Each distinct value is encoded once (a hash or a vocabulary lookup).
            distinct, inverse = np.unique(values, return_inverse=True)
            codes = np.asarray([float(spec.index(str(v))) for v in distinct])
            columns.append(codes[inverse].tolist() if rows else [])
        if not columns:
            return np.empty((rows, 0))
        return np.asarray(columns, dtype=np.float64).reshape(len(columns), rows).T

    def check(self, training: TrainingSettings) -> None:
        """Build and export the module on made-up rows; SpecError naming the spec if not."""
        n = len(self.numeric or ()) + (1 if self.store_inputs or not self.numeric else 0)
        big = np.full(n, 1e9)
        st = Standardisation(tuple(f"x{i}" for i in range(n)), -big, big, np.zeros(n), np.ones(n))
        module = ScoringModule(
            self.build(n, training.hidden), st, task=self.task, cardinalities=self.cardinalities
        )
        rng = np.random.default_rng(0)
        codes = [rng.integers(0, c, size=8).astype(np.float64) for c in self.cardinalities]
        rows = np.column_stack([rng.normal(size=(8, n)), *codes])
        try:
            export_module(module, rows)
        except ExportError as err:
            raise SpecError(
                f"{self.source}: module.factory", f"cannot be exported: {err}"
            ) from None


def plan_of(
    spec: ModelSpec | None, source: str, scope: TrainerScope, project: Path | None = None
) -> tuple[ModelPlan, TrainerScope]:
    """The plan of ``scope.model_name`` (its spec read from ``source`` in ``project``, or none)
    and the scope with the spec's sections applied."""
    if spec is None:
        return ModelPlan(), scope
    numeric_context = tuple(f.name for f in spec.inputs.context if f.kind == "numeric")
    categorical = tuple(f for f in spec.inputs.context if f.kind == "categorical")
    plan = ModelPlan(
        task=spec.task,
        classes=spec.classes,
        numeric=(*spec.inputs.features, *numeric_context),
        store_inputs=spec.inputs.feature_service is not None,
        categorical=categorical,
        factory=import_factory(spec, source, project),
        args=dict(spec.module.args),
        source=source,
    )
    training = section(spec, source, "training", TrainingSettings, base=scope.training)
    gate = section(spec, source, "gate", GateSettings, base=scope.gate)
    triggers = section(spec, source, "triggers", TriggerSettings, base=scope.triggers)
    return plan, scope.model_copy(update={"training": training, "gate": gate, "triggers": triggers})
