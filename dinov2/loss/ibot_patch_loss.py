"""iBOT loss: DINO's cross-entropy on masked patch tokens.

The student sees the image with some patches replaced by the mask token; the teacher sees it
whole. For the masked patches ``p`` of image ``i`` (``M_i`` of them)
``L = -(1/N_img) sum_i (1/M_i) sum_{p masked in i} sum_k t_pk log softmax(s_p / tau_s)_k``.
Teacher targets are centred (the loss's own EMA centre over masked patches, one per prototype)
or Sinkhorn-Knopp balanced (:mod:`dinov2.loss.teacher_centering`); for Sinkhorn-Knopp, pass
this rank's masked-patch count as ``n_samples``.
"""

import torch

from dinov2.loss.dino_clstoken_loss import soft_cross_entropy
from dinov2.loss.teacher_centering import TeacherCentering


class iBOTPatchLoss(TeacherCentering):
    def __init__(self, n_prototypes: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__(n_prototypes, center_momentum)
        self.student_temp = student_temp

    def forward_masked(
        self,
        student_logits: torch.Tensor,
        teacher_probs: torch.Tensor,
        masks: torch.Tensor,
        masks_weight: torch.Tensor = None,
    ) -> torch.Tensor:
        """``student_logits``/``teacher_probs``: [n_masked, K] for the masked patches in the order of
        ``masks[masks]``; ``masks``: bool [n_images, n_patches]; ``masks_weight``: per masked patch
        ``1/M_i`` (computed from ``masks`` when absent)."""
        if masks_weight is None:
            per_image = 1.0 / masks.sum(-1).clamp(min=1.0)
            masks_weight = per_image.unsqueeze(-1).expand_as(masks)[masks]
        loss = soft_cross_entropy(student_logits, teacher_probs, self.student_temp) * masks_weight
        return loss.sum() / masks.shape[0]
