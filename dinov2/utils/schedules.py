"""Per-iteration schedules: linear warm-up then half-cosine, as in DINOv2.

``value(t) = 0`` for ``t < freeze``; linear from ``start_warmup`` to ``base`` over ``warmup``
iterations; then ``final + (base - final) * (1 + cos(pi * u)) / 2`` with
``u = (t - freeze - warmup) / (total - freeze - warmup)``; ``final`` from ``total`` on.
"""

import math
from dataclasses import dataclass

from dinov2.errors import ConfigError


@dataclass(frozen=True)
class CosineSchedule:
    base: float
    final: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup: float = 0.0
    freeze_iters: int = 0

    def __getitem__(self, step: int) -> float:
        if step >= self.total_iters:
            return self.final
        if step < self.freeze_iters:
            return 0.0
        step -= self.freeze_iters
        if step < self.warmup_iters:
            # np.linspace(start, base, warmup)[step]: reaches `base` on the last warm-up iteration
            if self.warmup_iters == 1:
                return self.base
            return self.start_warmup + (self.base - self.start_warmup) * step / (self.warmup_iters - 1)
        step -= self.warmup_iters
        length = max(1, self.total_iters - self.freeze_iters - self.warmup_iters)
        return self.final + 0.5 * (self.base - self.final) * (1 + math.cos(math.pi * step / length))


def build_schedules(cfg, lr: float) -> dict:
    """The schedules of a run: lr, wd, teacher momentum, teacher temperature, last-layer lr, and the
    backbone's lr, which starts (with its own warm-up) after ``optim.freeze_backbone_epochs`` of head
    warm-up; without one it equals ``lr``.

    ``lr`` is the peak learning rate already scaled to the global batch size.
    """
    epoch_len = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * epoch_len
    warmup = cfg.optim.warmup_epochs * epoch_len
    freeze_backbone = round(cfg.optim.freeze_backbone_epochs * epoch_len)
    return {
        "lr": CosineSchedule(lr, cfg.optim.min_lr, total, warmup_iters=warmup),
        "backbone_lr": CosineSchedule(lr, cfg.optim.min_lr, total, warmup_iters=warmup, freeze_iters=freeze_backbone),
        "freeze_backbone_iters": freeze_backbone,
        "wd": CosineSchedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        "momentum": CosineSchedule(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total),
        "teacher_temp": CosineSchedule(
            cfg.teacher.teacher_temp,
            cfg.teacher.teacher_temp,
            total,
            warmup_iters=cfg.teacher.warmup_teacher_temp_epochs * epoch_len,
            start_warmup=cfg.teacher.warmup_teacher_temp,
        ),
        "freeze_last_layer_iters": cfg.optim.freeze_last_layer_epochs * epoch_len,
    }


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """Peak lr for ``global_batch`` images from ``base_lr`` given per 1024 images.

    ``sqrt_wrt_1024``: ``base_lr * sqrt(B / 1024)`` (DINOv2, DinoBloom); ``linear_wrt_1024``:
    ``base_lr * B / 1024``; ``none``: ``base_lr`` as is.
    """
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024.0)
    if rule == "linear_wrt_1024":
        return base_lr * global_batch / 1024.0
    if rule == "none":
        return base_lr
    raise ConfigError(f"optim.scaling_rule must be sqrt_wrt_1024, linear_wrt_1024 or none, got {rule!r}")
