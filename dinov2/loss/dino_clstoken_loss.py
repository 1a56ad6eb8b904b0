"""DINO loss on the CLS token: cross-entropy between teacher and student prototype distributions.

For student logits ``s`` and teacher targets ``t`` (probabilities over K prototypes)
``L = -sum_k t_k log softmax(s / tau_s)_k``, averaged over the batch. The targets come from
the teacher's logits by centring or Sinkhorn-Knopp (:mod:`dinov2.loss.teacher_centering`).
"""

import torch

from dinov2.loss.teacher_centering import TeacherCentering, _at_least_fp32
from dinov2.utils.row_chunks import row_chunks


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


class DINOLoss(TeacherCentering):
    """Cross-entropy of student crops against teacher crops, with the teacher's centre as state."""

    def __init__(self, n_prototypes: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__(n_prototypes, center_momentum)
        self.student_temp = student_temp

    def forward(self, student_logits: list, teacher_probs: list) -> torch.Tensor:
        """Sum over every (student crop, teacher crop) pair of the batch-mean cross-entropy."""
        total = student_logits[0].new_zeros((), dtype=torch.float32)
        for s in student_logits:
            for t in teacher_probs:
                total = total + soft_cross_entropy(s, t, self.student_temp).mean()
        return total
