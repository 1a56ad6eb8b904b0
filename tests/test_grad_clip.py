"""clip_grad_norm: the total norm of the gradients, and gradients scaled down to max_norm only when above it."""

import pytest
import torch

from dinov2.utils.grad_clip import clip_grad_norm


def _grads(scale: float):
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(5, 3)),
        torch.nn.Parameter(torch.randn(7)),
        torch.nn.Parameter(torch.randn(2)),
    ]
    for p in params[:2]:
        p.grad = scale * torch.randn_like(p)
    return params  # the last one has no gradient


@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_returns_the_total_norm_and_clips_only_above_max_norm(scale):
    params = _grads(scale)
    before = [p.grad.clone() for p in params[:2]]
    total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in before]))
    torch.testing.assert_close(clip_grad_norm(params, 3.0), total)
    factor = min(1.0, 3.0 / float(total))
    for p, grad in zip(params[:2], before, strict=True):
        torch.testing.assert_close(p.grad, grad * factor, rtol=1e-5, atol=0)
    assert (factor == 1.0) == (scale < 1)
