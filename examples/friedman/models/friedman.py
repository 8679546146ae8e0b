"""The team's own torch module for ``minutes`` (``module.factory: models.friedman:build``).

LoopMesh calls ``build(n_inputs, n_outputs, cardinalities=[...], **args)`` and hands the
module standardised numeric inputs ``z`` and the categorical rows (``zone``); it adds the
scaling, the target's units, and the export to ONNX around it.
"""

from __future__ import annotations

import torch
from torch import nn


class DeliveryMinutes(nn.Module):
    """Two hidden layers over the inputs and a learned embedding of the zone."""

    def __init__(self, n_inputs: int, n_outputs: int, zones: int, width: int, zone_dim: int):
        super().__init__()
        self.zone = nn.Embedding(zones, zone_dim)
        self.body = nn.Sequential(
            nn.Linear(n_inputs + zone_dim, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, n_outputs),
        )

    def forward(self, z: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([z, self.zone(categorical[:, 0])], dim=1))


def build(
    n_inputs: int, n_outputs: int, cardinalities: list[int], width: int = 64, zone_dim: int = 4
) -> nn.Module:
    return DeliveryMinutes(n_inputs, n_outputs, cardinalities[0], width, zone_dim)
