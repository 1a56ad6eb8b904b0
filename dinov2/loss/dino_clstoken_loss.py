"""DINO loss on the CLS token: cross-entropy between teacher and student prototype distributions.

For student logits ``s`` and teacher targets ``t`` (probabilities over K prototypes)
``L = -sum_k t_k log softmax(s / tau_s)_k``, averaged over the batch. Teacher targets come from
either

* centering: ``t = softmax((z - c) / tau_t)`` with ``c <- m c + (1 - m) mean_batch(z)``
  (the mean over all ranks; ``m = center_momentum``), or
* Sinkhorn-Knopp: ``Q = exp(z / tau_t)`` rescaled alternately so that every prototype gets
  mass ``1/K`` and every sample mass ``1/B`` (B = global batch), a few iterations.
"""

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


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3, n_samples=None) -> torch.Tensor:
    """Balanced soft assignment of ``B`` samples (all ranks) to ``K`` prototypes; rows sum to 1.

    ``Q = exp(z / tau)`` (K x B) is rescaled alternately so that every prototype holds mass
    ``1/K`` and every sample ``1/B``; returns ``B Q^T``. Each prototype's row is first shifted by
    its maximum over all ranks: the first rescaling absorbs that exactly, and ``exp`` can neither
    overflow nor give an all-zero row. ``n_samples``: this rank's sample count as a 1-element
    tensor (e.g. masked patches); defaults to ``teacher_logits.shape[0]``.
    """
    logits = teacher_logits.float().t() / teacher_temp  # K x B_rank
    n_prototypes = logits.shape[0]
    local = n_samples.detach().float().reshape(()) if n_samples is not None else torch.tensor(float(logits.shape[1]))
    total_samples = _all_reduce(local.clone().to(logits.device)).item()
    if total_samples == 0:
        return logits.t().exp()
    if logits.shape[1]:
        row_max = logits.amax(dim=1, keepdim=True)
    else:
        row_max = logits.new_full((n_prototypes, 1), float("-inf"))
    row_max = _all_reduce(row_max, op=dist.ReduceOp.MAX)
    q = torch.exp(logits - row_max)
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)) * n_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp(min=tiny) * total_samples
    return (q * total_samples).t()


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
