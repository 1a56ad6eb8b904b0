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

from dinov2.utils.row_chunks import row_chunks


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
    vectors, ``Q = diag(u) P diag(v)``, so an iteration is one pass over ``P`` (two
    matrix-vector products, chunk by chunk) instead of four passes over Q. Each column of the
    exponent is shifted by its maximum over all ranks (absorbed exactly by ``v``), so no column
    can overflow or vanish; and ``P`` is stored row-normalised, ``P_i = softmax(y_i)`` with
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
    # y = z / tau - max / tau (cast, scaling and shift in one fp32 pass), P = softmax(y) per row
    # and the first column sums r @ P, chunk by chunk while the chunk is in cache.
    # logsumexp(y_i) = max y_i - log max P_i, and exp of it is at most K: no overflow
    p = torch.empty(teacher_logits.shape, dtype=dtype, device=teacher_logits.device)  # B_rank x K
    chunks = row_chunks(p)
    column_mass = p.new_zeros(n_prototypes)
    for rows in chunks:
        y = torch.add(shift, teacher_logits[rows], alpha=1.0 / teacher_temp, out=p[rows])
        row_max = y.amax(dim=1)
        torch.softmax(y, dim=1, out=y)
        column_mass += (row_max - y.amax(dim=1).log()).exp_() @ y
    # a row's u needs only that row of P and v: each pass over P computes u for its rows and,
    # from the same chunk, the column sums u @ P of the next iteration, or (last) writes Q
    for iteration in range(n_iterations):
        v = _reciprocal_or_zero(_all_reduce(column_mass) * n_prototypes)
        last = iteration == n_iterations - 1
        column_mass = p.new_zeros(n_prototypes)
        for rows in chunks:
            chunk = p[rows]
            u = _reciprocal_or_zero((chunk @ v) * total_samples)
            if last:
                chunk.mul_(u.mul_(total_samples).unsqueeze(1)).mul_(v)
            else:
                column_mass += u @ chunk
    return p


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


class _SoftCrossEntropy(torch.autograd.Function):
    """Per-row ``-sum_k t_k log softmax(z)_k`` with ``z = s / tau``, as ``m lse(z) - sum_k t_k z_k``
    (``m = sum_k t_k``, ``lse`` = log-sum-exp).

    One exponential per element in all: the forward keeps ``p = softmax(z)`` (one fused kernel,
    in place on the fp32 copy of ``z``) and reads ``lse = max_k z_k - log max_k p_k`` off it
    (``max_k p_k >= 1/K``: no underflow); the backward, ``(m p - t) / tau``, is then one fused
    multiply-add in place on ``p``. Both run chunk by chunk of rows
    (:func:`~dinov2.utils.row_chunks.row_chunks`).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_probs, temp):
        n_prototypes = student_logits.shape[-1]
        logits, targets = student_logits.reshape(-1, n_prototypes), teacher_probs.reshape(-1, n_prototypes)
        with torch.autocast(student_logits.device.type, enabled=False):  # all in fp32 (or fp64)
            p = torch.empty(logits.shape, dtype=_at_least_fp32(student_logits), device=logits.device)
            loss, mass = p.new_empty(p.shape[0]), p.new_empty(p.shape[0])
            for rows in row_chunks(p):
                z = p[rows].copy_(logits[rows]).mul_(1.0 / temp)
                t = targets[rows].to(p.dtype)
                target_dot_z = torch.linalg.vecdot(t, z)
                z_max = z.amax(dim=-1)
                torch.softmax(z, dim=-1, out=z)
                mass[rows] = t.sum(dim=-1)
                loss[rows] = mass[rows] * (z_max - z.amax(dim=-1).log()) - target_dot_z
        ctx.save_for_backward(p, targets, mass)
        ctx.temp = temp
        ctx.input_dtype = student_logits.dtype
        ctx.input_shape = student_logits.shape
        return loss.reshape(student_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad):
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "soft_cross_entropy: backward ran twice over one graph; its saved "
                "probabilities are consumed in place by the first backward"
            )
        ctx.consumed = True
        p, targets, mass = ctx.saved_tensors
        scale = grad.reshape(-1).to(p.dtype) / ctx.temp
        grad_input = p if ctx.input_dtype == p.dtype else torch.empty(p.shape, dtype=ctx.input_dtype, device=p.device)
        for rows in row_chunks(p):
            # in place on the saved probabilities: this graph is not back-propagated twice
            chunk_scale = scale[rows].unsqueeze(-1)
            chunk = p[rows].mul_(mass[rows].unsqueeze(-1) * chunk_scale).addcmul_(targets[rows], chunk_scale.neg())
            if grad_input is not p:
                grad_input[rows].copy_(chunk)
        return grad_input.reshape(ctx.input_shape), None, None


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row cross-entropy of ``softmax(student_logits / student_temp)`` against ``teacher_probs``."""
    return _SoftCrossEntropy.apply(student_logits, teacher_probs.detach(), student_temp)


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
        update_ema_center(self.center, teacher_logits, self.center_momentum)

    def forward(self, student_logits: list, teacher_probs: list) -> torch.Tensor:
        """Sum over every (student crop, teacher crop) pair of the batch-mean cross-entropy."""
        total = student_logits[0].new_zeros((), dtype=torch.float32)
        for s in student_logits:
            for t in teacher_probs:
                total = total + soft_cross_entropy(s, t, self.student_temp).mean()
        return total
