"""DINO loss on the CLS token: cross-entropy between teacher and student prototype distributions.

For student logits ``s`` and teacher targets ``t`` (probabilities over K prototypes)
``L = -sum_k t_k log softmax(s / tau_s)_k``, averaged over the batch. Teacher targets come from
either

* centering: ``t = softmax((z - c) / tau_t)`` with ``c <- m c + (1 - m) mean_batch(z)``
  (the mean over all ranks; ``m = center_momentum``), or
* Sinkhorn-Knopp: ``Q = exp(z / tau_t)`` rescaled alternately so that every prototype gets
  mass ``1/K`` and every sample mass ``1/B`` (B = global batch), a few iterations, in log space.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _logsumexp_over_ranks(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum exp`` along ``dim`` over this rank's and every other rank's entries."""
    if x.shape[dim] == 0:
        shape = list(x.shape)
        shape[dim] = 1
        peak = x.new_full(shape, float("-inf"))
    else:
        peak = x.amax(dim=dim, keepdim=True)
    peak = _all_reduce(peak, op=dist.ReduceOp.MAX)
    safe_peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = _all_reduce(torch.exp(x - safe_peak).sum(dim=dim, keepdim=True))
    return safe_peak + torch.log(total)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3, n_samples=None) -> torch.Tensor:
    """Balanced soft assignment of ``B`` samples (all ranks) to ``K`` prototypes; rows sum to 1.

    ``Q = exp(z / tau)`` (K x B) is rescaled alternately so that every prototype holds mass
    ``1/K`` and every sample ``1/B``; returns ``B Q^T``. Computed in log space, so sharp logits
    neither overflow nor underflow to a zero row. ``n_samples``: this rank's sample count as a
    1-element tensor (e.g. masked patches), defaults to ``teacher_logits.shape[0]``.
    """
    log_q = teacher_logits.float().t() / teacher_temp  # K x B_rank
    n_prototypes = log_q.shape[0]
    local = n_samples.detach().clone().float() if n_samples is not None else torch.tensor(float(log_q.shape[1]))
    total_samples = _all_reduce(local.to(log_q.device).reshape(())).item()
    if total_samples == 0:
        return log_q.t().exp()
    log_k, log_b = math.log(n_prototypes), math.log(total_samples)
    for _ in range(n_iterations):
        log_q = log_q - _logsumexp_over_ranks(log_q, dim=1) - log_k
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_b
    return torch.exp(log_q + log_b).t()


class DINOLoss(nn.Module):
    """Cross-entropy of student crops against teacher crops, with the teacher's centre as state."""

    def __init__(self, n_prototypes: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3):
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """``c <- m c + (1 - m) * mean of the teacher logits over every rank's batch``."""
        total = _all_reduce(teacher_logits.float().sum(dim=0, keepdim=True))
        batch_center = total / (teacher_logits.shape[0] * _world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def forward(self, student_logits: list, teacher_probs: list) -> torch.Tensor:
        """Sum over every (student crop, teacher crop) pair of the batch-mean cross-entropy."""
        total = student_logits[0].new_zeros((), dtype=torch.float32)
        for s in student_logits:
            log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for t in teacher_probs:
                total = total - torch.sum(t * log_p, dim=-1).mean()
        return total
