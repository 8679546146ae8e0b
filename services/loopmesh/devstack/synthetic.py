"""Synthetic traffic whose true labelling rule is known, with a switch for concept drift.

Reusable by tests, ``bench/learning_curve.py`` and the ``loopmesh run`` simulator::

    world = SyntheticWorld(SyntheticConfig(seed=7))
    batch = world.sample(500)                   # entities, raw features, true probabilities
    labels = world.draw_labels(batch)           # Bernoulli(p_true)
    world.set_rule(1)                           # concept drift: another hidden rule
    pairs = traffic(batch, labels, model_name="ctr", model_version=3, scores=...)

Entities have a fixed profile (account age, activity, spend, click history, recency) and every
request adds context (price, discount, hour). Features have very different scales and a
heavy tail with rare outliers, so clipping and standardisation matter. The rules act on
log-scaled, standardised features with an interaction term, so a linear model on raw inputs
is not enough and a small MLP is.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt

from loopmesh.mesh.events import FeedbackEvent, LabelledExample, PredictionLogged

FEATURE_NAMES: tuple[str, ...] = (
    "account_age_days",
    "sessions_7d",
    "spend_30d",
    "click_rate_hist",
    "recency_hours",
    "price",
    "discount",
    "hour_sin",
)
"""Raw model inputs, in column order of ``Batch.features``."""

# Coefficients per rule on the standardised log features (see ``_latent``); the last entry
# weighs the discount x activity interaction. Rule 1 flips what drives a positive label.
RULES: tuple[tuple[float, ...], ...] = (
    (0.2, 0.9, 0.6, 1.4, -0.9, -0.8, 0.5, 0.3, 1.0),
    (0.8, -0.6, -0.4, -1.2, 0.9, 1.1, -0.3, -0.5, -1.0),
)
BIASES: tuple[float, ...] = (-0.4, 0.1)

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the synthetic population."""

    n_entities: int = 1000
    seed: int = 0
    outlier_rate: float = 0.01
    """Share of entities whose spend is a 100x outlier."""
    sharpness: float = 1.0
    """Scale of the logit: higher makes labels more predictable (AUC of the truth rises)."""


@dataclass
class Batch:
    """Requests sampled from the world: who, what the model sees, and the hidden truth."""

    entity_ids: list[str]
    features: FloatArray
    """[n, len(FEATURE_NAMES)] raw feature values."""
    p_true: FloatArray
    """Probability of a positive label under the rule active when sampled."""
    rule: int
    feature_names: tuple[str, ...] = field(default=FEATURE_NAMES)

    def __len__(self) -> int:
        return len(self.entity_ids)

    def feature_dicts(self) -> list[dict[str, float]]:
        return [
            dict(zip(self.feature_names, map(float, row), strict=True)) for row in self.features
        ]


class SyntheticWorld:
    """A population of entities plus the rule that turns their features into labels."""

    def __init__(self, config: SyntheticConfig = SyntheticConfig()) -> None:
        self.config = config
        self.rule = 0
        self._rng = np.random.default_rng(config.seed)
        n = config.n_entities
        rng = self._rng
        self.entity_ids = [f"entity-{config.seed}-{i}" for i in range(n)]
        spend = rng.lognormal(3.0, 1.2, n)
        spend[rng.random(n) < config.outlier_rate] *= 100.0
        self._profile = np.column_stack(
            [
                rng.lognormal(6.0, 0.8, n),  # account_age_days
                rng.poisson(rng.lognormal(1.5, 0.6, n)).astype(np.float64),  # sessions_7d
                spend,
                rng.beta(2.0, 18.0, n),  # click_rate_hist
                rng.exponential(24.0, n),  # recency_hours (typical; varies per request)
            ]
        )

    @property
    def feature_names(self) -> tuple[str, ...]:
        return FEATURE_NAMES

    def set_rule(self, rule: int) -> None:
        """Switch the hidden labelling rule (concept drift); features keep their distribution."""
        if not 0 <= rule < len(RULES):
            raise ValueError(f"rule must be in [0, {len(RULES) - 1}], got {rule}")
        self.rule = rule

    def sample(self, n: int, rng: np.random.Generator | None = None) -> Batch:
        """``n`` requests from random entities with fresh context."""
        rng = rng or self._rng
        idx = rng.integers(0, len(self.entity_ids), n)
        profile = self._profile[idx].copy()
        profile[:, 4] *= rng.lognormal(0.0, 0.3, n)
        context = np.column_stack(
            [
                rng.lognormal(3.5, 0.7, n),  # price
                rng.uniform(0.0, 0.5, n),  # discount
                np.sin(2 * math.pi * rng.uniform(0, 24, n) / 24.0),  # hour_sin
            ]
        )
        features = np.column_stack([profile, context])
        return Batch(
            entity_ids=[self.entity_ids[i] for i in idx],
            features=features,
            p_true=self.probability(features),
            rule=self.rule,
        )

    def probability(self, features: FloatArray, rule: int | None = None) -> FloatArray:
        """True P(label=1) of raw feature rows under ``rule`` (default: the active one)."""
        rule = self.rule if rule is None else rule
        z = _latent(np.asarray(features, dtype=np.float64))
        logit = z @ np.asarray(RULES[rule]) + BIASES[rule]
        return np.asarray(1.0 / (1.0 + np.exp(-self.config.sharpness * logit)), dtype=np.float64)

    def draw_labels(
        self, batch: Batch, rng: np.random.Generator | None = None
    ) -> npt.NDArray[np.int64]:
        rng = rng or self._rng
        return (rng.random(len(batch)) < batch.p_true).astype(np.int64)


