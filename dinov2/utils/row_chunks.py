"""Row chunks for a sequence of row-wise passes over a large [rows, K] tensor on the CPU.

Eager PyTorch runs each pass over the whole tensor, so for tensors far larger than the cache
(the [n_masked, 65,536] iBOT logits: 160 MB in fp32) every pass reads and writes memory. Run
chunk by chunk of ~4 MB, consecutive passes read the chunk from cache instead. Measured on a
2-core EPYC (32 MB L3): soft cross-entropy over [613, 65536] 56 -> 37 ms, Sinkhorn-Knopp
74 -> 62 ms.
"""

import torch

CHUNK_ELEMENTS = 1 << 20  # 4 MB of fp32


def row_chunks(tensor: torch.Tensor) -> list:
    """Row slices covering ``tensor`` (rows = dim 0): ~``CHUNK_ELEMENTS`` elements each on the
    CPU; elsewhere one slice (on a GPU, chunks would only launch more kernels)."""
    n_rows = tensor.shape[0]
    if tensor.device.type != "cpu":
        return [slice(0, n_rows)]
    row_size = max(tensor[0].numel(), 1) if n_rows else 1
    step = max(1, CHUNK_ELEMENTS // row_size)
    return [slice(start, start + step) for start in range(0, n_rows, step)]
