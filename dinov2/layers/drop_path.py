"""Stochastic depth: drop a residual branch for whole samples.

Two equivalent-in-expectation forms, as in DINOv2:

* :func:`drop_path` keeps each sample's branch with probability ``keep = 1 - p`` and divides the
  kept ones by ``keep``: ``y = x + m * f(x) / keep`` with ``m ~ Bernoulli(keep)`` per sample.
* :func:`drop_add_residual_stochastic_depth` evaluates ``f`` only on a random subset of
  ``max(int(B * keep), 1)`` samples and adds ``f`` scaled by ``B / subset`` to those rows; the
  others pass through. It saves the compute of the dropped samples (worth it for ``p > 0.1``).
"""

from collections.abc import Callable

import torch
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero whole samples of ``x`` with probability ``drop_prob`` and rescale the rest by ``1 / (1 - drop_prob)``."""
    if drop_prob == 0.0 or not training:
        return x
    return x * branch_scales(x.shape[0], drop_prob, x, subset=False).view((-1,) + (1,) * (x.ndim - 1))


def branch_scales(n_samples: int, drop_prob: float, like: torch.Tensor, subset: bool) -> torch.Tensor:
    """Per-sample factors ``[n_samples]`` (dtype and device of ``like``) on a residual branch, drawn
    with the same random numbers as the two forms: ``Bernoulli(keep) / keep`` (:func:`drop_path`),
    or, with ``subset``, ``B / subset`` on the random subset of
    :func:`drop_add_residual_stochastic_depth` and 0 elsewhere."""
    keep = 1.0 - drop_prob
    if not subset:
        return like.new_empty(n_samples).bernoulli_(keep).div_(keep)
    subset_size = max(int(n_samples * keep), 1)
    rows = torch.randperm(n_samples, device=like.device)[:subset_size]
    return like.new_zeros(n_samples).index_fill_(0, rows, n_samples / subset_size)


class DropPath(nn.Module):
    """Per-sample stochastic depth on a residual branch (see :func:`drop_path`)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def drop_add_residual_stochastic_depth(
    x: torch.Tensor, residual: Callable[[torch.Tensor], torch.Tensor], drop_prob: float
) -> torch.Tensor:
    """``x + residual(x)`` computed for a random subset of samples only (see the module docstring)."""
    batch = x.shape[0]
    subset_size = max(int(batch * (1.0 - drop_prob)), 1)
    rows = torch.randperm(batch, device=x.device)[:subset_size]
    branch = residual(x[rows])
    out = torch.index_add(x.flatten(1), 0, rows, branch.flatten(1).to(x.dtype), alpha=batch / subset_size)
    return out.view_as(x)
