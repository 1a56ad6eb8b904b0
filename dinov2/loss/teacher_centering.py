"""The teacher's targets for the DINO and iBOT losses, and their state: one base for both.

From teacher logits ``z`` (rows: samples, columns: K prototypes) either

* centring: ``t = softmax((z - c) / tau_t)`` with ``c <- m c + (1 - m) mean_rows(z)``, the mean over
  every rank's rows (``m = center_momentum``); ``c`` is the buffer ``center`` ``[1, K]``, saved in
  checkpoints as ``dino_loss.center`` / ``ibot_patch_loss.center`` (DINOv2's keys); or
* Sinkhorn-Knopp: ``Q = exp(z / tau_t)`` rescaled alternately so that every prototype gets mass
  ``1/K`` and every sample mass ``1/B`` (B = rows over all ranks), a few iterations.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3, n_samples=None
) -> torch.Tensor:
    """Balanced soft assignment of ``B`` samples (all ranks) to ``K`` prototypes; rows sum to 1.

    With ``Q = exp(z / tau)`` (B x K), alternately rescale every prototype (column) to mass
    ``1/K`` and every sample (row) to ``1/B``; return ``B Q``. The rescalings are kept as
    vectors, ``Q = diag(u) P diag(v)``, so an iteration is two matrix-vector products with ``P``.
    Each column of the exponent is shifted by its maximum over all ranks (absorbed exactly by
    ``v``), so no column can overflow or vanish; and ``P`` is stored row-normalised, ``P_i = softmax(y_i)`` with
    ``y = z / tau - shift`` (torch's softmax: a faster ``exp`` than ``torch.exp``), the row
    factors ``r_i = exp(logsumexp(y_i))`` kept apart: they only weigh the first column sums
    (``r @ P``), since every later ``u`` rescales its row anyway. So a sample far below every
    prototype's maximum still gets its (exact) target row instead of an underflowed zero row.
    ``n_samples``: this rank's sample count as a 1-element tensor (e.g. masked patches);
    defaults to ``teacher_logits.shape[0]``.

    Runs with autocast off: under autocast the products would be bf16 (a bf16 copy of ``P`` per
    product, and a less accurate result) instead of the fp32 this is meant to be.
    """
    with torch.autocast(teacher_logits.device.type, enabled=False):
        return _sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations, n_samples)


def _sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations, n_samples):
    if n_iterations < 1:
        raise ValueError(f"Sinkhorn-Knopp needs at least one iteration, got {n_iterations}")
    dtype = _at_least_fp32(teacher_logits)
    n_prototypes = teacher_logits.shape[1]
    # the count stays on the device, made by a fill kernel (a scalar copied from the host would wait for
    # the device: a host sync); 0 only when no rank has a row, and then there is nothing to scale
    if n_samples is None:
        local = torch.full((), float(teacher_logits.shape[0]), dtype=dtype, device=teacher_logits.device)
    else:
        local = n_samples.detach().to(teacher_logits.device, dtype).reshape(()).clone()
    total_samples = _all_reduce(local)
    if teacher_logits.shape[0]:
        column_max = teacher_logits.amax(dim=0, keepdim=True).to(dtype)  # exact in any dtype
    else:
        column_max = teacher_logits.new_full((1, n_prototypes), float("-inf"), dtype=dtype)
    shift = _all_reduce(column_max, op=dist.ReduceOp.MAX).mul_(-1.0 / teacher_temp)
    # y = z / tau - max / tau in fp32, P = softmax(y) per row; the first column sums are r @ P, with
    # log r_i = logsumexp(y_i) = max y_i - log max P_i (at most log K: no overflow)
    y = torch.add(shift, teacher_logits, alpha=1.0 / teacher_temp)
    row_max = y.amax(dim=1)
    p = torch.softmax(y, dim=1, out=y)  # B_rank x K
    column_mass = (row_max - p.amax(dim=1).log()).exp_() @ p
    # v rescales the columns to mass 1/K, then u the rows to 1/B
    for iteration in range(n_iterations):
        v = _reciprocal_or_zero(_all_reduce(column_mass) * n_prototypes)
        u = _reciprocal_or_zero((p @ v) * total_samples)
        if iteration < n_iterations - 1:
            column_mass = u @ p
    return p.mul_(u.mul_(total_samples).unsqueeze(1)).mul_(v)


@torch.no_grad()
def update_ema_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> None:
    """``c <- m c + (1 - m) * mean of the teacher logits over every rank's rows`` (the rows counted
    over the ranks too: the same centre on every rank even when their row counts differ)."""
    total = _all_reduce(teacher_logits.float().sum(dim=0, keepdim=True))
    count = _all_reduce(torch.full((), float(teacher_logits.shape[0]), device=teacher_logits.device))
    center.mul_(momentum).add_(total / count.clamp(min=1.0), alpha=1 - momentum)


def _reciprocal_or_zero(mass: torch.Tensor) -> torch.Tensor:
    """``1 / mass``, and 0 where the mass underflowed to 0 (that row or column stays empty)."""
    return torch.where(mass > 0, 1.0 / mass, torch.zeros_like(mass))


def _at_least_fp32(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


class TeacherCentering(nn.Module):
    """Base of :class:`~dinov2.loss.dino_clstoken_loss.DINOLoss` and
    :class:`~dinov2.loss.ibot_patch_loss.iBOTPatchLoss`: the centre buffer and both ways to targets."""

    def __init__(self, n_prototypes: int, center_momentum: float = 0.9):
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``softmax((z - c) / tau_t)`` per row, in fp32."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean_rows(z)`` over every rank's rows."""
        update_ema_center(self.center, teacher_logits, self.center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_samples=None, n_iterations: int = 3
    ) -> torch.Tensor:
        """Balanced targets (:func:`sinkhorn_knopp`); ``n_samples``: this rank's row count as a
        1-element tensor (e.g. the masked patches), default the rows of ``teacher_logits``."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations, n_samples=n_samples)
