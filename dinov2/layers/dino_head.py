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
    """Bias-free linear layer with weight normalisation: ``W = g * V / ||V||`` (row-wise norm).

    Computed as ``x V^T * (g / ||V||)^T`` when ``x`` has fewer rows than ``V`` has columns, else
    as ``x (V * g / ||V||)^T``: the same product, with the cheaper of the two rescalings.

    Written out (instead of ``torch.nn.utils.weight_norm``) so that the two tensors are ordinary
    parameters that FSDP2 can shard, and so the keys stay ``weight_g`` / ``weight_v``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows < self.in_features:  # scaling the few output rows is cheaper than scaling the weight
            return _ScaledOutputLinear.apply(x, self.weight_v, self.weight_g)
        return _ScaledWeightLinear.apply(x, self.weight_v, self.weight_g)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, weight.dtype)


def _row_scale(weight_v: torch.Tensor, weight_g: torch.Tensor):
    """``||V||`` and ``scale = g / ||V||`` per output row, both [out, 1]."""
    norm = weight_v.norm(dim=1, keepdim=True)
    return norm, weight_g / norm


def _weight_grads(grad_v_direct, grad_scale, weight_v, norm, scale):
    """Gradients of ``V`` and ``g`` for ``W = V * scale``, ``scale = g / ||V||`` (row-wise), given
    ``grad_v_direct = scale * dL/dW`` (fp32, [out, in], completed in place) and
    ``grad_scale = sum_in dL/dW * V`` [out, 1]: ``d scale / d V = -g V / ||V||^3``."""
    grad_g = grad_scale / norm
    grad_v = grad_v_direct.addcmul_(weight_v, (grad_g * scale).div_(norm).neg_())
    return grad_v, grad_g


class _ScaledWeightLinear(torch.autograd.Function):
    """``F.linear(x, V * g / ||V||)`` (row-wise norm) with fewer passes over the [out, in] weight.

    Same values as the autograd version (under autocast: the fp32 product rounded once to the
    autocast dtype), but the scaled weight is written straight in the compute dtype, and the
    backward of scale / norm is one in-place multiply-add on the fp32 weight gradient instead of
    separate multiply, reduce, divide and add passes that each allocate a weight-sized tensor.
    """

    @staticmethod
    def forward(ctx, x, weight_v, weight_g):
        dtype = _compute_dtype(x, weight_v)
        with torch.autocast(x.device.type, enabled=False):
            norm, scale = _row_scale(weight_v, weight_g)
            weight = torch.empty(weight_v.shape, dtype=dtype, device=weight_v.device)
            torch.mul(weight_v, scale, out=weight)  # computed in fp32, rounded once
            x_c = x.to(dtype)
            out = F.linear(x_c, weight)
        ctx.save_for_backward(x_c, weight, weight_v, norm, scale)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_c, weight, weight_v, norm, scale = ctx.saved_tensors
        grad_x = grad_v = grad_g = None
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_out = grad_out.to(weight.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = (grad_out @ weight).to(ctx.x_dtype)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                grad_w = grad_out.flatten(0, -2).t() @ x_c.flatten(0, -2)  # [out, in], compute dtype
                grad_w = grad_w.to(weight_v.dtype)  # fp32 from here on; becomes grad_v in place
                grad_scale = torch.bmm(grad_w.unsqueeze(1), weight_v.unsqueeze(2)).reshape(scale.shape)
                grad_v, grad_g = _weight_grads(grad_w.mul_(scale), grad_scale, weight_v, norm, scale)
        return grad_x, grad_v, grad_g


class _ScaledOutputLinear(torch.autograd.Function):
    """``F.linear(x, V) * (g / ||V||)`` (per output column) for inputs with few rows: same values
    as the autograd version, with the backward of scale / norm fused into the weight gradient."""

    @staticmethod
    def forward(ctx, x, weight_v, weight_g):
        dtype = _compute_dtype(x, weight_v)
        with torch.autocast(x.device.type, enabled=False):
            norm, scale = _row_scale(weight_v, weight_g)
            x_c, v_c = x.to(dtype), weight_v.to(dtype)
            raw = F.linear(x_c, v_c)
            out = raw * scale.squeeze(1).to(dtype)
        ctx.save_for_backward(x_c, v_c, raw, weight_v, norm, scale)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_c, v_c, raw, weight_v, norm, scale = ctx.saved_tensors
        grad_x = grad_v = grad_g = None
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_out = grad_out.to(raw.dtype)
            grad_raw = grad_out * scale.squeeze(1).to(raw.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = (grad_raw @ v_c).to(ctx.x_dtype)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                grad_scale = (grad_out * raw).flatten(0, -2).sum(0).to(scale.dtype).unsqueeze(1)
                # scale * dL/dW from the already scaled output gradient: a fresh tensor, completed in place
                grad_v_direct = (grad_raw.flatten(0, -2).t() @ x_c.flatten(0, -2)).to(weight_v.dtype)
                grad_v, grad_g = _weight_grads(grad_v_direct, grad_scale, weight_v, norm, scale)
        return grad_x, grad_v, grad_g


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
