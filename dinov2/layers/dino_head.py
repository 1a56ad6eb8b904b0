"""DINO / iBOT projection head with DINOv2's parameter layout.

``x -> MLP (nlayers Linear, GELU between) -> L2-normalise (bottleneck) -> weight-normed Linear``
giving ``n_prototypes`` logits. Parameter names match DINOv2 and DinoBloom checkpoints:
``mlp.0.weight``, ``mlp.2.weight``, ..., ``last_layer.weight_g`` (``[n_prototypes, 1]``) and
``last_layer.weight_v`` (``[n_prototypes, bottleneck_dim]``).
"""

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation: ``W = g V / ||V||`` (row-wise norm), through autograd.

    The parameters are those of ``torch.nn.utils.weight_norm`` on a ``Linear`` (DINOv2's layout),
    held as plain parameters rather than a parametrization, so that FSDP2 shards them like any
    other and checkpoints keep the keys ``weight_g`` / ``weight_v``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, bias: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers = [nn.Linear(in_dim, hidden_dim, bias=bias), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim, bias=bias), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """Projection head: ``logits = last_layer(normalize(mlp(x)))`` with ``n_prototypes`` outputs."""

    def __init__(
        self,
        in_dim: int,
        n_prototypes: int,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs at least one layer, got nlayers={nlayers}")
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, mlp_bias)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, n_prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)

    def flops_per_token(self) -> int:
        """Multiply-accumulates x2 of one forward pass for one input vector."""
        total = 0
        for module in self.modules():
            if isinstance(module, nn.Linear):
                total += 2 * module.in_features * module.out_features
        total += 2 * self.last_layer.in_features * self.last_layer.out_features
        return total


def adapt_head_state_dict(state_dict: dict) -> dict:
    """Map the parametrisation layout of ``torch.nn.utils.parametrizations.weight_norm``
    (``last_layer.parametrizations.weight.original0/1``) to ``last_layer.weight_g/weight_v``."""
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace("last_layer.parametrizations.weight.original0", "last_layer.weight_g")
        key = key.replace("last_layer.parametrizations.weight.original1", "last_layer.weight_v")
        renamed[key] = value
    return renamed
