"""Multi-head self-attention, ``softmax(q k^T / sqrt(d_head)) v``, through PyTorch SDPA or xformers.

The ``attention`` setting of every :class:`Attention` (:func:`set_attention`; the trainer's
``student.attention``) chooses the kernel for CUDA tensors:

* ``sdpa``: PyTorch's ``scaled_dot_product_attention``, always;
* ``xformers``: xformers' memory-efficient kernel, which also takes a block-diagonal ``attn_bias``
  that lets several crops share one call; an error when xformers cannot serve the call;
* ``auto`` (default): xformers when it is installed *and works*, else SDPA, with a warning.

A mismatched xformers build (compiled for another torch or CUDA) often imports fine and fails at
its first call, so "works" is decided by a one-call check per device and dtype
(:func:`xformers_problem`: a tiny forward and backward compared with SDPA), run once per process.
CPU tensors always go through SDPA (``xformers`` on the CPU is an error). For bf16 on the CPU
(autocast) the product is written out as DINOv2's plain attention does: PyTorch's CPU SDPA kernels
run bf16 at fp32 speed, about 2.5x slower than bf16 matmuls for ViT-S training.

``scripts/gpu_check.py`` reports what xformers does on a GPU machine.
"""

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.errors import ConfigError
from dinov2.layers.token_selection import TokenSelection

try:
    from xformers.ops import memory_efficient_attention

    XFORMERS_IMPORT_ERROR = ""
except Exception as error:  # ImportError, or a broken build's OSError / RuntimeError at import
    memory_efficient_attention = None
    XFORMERS_IMPORT_ERROR = f"{type(error).__name__}: {error}"

ATTENTION_SETTINGS = ("auto", "sdpa", "xformers")
logger = logging.getLogger("dinov2")


def check_attention_setting(setting: str) -> str:
    if setting not in ATTENTION_SETTINGS:
        raise ConfigError(f"student.attention must be one of {', '.join(ATTENTION_SETTINGS)}, got {setting!r}")
    return setting


def set_attention(model: nn.Module, setting: str) -> nn.Module:
    """Give every :class:`Attention` in ``model`` the ``setting`` (auto | sdpa | xformers); returns ``model``."""
    check_attention_setting(setting)
    for module in model.modules():
        if isinstance(module, Attention):
            module.attention = setting
    return model


def _is_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda


@functools.cache
def xformers_problem(device: torch.device, dtype: torch.dtype) -> str:
    """Why xformers cannot compute attention for ``dtype`` tensors on ``device`` ('' when it can):
    one forward and backward of a tiny problem, compared with SDPA. Cached per process."""
    if memory_efficient_attention is None:
        return f"xformers is not importable ({XFORMERS_IMPORT_ERROR})"
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            generator = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(2, 16, 2, 64, generator=generator).to(device, dtype) for _ in range(3))
            q.requires_grad_(True)
            out = memory_efficient_attention(q, k, v)
            (grad,) = torch.autograd.grad(out.float().square().sum(), q)
            expected = F.scaled_dot_product_attention(*(t.detach().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
            error = (out.detach().float() - expected.float()).abs().max().item()  # also a sync: kernel errors surface
            finite = bool(torch.isfinite(grad).all())
    except Exception as caught:  # a broken build fails in many ways: NotImplementedError, RuntimeError, OSError
        first_line = (str(caught).strip().splitlines() or [""])[0]
        return f"{type(caught).__name__}: {first_line}"
    if not finite:
        return "its gradient is not finite"
    if error > tolerance:
        return f"its result differs from SDPA by {error:.3g} (tolerance {tolerance:g})"
    return ""


@functools.cache
def _warn_fallback(device: torch.device, dtype: torch.dtype, problem: str) -> None:
    logger.warning(
        "attention auto: xformers does not work on %s for %s (%s); using PyTorch SDPA instead "
        "(same result; set student.attention=sdpa to skip this check, or install the xformers build "
        "that matches torch %s)",
        device,
        str(dtype).removeprefix("torch."),
        problem,
        torch.__version__,
    )


def use_xformers(x: torch.Tensor, setting: str = "auto") -> bool:
    """Whether attention on ``x`` goes through xformers under ``setting`` (see the module docstring)."""
    if setting == "sdpa":
        return False
    check_attention_setting(setting)
    if not _is_cuda(x):
        if setting == "xformers":
            raise ConfigError(
                f"student.attention=xformers, but attention runs on {x.device}: xformers needs CUDA; use auto or sdpa"
            )
        return False
    problem = xformers_problem(x.device, x.dtype)
    if not problem:
        return True
    if setting == "xformers":
        raise ConfigError(
            f"student.attention=xformers, but xformers does not work on {x.device} for {x.dtype}: {problem}. "
            f"Install the xformers build that matches torch {torch.__version__} (see README), or use auto or sdpa"
        )
    _warn_fallback(x.device, x.dtype, problem)
    return False


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attention = "auto"  # auto | sdpa | xformers: set_attention()
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
        if use_xformers(q, self.attention):
            return memory_efficient_attention(q, k, v, attn_bias=attn_bias)
        if attn_bias is not None:
            raise ValueError("attn_bias needs xformers on CUDA")
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)
