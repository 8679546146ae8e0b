"""Module factories a model spec can name (``module.factory``); a project adds its own.

A factory is called as ``factory(n_inputs, n_outputs, **module.args)``, plus
``cardinalities=[...]`` (embedding rows per categorical input, in the spec's order) when the
model has categorical inputs. It returns a ``torch.nn.Module`` whose ``forward(z)`` — or
``forward(z, categorical)`` with categorical inputs — maps a ``[batch, n_inputs]`` float
tensor of standardised numeric inputs (and a ``[batch, m]`` int64 tensor of embedding rows)
to ``[batch, n_outputs]``: one logit (binary), one logit per class (multiclass) or one value
in standardised target units (regression). LoopMesh adds the imputation, the scaling and the
task's link (sigmoid, softmax, the target's units) around it, and exports the whole to ONNX.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from loopmesh.trainer.scoring import MLP, EmbeddingMLP


def mlp(
    n_inputs: int,
    n_outputs: int = 1,
    hidden: Sequence[int] = (32, 16),
    cardinalities: Sequence[int] = (),
    embedding_dim: int = 8,
) -> nn.Module:
    """The built-in multilayer perceptron (the default ``module.factory``), with one learned
    embedding of ``embedding_dim`` per categorical input."""
    if not hidden or any(w < 1 or w > 4096 for w in hidden):
        raise ValueError("hidden needs 1+ layer widths between 1 and 4096")
    if not 1 <= embedding_dim <= 1024:
        raise ValueError("embedding_dim must be between 1 and 1024")
    if cardinalities:
        return EmbeddingMLP(n_inputs, list(hidden), n_outputs, cardinalities, embedding_dim)
    return MLP(n_inputs, list(hidden), n_outputs)
