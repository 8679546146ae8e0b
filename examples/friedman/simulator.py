"""The simulated app for `loopmesh run --project examples/friedman`.

Requests come from River's FriedmanDrift stream, a standard concept-drift benchmark: ten
inputs uniform in [0, 1] and a target that a fixed function of the first five gives, until the
stream's global abrupt drift (``drift_type="gra"``) changes the function. On top of it, each
request is for one of twelve zones that adds its own minutes (the categorical input) and the
app ingests an event per request (which the project's stream features count). The drift comes
when the runner asks for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from river.datasets import synth

from loopmesh.client import Event
from loopmesh.devstack.worlds import Outcome, Request

ZONES = [f"zone-{i:02d}" for i in range(12)]
ZONE_MINUTES = dict(zip(ZONES, np.linspace(-6.0, 6.0, len(ZONES)).tolist(), strict=True))
NEVER = 10**12


class FriedmanWorld:
    model_name = "minutes"
    task = "regression"

    def __init__(self, seed: int) -> None:
        # Before the drift: a stream whose first drift point is never reached. After it: the
        # same generator past its first drift point (the second concept, global and abrupt).
        self._before = synth.FriedmanDrift(drift_type="gra", position=(NEVER, NEVER + 1), seed=seed)
        self._after = synth.FriedmanDrift(drift_type="gra", position=(1, NEVER), seed=seed + 1)
        self._stream = iter(self._before)
        self._targets: dict[int, float] = {}

    def sample(self, n: int, rng: np.random.Generator) -> list[Request]:
        out = []
        for _ in range(n):
            x, y = next(self._stream)
            zone = ZONES[int(rng.integers(len(ZONES)))]
            context = {f"x{i}": float(x[i]) for i in range(10)}
            request = Request(
                entity_id=zone,
                context=context,
                categorical={"zone": zone},
                event=Event(
                    entity_id=zone,
                    event_type="order",
                    numeric={"x0": context["x0"], "x1": context["x1"]},
                ),
            )
            self._targets[id(request)] = float(y) + ZONE_MINUTES[zone]
            out.append(request)
        return out

    def outcomes(self, requests: Sequence[Request], rng: np.random.Generator) -> list[Outcome]:
        return [
            Outcome(value=self._targets.pop(id(r)) + float(rng.normal(scale=0.5))) for r in requests
        ]

    def drift(self) -> str:
        self._stream = iter(self._after)
        return "FriedmanDrift's global abrupt drift: the target function changed"


def world(seed: int) -> FriedmanWorld:
    return FriedmanWorld(seed)
