"""DINO loss on the CLS token: cross-entropy between teacher and student prototype distributions.

For student logits ``s`` and teacher targets ``t`` (probabilities over K prototypes)
``L = -sum_k t_k log softmax(s / tau_s)_k``, averaged over the batch. The targets come from
the teacher's logits by centring or Sinkhorn-Knopp (:mod:`dinov2.loss.teacher_centering`).
"""

import torch
import torch.nn.functional as F

from dinov2.loss.teacher_centering import TeacherCentering


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row ``-sum_k t_k log softmax(s / tau_s)_k`` of ``s = student_logits`` against ``t = teacher_probs``,
    computed in at least fp32 (bf16 logits, e.g. under FSDP's mixed precision, are promoted)."""
    logits = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    return -(teacher_probs.detach() * F.log_softmax(logits / student_temp, dim=-1)).sum(dim=-1)


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
