"""From clean examples to model inputs: feature choice, time split, clipping, standardisation.

The statistics are fitted on training rows only and travel with the model twice: baked into
the TorchScript module (Triton receives raw features) and written to metadata.json for people
and for the next run's warm start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from loopmesh.trainer.dataset import Frame

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_MIN_STD = 1e-6


@dataclass(frozen=True)
class Standardisation:
    """Per-feature imputation, clipping and scaling: ``(clip(x, low, high) - mean) / std``."""

    feature_names: tuple[str, ...]
    low: FloatArray
    high: FloatArray
    mean: FloatArray
    """Also the imputed value of a missing (NaN) input."""
    std: FloatArray

    @classmethod
    def fit(
        cls, x: FloatArray, feature_names: Sequence[str], *, clip_quantile: float
    ) -> Standardisation:
        """Statistics of the training rows ``x`` (NaN = missing, ignored)."""
        n = len(feature_names)
        if x.ndim != 2 or x.shape[1] != n:
            raise ValueError(f"expected rows of {n} features, got shape {x.shape}")
        low, high, mean, std = (np.zeros(n) for _ in range(4))
        for j in range(n):
            column = x[:, j][np.isfinite(x[:, j])]
            if column.size == 0:
                std[j] = 1.0
                continue
            low[j], high[j] = np.quantile(column, [clip_quantile, 1.0 - clip_quantile])
            clipped = np.clip(column, low[j], high[j])
            mean[j] = clipped.mean()
            spread = clipped.std()
            std[j] = spread if spread > _MIN_STD else 1.0
        return cls(tuple(feature_names), low, high, mean, std)

    def transform(self, x: FloatArray) -> FloatArray:
        """The same arithmetic as the TorchScript module, in numpy."""
        filled = np.where(np.isfinite(x), x, self.mean)
        return (np.clip(filled, self.low, self.high) - self.mean) / self.std

    def to_metadata(self) -> dict[str, Any]:
        return {
            "feature_names": list(self.feature_names),
            "clip_low": self.low.tolist(),
            "clip_high": self.high.tolist(),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
        }

    @classmethod
    def from_metadata(cls, data: Mapping[str, Any]) -> Standardisation:
        names = tuple(str(n) for n in data["feature_names"])
        arrays = [np.asarray(data[k], dtype=np.float64) for k in ("clip_low", "clip_high")]
        mean = np.asarray(data["mean"], dtype=np.float64)
        std = np.asarray(data["std"], dtype=np.float64)
        if any(a.shape != (len(names),) for a in (*arrays, mean, std)):
            raise ValueError("standardisation arrays do not match feature_names")
        return cls(names, arrays[0], arrays[1], mean, std)


def choose_features(frame: Frame, configured: Sequence[str] | None) -> list[str]:
    """Configured names, else every feature some example carries, sorted."""
    if configured:
        return list(configured)
    return sorted(name for name, values in frame.features.items() if np.isfinite(values).any())


def split_by_time(n: int, holdout_fraction: float) -> tuple[IntArray, IntArray]:
    """Indices of the older rows (train) and the newest ``holdout_fraction`` (holdout).

    ``n`` rows must already be sorted by prediction time (``Dataset.load`` does that), so the
    holdout is the future of the training rows, as it is for a deployed model.
    """
    n_holdout = max(1, round(n * holdout_fraction))
    if n - n_holdout < 1:
        raise ValueError(f"{n} rows cannot be split with holdout_fraction={holdout_fraction}")
    index = np.arange(n, dtype=np.int64)
    return index[: n - n_holdout], index[n - n_holdout :]
