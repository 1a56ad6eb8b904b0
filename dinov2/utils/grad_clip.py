"""Gradient-norm clipping of one module's parameters: PyTorch's ``clip_grad_norm_``."""

import torch


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their total 2-norm is at most ``max_norm``; returns the norm
    before clipping (``torch.nn.utils.clip_grad_norm_``, which also takes FSDP2's DTensors)."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
