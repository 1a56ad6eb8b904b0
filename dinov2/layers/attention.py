"""Multi-head self-attention, ``softmax(q k^T / sqrt(d_head)) v``, through PyTorch SDPA.

On CUDA with xformers installed, xformers' memory-efficient kernel is used instead (same result);
it also accepts a block-diagonal ``attn_bias`` that lets several crops share one call. For bf16 on
the CPU (autocast) the product is written out as DINOv2's plain attention does: PyTorch's CPU SDPA
kernels run bf16 at fp32 speed, about 2.5x slower than bf16 matmuls for ViT-S training.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.layers.token_selection import TokenSelection

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

    def forward(
        self, x: torch.Tensor, attn_bias: Any | None = None, selection: TokenSelection | None = None
    ) -> torch.Tensor:
        """``x`` ``(B, N, D)`` -> ``(B, N, D)``; with a ``selection``, the output of its tokens only,
        ``(Q, D)``: every token's key and value, the selected tokens' queries, so the query and
        output projections run on the selected rows alone."""
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        if selection is None:
            q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim).unbind(2)
            return self.proj(self._attend(q, k, v, attn_bias).flatten(2))
        if attn_bias is not None:
            raise ValueError("a token selection attends within each image; it takes no attn_bias")
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(selection.gather(x), weight[:dim], None if bias is None else bias[:dim])
        kv = F.linear(x, weight[dim:], None if bias is None else bias[dim:])
        k, v = kv.reshape(batch, tokens, 2, self.num_heads, head_dim).unbind(2)
        q = selection.pad(q).view(batch, selection.width, self.num_heads, head_dim)
        return self.proj(selection.unpad(self._attend(q, k, v, None).flatten(2)))

    def _attend(self, q, k, v, attn_bias) -> torch.Tensor:
        """``q`` ``(B, Q, H, d)``, ``k``/``v`` ``(B, N, H, d)`` -> ``(B, Q, H, d)`` before the output projection."""
        if use_xformers(q):
            return memory_efficient_attention(q, k, v, attn_bias=attn_bias)
        if attn_bias is not None:
            raise ValueError("attn_bias needs xformers on CUDA")
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)
