"""Multi-head self-attention, ``softmax(q k^T / sqrt(d_head)) v``, through PyTorch SDPA.

On CUDA with xformers installed, xformers' memory-efficient kernel is used instead (same result);
it also accepts a block-diagonal ``attn_bias`` that lets several crops share one call. For bf16 on
the CPU (autocast) the product is written out as DINOv2's plain attention does: PyTorch's CPU SDPA
kernels run bf16 at fp32 speed, about 2.5x slower than bf16 matmuls for ViT-S training.
"""

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    from xformers.ops import memory_efficient_attention

    XFORMERS_AVAILABLE = True
except ImportError:
    XFORMERS_AVAILABLE = False


def use_xformers(x: torch.Tensor) -> bool:
    """xformers is an option for CUDA tensors only; everything else goes through SDPA."""
    return XFORMERS_AVAILABLE and x.is_cuda


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, attn_bias: Optional[Any] = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        if use_xformers(x):
            q, k, v = qkv.unbind(2)
            out = memory_efficient_attention(q, k, v, attn_bias=attn_bias)
        else:
            if attn_bias is not None:
                raise ValueError("attn_bias needs xformers on CUDA")
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            if q.dtype == torch.bfloat16 and q.device.type == "cpu":
                out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v)
            out = out.transpose(1, 2)
        return self.proj(out.reshape(batch, tokens, dim))
