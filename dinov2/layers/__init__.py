"""Building blocks of the DINOv2 vision transformer."""

from dinov2.layers.attention import Attention
from dinov2.layers.block import Block
from dinov2.layers.drop_path import DropPath, branch_scales, drop_add_residual_stochastic_depth, drop_path
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp
from dinov2.layers.patch_embed import PatchEmbed
from dinov2.layers.swiglu_ffn import SwiGLUFFNFused, swiglu_hidden_features
from dinov2.layers.token_selection import TokenSelection

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFNFused",
    "TokenSelection",
    "branch_scales",
    "drop_add_residual_stochastic_depth",
    "drop_path",
    "swiglu_hidden_features",
]
