"""Model FLOPs of a training step, and a measured matmul peak to compare them with (MFU)."""

import time

import torch

from dinov2.utils.precision import DTYPES, Precision, cpu_bf16_speedup

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def vit_forward_flops(backbone, image_size: int, n_images: int, last_block_rows: int = None) -> float:
    """Forward FLOPs (2 x multiply-accumulates) of ``n_images`` square images through the ViT.

    Per block and token: ``4 D^2`` (qkv, proj) + ``2 D F`` (MLP, F = mlp_ratio D) MACs, plus
    ``2 T D`` for the attention scores and their weighted sum; patch embedding ``3 p^2 D`` per patch.
    ``last_block_rows``: the last block outputs only that many tokens (of all images together;
    ``forward_features_selected``): keys and values for every token, the rest for those rows.
    """
    cfg = backbone.config
    d, depth, p = cfg["embed_dim"], cfg["depth"], cfg["patch_size"]
    hidden = int(d * cfg["mlp_ratio"])
    n_patches = (image_size // p) ** 2
    tokens = n_patches + 1 + cfg.get("num_register_tokens", 0)
    per_row = 2 * d * d + 2 * d * hidden + 2 * tokens * d  # q, proj, MLP, attention of one query
    macs = n_images * (depth * tokens * (2 * d * d + per_row) + n_patches * 3 * p * p * d)
    if last_block_rows is not None and depth:
        macs -= (n_images * tokens - last_block_rows) * per_row
    return 2.0 * macs


def head_forward_flops(head, n_vectors: int) -> float:
    return float(head.flops_per_token()) * n_vectors


@torch.no_grad()
def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = None, repeats: int = 5
) -> float:
    """Best FLOP/s of a square ``dtype`` matmul on ``device`` (the peak that MFU is measured against)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    # constant operands: the speed does not depend on the values, and no RNG state is consumed
    a = torch.full((size, size), 0.5, device=device, dtype=dtype)
    b = torch.full((size, size), 0.25, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def matmul_peak(device: torch.device, precision: Precision) -> tuple:
    """``(FLOP/s, label)`` that MFU is measured against: the measured matmul rate of the precision in
    use. Under autocast on the CPU, the faster of that dtype and fp32: PyTorch's CPU attention
    kernels compute in fp32 whatever the autocast dtype, so on a CPU with slow bf16 units a bf16
    peak would put MFU above 100 % (such a CPU is not timed in bf16 again: :func:`cpu_bf16_speedup`
    already says bf16 is slower there; fp16, for tests only on the CPU, is never timed)."""
    dtypes = [precision.dtype]
    if device.type == "cpu" and precision.dtype != torch.float32:
        fast_bf16 = precision.dtype == torch.bfloat16 and cpu_bf16_speedup() >= 1.0
        dtypes = [torch.float32] + ([precision.dtype] if fast_bf16 else [])
    rates = {dtype: measure_matmul_flops(device, dtype) for dtype in dtypes}
    best = max(rates, key=rates.get)
    return rates[best], f"{rates[best] / 1e9:.0f} GFLOP/s {DTYPE_NAMES[best]}"
