"""Fused SwiGLU feed-forward network (ViT-g/14, DinoBloom-G).

``w3(silu(a) * b)`` where ``[a, b] = w12(x)`` split in halves. The hidden width follows DINOv2:
``h = (int(hidden * 2 / 3) + 7) // 8 * 8`` (2/3 keeps the parameter count of a ``hidden``-wide MLP,
rounded up to a multiple of 8); e.g. embed 1536, hidden 6144 -> ``w12`` (8192, 1536), ``w3`` (1536, 4096).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_features(hidden_features: int) -> int:
    """DINOv2's fused SwiGLU width for an MLP of ``hidden_features``."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFNFused(nn.Module):
    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        """``act_layer`` and ``drop`` are accepted for signature parity with :class:`Mlp` and not used."""
        super().__init__()
        out_features = out_features or in_features
        hidden = swiglu_hidden_features(hidden_features or in_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)
