"""Image to patch tokens: a stride-``p`` convolution, ``(B, C, H, W) -> (B, H/p * W/p, D)`` in row-major order."""

import torch
from torch import nn

from dinov2.errors import ConfigError


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                f"resize or crop the images to a multiple of {self.patch_size} pixels"
            )
        return self.proj(x).flatten(2).transpose(1, 2)
