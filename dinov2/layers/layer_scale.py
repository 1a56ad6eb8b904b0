"""LayerScale: a learned per-channel gain on a residual branch (CaiT), ``y = x * gamma``."""

import torch
from torch import nn


class LayerScale(nn.Module):
    """Multiplies the last dimension by ``gamma``, initialised to ``init_values`` (DINOv2 trains with 1e-5)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
