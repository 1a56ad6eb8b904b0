"""KoLeo regulariser (Kozachenko-Leonenko entropy estimator), from Sablayrolles et al. 2018.

For L2-normalised features ``x_i`` of one crop batch,
``L = -(1/B) sum_i log(min_{j != i} ||x_i - x_j|| + eps)``: it pushes each sample away from
its nearest neighbour, spreading the features uniformly.
"""

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
        with torch.no_grad():
            similarity = x @ x.t()
            similarity.fill_diagonal_(-2.0)
            nearest = similarity.argmax(dim=1)
        distance = (x - x[nearest]).norm(dim=-1)
        return -torch.log(distance + self.eps).mean()
