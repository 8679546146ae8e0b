"""Simulated worlds: what a project's simulator gives `loopmesh run` to drive the mesh.

A project may hold ``simulator.py`` with ``world(seed: int) -> World``: who calls, what the
model is asked with (context and categorical inputs), the interaction events the app would
ingest, and what really happens (a label or a value) under a hidden rule that ``drift``
changes. The simulator (``devstack.simulator``) sends all of it through the public doors with
``loopmesh.client``; the runner takes a labelled history from it for the first training. The
default project's world is the synthetic click-through population (``CtrWorld``).

The file is the user's code, loaded like their Feast definitions: by path, not by import
name, so two projects' simulators never shadow each other.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from loopmesh.client import Event
from loopmesh.devstack.synthetic import SyntheticConfig, SyntheticWorld
from loopmesh.mesh.errors import SetupError
from loopmesh.mesh.events import Task
from loopmesh.mesh.model_spec import importable

SIMULATOR_FILE = "simulator.py"


@dataclass(frozen=True)
class Request:
    """One prediction the app asks for, and the event it ingests with it."""

    entity_id: str
    context: dict[str, float] = field(default_factory=dict)
    categorical: dict[str, str] = field(default_factory=dict)
    event: Event | None = None


@dataclass(frozen=True)
class Outcome:
    """What happened: a label (binary 0/1, a class index) or a value (regression)."""

    label: int | None = None
    value: float | None = None

    @property
    def target(self) -> float:
        if self.label is not None:
            return float(self.label)
        if self.value is None:
            raise ValueError("an outcome needs a label or a value")
        return self.value


@runtime_checkable
class World(Protocol):
    """A simulated product: its model's traffic and the truth behind it."""

    model_name: str
    task: Task

    def sample(self, n: int, rng: np.random.Generator) -> list[Request]:
        """``n`` requests as the app would send them now."""
        ...

    def outcomes(self, requests: Sequence[Request], rng: np.random.Generator) -> list[Outcome]:
        """What happens after each request under the rule in force."""
        ...

    def drift(self) -> str:
        """Change the hidden rule; a line saying what changed."""
        ...


def load_world(project: Path, seed: int) -> World | None:
    """The world of ``project``'s ``simulator.py``, or None when it has none."""
    path = project / SIMULATOR_FILE
    if not path.is_file():
        return None
    name = f"loopmesh_project_simulator_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SetupError(f"{path}: cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    # Its own modules beside it (a project's torch code, say) import by name.
    importable(project)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code may fail in any way
        raise SetupError(f"{path}: {type(exc).__name__}: {exc}") from exc
    make = getattr(module, "world", None)
    if not callable(make):
        raise SetupError(f"{path} defines no world(seed) function")
    made = make(seed)
    if not isinstance(made, World):
        raise SetupError(f"{path}: world(seed) returned {type(made).__name__}, not a World")
    return made


def history(world: World, n: int, rng: np.random.Generator) -> list[tuple[Request, Outcome]]:
    """A labelled history of ``n`` requests (the first training set), oldest first."""
    requests = world.sample(n, rng)
    return list(zip(requests, world.outcomes(requests, rng), strict=True))


class CtrWorld:
    """The default project's world: the synthetic click-through population, drifting once."""

    task: Task = "binary"

    def __init__(self, model_name: str = "ctr", seed: int = 7) -> None:
        self.model_name = model_name
        self.synthetic = SyntheticWorld(SyntheticConfig(seed=seed, sharpness=2.0))

    def sample(self, n: int, rng: np.random.Generator) -> list[Request]:
        batch = self.synthetic.sample(n, rng)
        rows = batch.feature_dicts()
        return [
            Request(
                entity_id=entity_id,
                context=row,
                event=Event(
                    entity_id=entity_id,
                    event_type="view",
                    numeric={"value": row["price"], "amount": row["discount"]},
                    categorical={"category": "hour-" + ("day" if row["hour_sin"] > 0 else "night")},
                ),
            )
            for entity_id, row in zip(batch.entity_ids, rows, strict=True)
        ]

    def outcomes(self, requests: Sequence[Request], rng: np.random.Generator) -> list[Outcome]:
        features = np.asarray(
            [[r.context[name] for name in self.synthetic.feature_names] for r in requests]
        )
        p = self.synthetic.probability(features)
        return [Outcome(label=int(u < q)) for u, q in zip(rng.random(len(p)), p, strict=True)]

    def drift(self) -> str:
        self.synthetic.set_rule(1)
        return "the labelling rule changed"
