"""Pre-norm transformer block with LayerScale and stochastic depth (DINOv2's ``NestedTensorBlock``).

``x = x + DropPath(ls1(attn(norm1(x))))`` then ``x = x + DropPath(ls2(ffn(norm2(x))))``. In training
with a drop rate above 0.1 the branches run on a random subset of the batch only
(:func:`drop_add_residual_stochastic_depth`), as DINOv2 does. A list of token tensors (one per crop
size) is processed crop by crop, or in one block-diagonal xformers call on CUDA
(see :mod:`dinov2.layers.attention` for when xformers is used). A
:class:`TokenSelection` restricts the output to the tokens a caller reads (the last block in
training and inference).
"""

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from dinov2.layers.attention import Attention, use_xformers
from dinov2.layers.drop_path import DropPath, branch_scales, drop_add_residual_stochastic_depth
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp
from dinov2.layers.token_selection import TokenSelection

LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)  # DINOv2's


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
        init_values: float | None = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = LAYER_NORM,
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
        self,
        x: torch.Tensor | list[torch.Tensor],
        attn_bias: Any | None = None,
        selection: TokenSelection | list[TokenSelection] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """``x`` ``(B, N, D)`` -> ``(B, N, D)``, or a list of crops (``selection`` then one per crop).
        With a ``selection``, only its tokens' outputs ``(Q, D)`` (see :meth:`forward_selected`)."""
        if isinstance(x, list):
            return self.forward_list(x, selection)
        if selection is not None:
            return self.forward_selected(x, selection)

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

    def forward_selected(self, x: torch.Tensor, selection: TokenSelection) -> torch.Tensor:
        """``forward(x)`` at the selected tokens, ``(Q, D)``, computing only their queries,
        projections and MLP. Stochastic depth draws the same random numbers as :meth:`forward`
        and gives each image the same factor, so in training too the result equals
        ``selection.gather(forward(x))`` for the same RNG state."""
        rows = selection.gather(x)
        branch = self.ls1(self.attn(self.norm1(x), selection=selection))
        rows = rows + self._drop_rows(branch, selection)
        return rows + self._drop_rows(self.ls2(self.mlp(self.norm2(rows))), selection)

    def _drop_rows(self, branch: torch.Tensor, selection: TokenSelection) -> torch.Tensor:
        if not self.training or self.sample_drop_ratio == 0.0:
            return branch
        subset = self.sample_drop_ratio > 0.1  # the form forward() uses
        scales = branch_scales(selection.n_samples, self.sample_drop_ratio, branch, subset=subset)
        return branch * scales[selection.sample].unsqueeze(-1)

    def forward_list(
        self, x_list: list[torch.Tensor], selections: list[TokenSelection] | None = None
    ) -> list[torch.Tensor]:
        """Each crop tensor ``(B_i, N_i, D)`` through the block; equal to calling it crop by crop."""
        if selections is not None:
            return [self.forward_selected(x, selection) for x, selection in zip(x_list, selections, strict=True)]
        if use_xformers(x_list[0], self.attn.attention) and not (self.training and self.sample_drop_ratio > 0.0):
            from xformers.ops import fmha

            attn_bias, x = fmha.BlockDiagonalMask.from_tensor_list(x_list)
            return attn_bias.split(self.forward(x, attn_bias))
        return [self.forward(x) for x in x_list]
