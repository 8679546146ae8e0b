"""The simulated app for `loopmesh run --project examples/sea`.

Requests come from River's SEA stream, a standard concept-drift benchmark (Street and Kim,
2001): three attributes uniform in [0, 10] and a label that says whether ``x0 + x1`` is at
most a threshold, with 10% of labels flipped. Each sample is a point of its own: the app
ingests an ``observed`` event with its attributes (the project's stream features) and asks
for a prediction about that point. The drift, when the runner asks for it, is abrupt: the
next concept's threshold (variants 0 -> 1 -> 2 -> 3, thresholds 8, 9, 7, 9.5).

The request's context repeats the attributes under their feature names, so that a
prediction never waits for the fold (and the first training set has them); ``bench
prequential`` drives the same project without context, reading the store.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from river.datasets import synth

from loopmesh.client import Event
from loopmesh.devstack.worlds import Outcome, Request

VIEW = "sea_point"
NAMES = ("x0", "x1", "x2")
NOISE = 0.1


def sea(variant: int, seed: int, noise: float = NOISE) -> Iterator[tuple[list[float], int]]:
    """SEA's samples under concept ``variant``: (attributes, label)."""
    for x, y in synth.SEA(variant=variant, noise=noise, seed=seed):
        yield [float(x[i]) for i in range(3)], int(y)


def request(entity_id: str, x: Sequence[float], *, with_context: bool = True) -> Request:
    """The app's request about one point: its event and (optionally) the same values."""
    numeric = dict(zip(NAMES, x, strict=True))
    context = {f"{VIEW}:{n}": v for n, v in numeric.items()} if with_context else {}
    return Request(
        entity_id=entity_id,
        context=context,
        event=Event(entity_id=entity_id, event_type="observed", numeric=numeric),
    )


class SeaWorld:
    model_name = "sea"
    task = "binary"

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._variant = 0
        self._stream = sea(0, seed)
        self._labels: dict[int, int] = {}
        self._count = 0

    def sample(self, n: int, rng: np.random.Generator) -> list[Request]:
        out = []
        for _ in range(n):
            x, y = next(self._stream)
            self._count += 1
            r = request(f"point-{self._seed}-{self._variant}-{self._count}", x)
            self._labels[id(r)] = y
            out.append(r)
        return out

    def outcomes(self, requests: Sequence[Request], rng: np.random.Generator) -> list[Outcome]:
        return [Outcome(label=self._labels.pop(id(r))) for r in requests]

    def drift(self) -> str:
        self._variant = (self._variant + 1) % 4
        self._stream = sea(self._variant, self._seed + self._variant)
        return f"SEA's abrupt drift: concept {self._variant} (a new threshold on x0 + x1)"


def world(seed: int) -> SeaWorld:
    return SeaWorld(seed)
