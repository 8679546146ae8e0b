"""The built-in modules and the wrapper every published model is (what model.onnx computes,
exported by ``loopmesh.trainer.export``).

``ScoringModule`` takes the raw input row Triton receives, ``[batch, n + m]`` floats: the
``n`` numeric inputs, then one column per categorical input holding its embedding row
(``ContextField.index``). It imputes, clips and standardises the numeric part, calls the
user's module, and turns its output into what the task answers: a probability (binary), class
probabilities (multiclass) or a value in the target's units (regression).

Keep ``forward`` exportable by ``torch.export``: tensor ops only, no Python branch on a
tensor's values, no numpy (export fails the training run otherwise).
"""

from collections.abc import Sequence

import torch
from torch import nn

from loopmesh.mesh.events import Task
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


class EmbeddingMLP(nn.Module):
    """The MLP over the numeric inputs and one learned embedding per categorical input."""

    def __init__(
        self,
        n_features: int,
        hidden: list[int],
        n_outputs: int,
        cardinalities: Sequence[int],
        embedding_dim: int,
    ) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(c, embedding_dim) for c in cardinalities)
        self.mlp = MLP(n_features + embedding_dim * len(cardinalities), hidden, n_outputs)

    def forward(self, z: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        parts = [z] + [e(categorical[:, i]) for i, e in enumerate(self.embeddings)]
        return self.mlp(torch.cat(parts, dim=1))  # type: ignore[no-any-return]


class ScoringModule(nn.Module):
    """Raw inputs ``[batch, n + m]`` -> the task's answer ``[batch, k]`` (model.onnx)."""

    low: torch.Tensor
    high: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    top: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(
        self,
        mlp: nn.Module,
        standardisation: Standardisation,
        *,
        task: Task = "binary",
        cardinalities: Sequence[int] = (),
        target_mean: float = 0.0,
        target_std: float = 1.0,
    ) -> None:
        super().__init__()
        # The user's module; named ``mlp`` for the built-in one's warm start (weights "mlp.").
        self.mlp = mlp
        self.task = task
        self.n_numeric = len(standardisation.feature_names)
        self.n_categorical = len(cardinalities)
        for name in ("low", "high", "mean", "std"):
            value = torch.as_tensor(getattr(standardisation, name), dtype=torch.float32)
            self.register_buffer(name, value.clone())
        # The largest row of each embedding: an out-of-range index is clamped, never a crash.
        self.register_buffer("top", torch.as_tensor([c - 1 for c in cardinalities]).long())
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_std", torch.tensor(float(target_std)))

    def raw(self, z: torch.Tensor, categorical: torch.Tensor | None) -> torch.Tensor:
        """The user's module on standardised inputs: logits, or a standardised value."""
        if categorical is not None:
            return self.mlp(z, categorical)  # type: ignore[no-any-return]
        return self.mlp(z)  # type: ignore[no-any-return]

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(standardised numeric inputs, categorical rows or None) of a raw input batch."""
        numeric = x[:, : self.n_numeric]
        numeric = torch.where(torch.isnan(numeric), self.mean.expand_as(numeric), numeric)
        z = (torch.clamp(numeric, min=self.low, max=self.high) - self.mean) / self.std
        if not self.n_categorical:
            return z, None
        codes = torch.nan_to_num(x[:, self.n_numeric :], nan=0.0).to(torch.int64)
        return z, torch.minimum(torch.clamp(codes, min=0), self.top)

    def answer(self, raw: torch.Tensor) -> torch.Tensor:
        """The task's answer from the module's output."""
        if raw.dim() == 1:
            raw = raw.reshape(-1, 1)
        if self.task == "multiclass":
            return torch.softmax(raw, dim=1)
        if self.task == "regression":
            return raw * self.target_std + self.target_mean
        return torch.sigmoid(raw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, categorical = self.inputs(x)
        return self.answer(self.raw(z, categorical))
