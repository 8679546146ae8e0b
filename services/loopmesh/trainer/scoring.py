"""The built-in modules: the MLP and the raw-features-in ``ScoringModule`` (what model.onnx
computes, exported by ``loopmesh.trainer.export``).

Keep ``forward`` exportable by ``torch.export``: tensor ops only, no Python branch on a
tensor's values, no numpy (export fails the training run otherwise).
"""

import torch
from torch import nn

from loopmesh.trainer.prepare import Standardisation


class MLP(nn.Module):
    """Linear/ReLU stack ending in ``n_outputs`` values (one logit by default)."""

    def __init__(self, n_features: int, hidden: list[int], n_outputs: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # type: ignore[no-any-return]


class ScoringModule(nn.Module):
    """Raw features [batch, n] -> probability [batch, 1] (what model.onnx computes)."""

    low: torch.Tensor
    high: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mlp: MLP, standardisation: Standardisation) -> None:
        super().__init__()
        self.mlp = mlp
        for name in ("low", "high", "mean", "std"):
            value = torch.as_tensor(getattr(standardisation, name), dtype=torch.float32)
            self.register_buffer(name, value.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where(torch.isnan(x), self.mean.expand_as(x), x)
        z = (torch.clamp(x, min=self.low, max=self.high) - self.mean) / self.std
        return torch.sigmoid(self.mlp(z))
