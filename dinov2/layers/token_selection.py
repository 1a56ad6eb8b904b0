"""Which tokens of a ``[B, N, D]`` batch a block must output: the rest are never read.

The losses read the CLS token of every crop and the masked patch tokens of the global crops, so
the last block only needs those rows as queries (every token still gives its key and value).
A selection holds them as a flat list of ``Q`` rows, image-major and in token order within an
image, and a padded ``[B, width]`` layout (``width`` = most rows of one image) for attention.
"""

from typing import NamedTuple

import torch


class TokenSelection(NamedTuple):
    rows: torch.Tensor  # [Q] indices into x.flatten(0, 1)
    sample: torch.Tensor  # [Q] image of each row
    slots: torch.Tensor  # [Q] indices into the padded [B * width] layout
    n_samples: int
    width: int

    @classmethod
    def from_mask(cls, wanted: torch.Tensor) -> "TokenSelection":
        """``wanted``: bool ``[B, N]``, True for the tokens to output."""
        if wanted.ndim != 2 or wanted.dtype != torch.bool:
            raise ValueError(f"wanted must be a bool [B, N] tensor, got {wanted.dtype} {tuple(wanted.shape)}")
        n_samples, n_tokens = wanted.shape
        counts = wanted.sum(1)
        width = int(counts.max()) if n_samples else 0
        sample, token = wanted.nonzero(as_tuple=True)
        rank = torch.arange(sample.numel(), device=wanted.device) - (counts.cumsum(0) - counts)[sample]
        return cls(sample * n_tokens + token, sample, sample * width + rank, n_samples, width)

    @classmethod
    def first_and_patches(
        cls, patches, n_samples: int, n_tokens: int, first_patch: int, device=None
    ) -> "TokenSelection":
        """Token 0 (CLS) of every image and, where ``patches`` (bool ``[B, n_patches]`` or None)
        is True, the patch tokens, which start at position ``first_patch``. Without ``patches`` the
        selection is known from the shapes alone: nothing is read back from the device."""
        if patches is None:
            sample = torch.arange(n_samples, device=device)
            return cls(sample * n_tokens, sample, sample, n_samples, 1 if n_samples else 0)
        wanted = torch.zeros(n_samples, n_tokens, dtype=torch.bool, device=device)
        wanted[:, 0] = True
        wanted[:, first_patch:] = patches.to(wanted.device)
        return cls.from_mask(wanted)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The selected rows of ``x`` ``[B, N, D]`` -> ``[Q, D]``."""
        return x.flatten(0, 1)[self.rows]

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """``[Q, D]`` -> ``[B, width, D]``, zeros in the unused slots."""
        padded = rows.new_zeros(self.n_samples * self.width, rows.shape[-1]).index_copy(0, self.slots, rows)
        return padded.view(self.n_samples, self.width, rows.shape[-1])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """``[B, width, D]`` -> the ``[Q, D]`` rows of the selection."""
        return padded.flatten(0, 1)[self.slots]

    def is_first(self) -> torch.Tensor:
        """bool ``[Q]``: the row is the first selected token of its image."""
        return self.slots % max(self.width, 1) == 0
