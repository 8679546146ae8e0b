"""The team's own torch module for ``minutes.yaml`` (``module.factory:
models.regress_models:build``: a file under ``models/``, which Feast does not import).

LoopMesh calls ``build(n_inputs, n_outputs, cardinalities=[...], **module.args)`` and wraps
the module: it standardises the numeric inputs before ``forward`` and turns the output (a
standardised value) back into minutes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MinutesNet(nn.Module):
    """The numbers and a learned platform embedding through one hidden layer."""

    def __init__(
        self, n_inputs: int, n_outputs: int, cardinality: int, hidden: int, embedding_dim: int
    ) -> None:
        super().__init__()
        self.platform = nn.Embedding(cardinality, embedding_dim)
        self.body = nn.Sequential(
            nn.Linear(n_inputs + embedding_dim, hidden), nn.Tanh(), nn.Linear(hidden, n_outputs)
        )

    def forward(self, z: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([z, self.platform(categorical[:, 0])], dim=1))  # type: ignore[no-any-return]


def build(
    n_inputs: int,
    n_outputs: int,
    *,
    cardinalities: Sequence[int],
    hidden: int = 16,
    embedding_dim: int = 4,
) -> nn.Module:
    if len(cardinalities) != 1:
        raise ValueError(f"MinutesNet takes one categorical input (platform), not {cardinalities}")
    return MinutesNet(n_inputs, n_outputs, cardinalities[0], hidden, embedding_dim)
