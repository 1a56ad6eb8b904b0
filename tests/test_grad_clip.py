"""clip_grad_norm: torch's clipping, minus the pass over the gradients when nothing is clipped;
total_norm: the norm from BLAS dot products on the CPU."""

import pytest
import torch

from dinov2.utils.grad_clip import clip_grad_norm, total_norm


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
def test_same_norm_and_gradients_as_torch(scale):
    ours, theirs = _grads(scale), _grads(scale)
    norm = clip_grad_norm(ours, 3.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 3.0)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for a, b in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    if scale > 1:
        total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours[:2]]))
        torch.testing.assert_close(total, torch.tensor(3.0), rtol=1e-5, atol=0)


def test_gradients_within_bounds_are_not_rewritten(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *args, **kwargs: calls.append(args))
    clip_grad_norm(_grads(0.01), 3.0)
    assert calls == []
    clip_grad_norm(_grads(10.0), 3.0)
    assert len(calls) == 1


def test_total_norm_is_the_norm_of_everything_together_and_close_to_exact():
    torch.manual_seed(0)
    tensors = [torch.randn(3000, 700), torch.randn(5, 3).t(), 0.1 * torch.randn(1_000_000), torch.zeros(0)]
    exact = torch.cat([t.double().flatten() for t in tensors]).norm()
    assert abs(total_norm(tensors).double() / exact - 1) < 1e-5
    torch.testing.assert_close(total_norm(tensors), torch.nn.utils.get_total_norm(tensors), rtol=2e-4, atol=0)
    half = [t.bfloat16() for t in tensors]  # not BLAS-dot dtypes: torch's norm
    torch.testing.assert_close(total_norm(half), torch.nn.utils.get_total_norm(half))
