"""Module factories a model spec can name (``module.factory``); a project adds its own.

A factory is called as ``factory(n_inputs, n_outputs, **module.args)`` and returns a
``torch.nn.Module`` mapping a ``[batch, n_inputs]`` float tensor of standardised inputs to
``[batch, n_outputs]``: one logit (binary), one logit per class (multiclass) or one value
(regression).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from loopmesh.trainer.scoring import MLP


def mlp(n_inputs: int, n_outputs: int = 1, hidden: Sequence[int] = (32, 16)) -> nn.Module:
    """The built-in multilayer perceptron (the default ``module.factory``)."""
    if not hidden or any(w < 1 or w > 4096 for w in hidden):
        raise ValueError("hidden needs 1+ layer widths between 1 and 4096")
    return MLP(n_inputs, list(hidden), n_outputs)