def _latent(x: FloatArray) -> FloatArray:
    """Standardised log-scale features plus the discount x activity interaction."""
    age = (np.log(np.maximum(x[:, 0], 1e-3)) - 6.0) / 0.8
    sessions = (np.log1p(np.maximum(x[:, 1], 0.0)) - 1.6) / 0.6
    spend = np.tanh((np.log1p(np.maximum(x[:, 2], 0.0)) - 3.0) / 1.2)
    clicks = (x[:, 3] - 0.1) / 0.065
    recency = (np.log1p(np.maximum(x[:, 4], 0.0)) - 2.6) / 1.1
    price = (np.log(np.maximum(x[:, 5], 1e-3)) - 3.5) / 0.7
    discount = (x[:, 6] - 0.25) / 0.144
    hour = x[:, 7] / 0.707
    return np.column_stack(
        [age, sessions, spend, clicks, recency, price, discount, hour, discount * sessions]
    )


def traffic(
    batch: Batch,
    labels: Sequence[int],
    *,
    model_name: str,
    model_version: int,
    scores: Sequence[float],
    start: datetime | None = None,
    spacing: timedelta = timedelta(milliseconds=100),
    feedback_delay: timedelta = timedelta(seconds=30),
    id_prefix: str = "",
) -> list[tuple[PredictionLogged, FeedbackEvent]]:
    """One PredictionLogged and its FeedbackEvent per request, with event times spaced."""
    start = start or datetime.now(UTC)
    out = []
    for i, entity_id in enumerate(batch.entity_ids):
        at = start + i * spacing
        prediction = PredictionLogged(
            prediction_id=f"{id_prefix}{uuid.uuid4().hex}",
            model_name=model_name,
            model_version=model_version,
            entity_id=entity_id,
            features=dict(zip(batch.feature_names, map(float, batch.features[i]), strict=True)),
            score=float(scores[i]),
            event_time=at,
        )
        feedback = FeedbackEvent(
            prediction_id=prediction.prediction_id,
            label=1 if int(labels[i]) else 0,
            event_time=at + feedback_delay,
        )
        out.append((prediction, feedback))
    return out


def examples(
    batch: Batch,
    labels: Sequence[int],
    *,
    model_name: str,
    model_version: int = 1,
    start: datetime | None = None,
    spacing: timedelta = timedelta(milliseconds=100),
) -> list[LabelledExample]:
    """Labelled examples straight away (seeding a training set without the joiner)."""
    start = start or datetime.now(UTC)
    return [
        LabelledExample(
            prediction_id=uuid.uuid4().hex,
            entity_id=entity_id,
            model_name=model_name,
            model_version=model_version,
            features=dict(zip(batch.feature_names, map(float, batch.features[i]), strict=True)),
            target=1.0 if int(labels[i]) else 0.0,
            score=0.5,
            predicted_at=start + i * spacing,
            feedback_at=start + i * spacing,
        )
        for i, entity_id in enumerate(batch.entity_ids)
    ]
