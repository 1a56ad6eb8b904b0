"""iBOT loss: DINO's cross-entropy on masked patch tokens.

The student sees the image with some patches replaced by the mask token; the teacher sees it
whole. For the masked patches ``p`` of image ``i`` (``M_i`` of them)
``L = -(1/N_img) sum_i (1/M_i) sum_{p masked in i} sum_k t_pk log softmax(s_p / tau_s)_k``.
Teacher targets are centred (own EMA centre, one per prototype) or Sinkhorn-Knopp balanced.
"""

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.loss.dino_clstoken_loss import sinkhorn_knopp, soft_cross_entropy, update_ema_center


class iBOTPatchLoss(nn.Module):
    def __init__(self, n_prototypes: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits, teacher_temp, n_masked_patches, n_iterations: int = 3):
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations, n_samples=n_masked_patches)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the mean teacher patch logit over every rank's masked patches."""
        update_ema_center(self.center, teacher_logits, self.center_momentum)

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
