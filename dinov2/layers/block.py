"""Pre-norm transformer block with LayerScale and stochastic depth (DINOv2's ``NestedTensorBlock``).

``x = x + DropPath(ls1(attn(norm1(x))))`` then ``x = x + DropPath(ls2(ffn(norm2(x))))``. In training
with a drop rate above 0.1 the branches run on a random subset of the batch only
(:func:`drop_add_residual_stochastic_depth`), as DINOv2 does. A list of token tensors (one per crop
size) is processed crop by crop, or in one block-diagonal xformers call on CUDA.
"""

from functools import partial
from typing import Any, Callable, List, Optional, Union

import torch
from torch import nn

from dinov2.layers.attention import Attention, use_xformers
from dinov2.layers.drop_path import DropPath, drop_add_residual_stochastic_depth
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: Optional[float] = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        ffn_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.drop_path2 = DropPath(drop_path)
        self.sample_drop_ratio = drop_path

    def forward(
        self, x: Union[torch.Tensor, List[torch.Tensor]], attn_bias: Optional[Any] = None
    ) -> Union[torch.Tensor, List[torch.Tensor]]:
        if isinstance(x, list):
            return self.forward_list(x)

        def attn_residual(x: torch.Tensor) -> torch.Tensor:
            return self.ls1(self.attn(self.norm1(x), attn_bias))

        def ffn_residual(x: torch.Tensor) -> torch.Tensor:
            return self.ls2(self.mlp(self.norm2(x)))

        if self.training and self.sample_drop_ratio > 0.1:
            x = drop_add_residual_stochastic_depth(x, attn_residual, self.sample_drop_ratio)
            x = drop_add_residual_stochastic_depth(x, ffn_residual, self.sample_drop_ratio)
        elif self.training and self.sample_drop_ratio > 0.0:
            x = x + self.drop_path1(attn_residual(x))
            x = x + self.drop_path2(ffn_residual(x))
        else:
            x = x + attn_residual(x)
            x = x + ffn_residual(x)
        return x

    def forward_first_token(self, x: torch.Tensor) -> torch.Tensor:
        """Inference output of token 0 only, ``(B, 1, D)``: equal to ``forward(x)[:, :1]`` in eval
        mode, with the query, output projection and MLP computed for that one token."""
        first = x[:, :1]
        first = first + self.ls1(self.attn.forward_first_query(self.norm1(x)))
        return first + self.ls2(self.mlp(self.norm2(first)))

    def forward_list(self, x_list: List[torch.Tensor]) -> List[torch.Tensor]:
        """Each crop tensor ``(B_i, N_i, D)`` through the block; equal to calling it crop by crop."""
        if use_xformers(x_list[0]) and not (self.training and self.sample_drop_ratio > 0.0):
            from xformers.ops import fmha

            attn_bias, x = fmha.BlockDiagonalMask.from_tensor_list(x_list)
            return attn_bias.split(self.forward(x, attn_bias))
        return [self.forward(x) for x in x_list]
