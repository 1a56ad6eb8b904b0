"""iBOT block masking of patch tokens (DINOv2 semantics).

A mask over an (h, w) grid of patches is grown by random rectangles until it covers the requested
number of patches: each rectangle has area ~ U(min_num_patches, remaining budget capped at
max_num_patches) and log aspect ratio ~ U(log min_aspect, log max_aspect); a rectangle counts only
if it adds 1..budget new patches. Up to 10 draws per rectangle; when none fits, growth stops, so a
mask may hold slightly fewer patches than asked for.
"""

import math
import random

import numpy as np


class MaskingGenerator:
    """``generator(num_masking_patches) -> bool array (h, w)`` with about that many True patches.

    ``input_size``: patches per side (h, w) or one int; ``max_num_patches``: largest block (DINOv2
    uses half the patches; default all); blocks have at least ``min_num_patches`` patches and an
    aspect ratio in [min_aspect, max_aspect] (default 1 / min_aspect).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = int(input_size[0]), int(input_size[1])
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, patches per block {self.min_num_patches}.."
            f"{self.max_num_patches}, aspect {math.exp(self.log_aspect_ratio[0]):.2f}.."
            f"{math.exp(self.log_aspect_ratio[1]):.2f})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, budget: float) -> int:
        """Mask one random rectangle adding at most ``budget`` new patches; number added (0 if none fit)."""
        for _ in range(10):
            target_area = random.uniform(self.min_num_patches, budget)
            aspect = math.exp(random.uniform(*self.log_aspect_ratio))
            block_height = int(round(math.sqrt(target_area * aspect)))
            block_width = int(round(math.sqrt(target_area / aspect)))
            if block_width < self.width and block_height < self.height:
                top = random.randint(0, self.height - block_height)
                left = random.randint(0, self.width - block_width)
                block = mask[top : top + block_height, left : left + block_width]
                added = block_height * block_width - int(block.sum())
                if 0 < added <= budget:
                    block[...] = True
                    return added
        return 0

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget)
            if added == 0:
                break
            count += added
        return mask
