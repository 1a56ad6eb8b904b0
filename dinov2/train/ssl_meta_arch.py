"""The training objective: DINO + iBOT + KoLeo on unlabelled crops, HCE on a labelled batch.

``SSLMetaArch`` holds

* ``student``: ``backbone`` (ViT), ``dino_head`` and, with ``ibot.separate_head``, ``ibot_head``;
* ``teacher``: the same modules, an exponential moving average of the student (no gradients);
* ``supervised_head``: ``Linear(embed_dim, len(tree.leaves))`` on the student's CLS token of the
  supervised batch (no teacher copy);
* the losses, whose state (the DINO / iBOT centres) is part of the checkpoint.

Per step, with ``n_g = 2`` global crops, ``n_l`` local crops and ``T = n_g (n_g - 1) + n_l n_g``
DINO terms (``n_l n_g`` counted only when the local term is on)::

    dino_global  = sum over the 2 cross pairs (student crop a, teacher crop b != a) of CE / T
    dino_local   = sum over (local crop, teacher global crop) pairs of CE / T
    ibot         = 2 * mean over global crops of the mean CE over their masked patches
    koleo        = koleo_loss_weight * sum over global crops of KoLeo(student CLS)
    supervised   = HCE (or CE) of supervised_head(student CLS) on the labelled batch
    loss = dino.loss_weight * (dino_global + dino_local) + ibot.loss_weight * ibot + koleo
           + supervised.loss_weight * supervised

DinoBloom / dino_hier log the supervised term halved ("loss/2"); here every term is logged at
its true value.
"""

import logging
import math

import torch
from torch import nn

from dinov2.errors import ConfigError
from dinov2.fsdp import local_tensor
from dinov2.layers.dino_head import DINOHead, adapt_head_state_dict
from dinov2.loss.dino_clstoken_loss import DINOLoss
from dinov2.loss.hierarchical_ce import build_supervised_loss
from dinov2.loss.ibot_patch_loss import iBOTPatchLoss
from dinov2.loss.koleo_loss import KoLeoLoss
from dinov2.models import build_backbone
from dinov2.models.weights import load_pretrained, read_checkpoint, strip_prefix

logger = logging.getLogger("dinov2")

LOSS_TERMS = ("dino_global", "dino_local", "ibot", "koleo", "supervised")


def backbone_kwargs(cfg, drop_path_rate: float) -> dict:
    s = cfg.student
    size = {key: s[key] for key in ("embed_dim", "depth", "num_heads") if s[key] is not None}
    return dict(
        **size,
        img_size=cfg.crops.global_crops_size,
        patch_size=s.patch_size,
        drop_path_rate=drop_path_rate,
        drop_path_uniform=s.drop_path_uniform,
        init_values=s.layerscale,
        ffn_layer=s.ffn_layer,
        qkv_bias=s.qkv_bias,
        proj_bias=s.proj_bias,
        ffn_bias=s.ffn_bias,
        num_register_tokens=s.num_register_tokens,
        interpolate_antialias=s.interpolate_antialias,
        interpolate_offset=s.interpolate_offset,
    )


def _head(cfg_head, embed_dim: int) -> DINOHead:
    return DINOHead(
        embed_dim,
        cfg_head.head_n_prototypes,
        nlayers=cfg_head.head_nlayers,
        hidden_dim=cfg_head.head_hidden_dim,
        bottleneck_dim=cfg_head.head_bottleneck_dim,
    )


def dino_local_loss_enabled(cfg) -> bool:
    """``dino.local_loss``: ``auto`` means on only with more than one local crop (DinoBloom)."""
    setting = cfg.dino.local_loss
    if cfg.crops.local_crops_number == 0:
        return False
    if setting == "auto":
        return cfg.crops.local_crops_number > 1
    if isinstance(setting, bool):
        return setting
    raise ConfigError(f"dino.local_loss must be auto, true or false, got {setting!r}")


class SSLMetaArch(nn.Module):
    def __init__(self, cfg, tree, load_pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.tree = tree
        self.n_global_crops = 2
        self.n_local_crops = cfg.crops.local_crops_number
        self.do_local = dino_local_loss_enabled(cfg)
        # (student crop, teacher crop) pairs of the DINO loss: global-global (not the same crop) + local-global
        self.n_dino_pairs = self.n_global_crops * (self.n_global_crops - 1) + (
            self.n_local_crops * self.n_global_crops if self.do_local else 0
        )
        self.separate_ibot_head = cfg.ibot.separate_head
        self.centering = cfg.train.centering
        if self.centering not in ("centering", "sinkhorn_knopp"):
            raise ConfigError(f"train.centering must be centering or sinkhorn_knopp, got {self.centering!r}")

        student_backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg, cfg.student.drop_path_rate))
        teacher_backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg, 0.0))
        self.embed_dim = student_backbone.embed_dim
        self.student = nn.ModuleDict({"backbone": student_backbone, "dino_head": _head(cfg.dino, self.embed_dim)})
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone, "dino_head": _head(cfg.dino, self.embed_dim)})
        if self.separate_ibot_head:
            self.student["ibot_head"] = _head(cfg.ibot, self.embed_dim)
            self.teacher["ibot_head"] = _head(cfg.ibot, self.embed_dim)
        elif cfg.ibot.head_n_prototypes != cfg.dino.head_n_prototypes:
            raise ConfigError("ibot.head_n_prototypes must equal dino.head_n_prototypes when ibot.separate_head=false")
        self.supervised_head = nn.Linear(self.embed_dim, len(tree.leaves))
        nn.init.trunc_normal_(self.supervised_head.weight, std=0.02)
        nn.init.zeros_(self.supervised_head.bias)

        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(cfg.ibot.head_n_prototypes)
        self.koleo_loss = KoLeoLoss()
        self.supervised_loss = build_supervised_loss(tree, loss=cfg.supervised.loss, alpha=cfg.supervised.alpha)

        if cfg.student.pretrained_weights and load_pretrained:  # not when a checkpoint will overwrite them
            self.load_pretrained_weights(cfg.student.pretrained_weights)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    def load_pretrained_weights(self, source: str) -> None:
        """Backbone from ``source`` (file, URL or preset); DINO/iBOT heads too when it has them
        with matching shapes (a DINOv2/DinoBloom training checkpoint), else they stay random."""
        load_pretrained(self.student.backbone, source)
        logger.info("student and teacher backbones initialised from %s", source)
        checkpoint = read_checkpoint(source)
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
            checkpoint = checkpoint["model"]
        for head_name in ("dino_head", "ibot_head"):
            if head_name not in self.student:
                continue
            head = self.student[head_name]
            for prefix in (f"teacher.{head_name}.", f"{head_name}.", f"student.{head_name}."):
                state = adapt_head_state_dict(strip_prefix(checkpoint, prefix))
                own = head.state_dict()
                if state and state.keys() == own.keys() and all(state[k].shape == own[k].shape for k in own):
                    head.load_state_dict(state)
                    logger.info("%s initialised from %s (%s*)", head_name, source, prefix)
                    break
            else:
                logger.info("%s: no matching weights in %s, randomly initialised", head_name, source)

    # ------------------------------------------------------------------ teacher
    @torch.no_grad()
    def teacher_targets(self, global_crops, masks, n_masked_patches, teacher_temp):
        """Teacher probabilities: DINO ``[n_g, B, K]`` (crops swapped: row a is the target of
        student crop a) and iBOT ``[n_masked, K]`` for the patches where ``masks`` is True
        (the student's masked patches; the teacher sees them unmasked)."""
        out = self.teacher.backbone([global_crops], is_training=True, patches=[masks])[0]
        cls = out["x_norm_clstoken"].chunk(self.n_global_crops)
        cls = torch.cat((cls[1], cls[0]))
        patches = out["x_norm_patchtokens"]
        if self.separate_ibot_head:
            dino_logits = self.teacher.dino_head(cls)
            ibot_logits = self.teacher.ibot_head(patches)
        else:
            logits = self.teacher.dino_head(torch.cat((cls, patches)))
            dino_logits, ibot_logits = logits[: cls.shape[0]], logits[cls.shape[0] :]
        if self.centering == "centering":
            dino_probs = self.dino_loss.softmax_center_teacher(dino_logits, teacher_temp)
            self.dino_loss.update_center(dino_logits)
            ibot_probs = self.ibot_patch_loss.softmax_center_teacher(ibot_logits, teacher_temp)
            self.ibot_patch_loss.update_center(ibot_logits)
        else:
            dino_probs = self.dino_loss.sinkhorn_knopp_teacher(dino_logits, teacher_temp)
            ibot_probs = self.ibot_patch_loss.sinkhorn_knopp_teacher(ibot_logits, teacher_temp, n_masked_patches)
        return dino_probs.view(self.n_global_crops, -1, dino_probs.shape[-1]), ibot_probs

    # ------------------------------------------------------------------ student
    def uniform_values(self) -> dict:
        """The DINO terms' values when student and teacher both output the uniform distribution
        over the prototypes (a collapsed head: its gradient vanishes there): ``ln K`` per pair of
        crops, with the terms' pair weights."""
        log_k = math.log(self.cfg.dino.head_n_prototypes)
        values = {"dino_global": log_k * self.n_global_crops * (self.n_global_crops - 1) / self.n_dino_pairs}
        if self.do_local:
            values["dino_local"] = log_k * self.n_local_crops * self.n_global_crops / self.n_dino_pairs
        return values

    def forward_losses(self, batch: dict, supervised_batch, teacher_temp: float) -> tuple:
        """All loss terms of one step: ``(total, {term: value})`` (terms detached, float)."""
        global_crops = batch["collated_global_crops"]
        masks = batch["collated_masks"]
        n_masked = batch["n_masked_patches"]
        masks_weight = batch["masks_weight"]
        dino_probs, ibot_probs = self.teacher_targets(global_crops, masks, n_masked, teacher_temp)

        # the losses read the CLS tokens and the global crops' masked patch tokens: the last block
        # computes those alone (forward_features_selected; exact), in the teacher as well
        crops, crop_masks = [global_crops], [masks]
        if self.do_local:
            crops.append(batch["collated_local_crops"])
            crop_masks.append(None)
        use_supervised = supervised_batch is not None and self.cfg.supervised.loss_weight > 0
        if use_supervised:
            crops.append(supervised_batch[0])
            crop_masks.append(None)
        wanted_patches = [masks] + [None] * (len(crops) - 1)
        outputs = self.student.backbone(crops, masks=crop_masks, is_training=True, patches=wanted_patches)
        global_out = outputs[0]
        global_cls = global_out["x_norm_clstoken"]
        masked_patches = global_out["x_norm_patchtokens"]
        head_inputs = [global_cls]
        if self.do_local:
            head_inputs.append(outputs[1]["x_norm_clstoken"])
        if not self.separate_ibot_head:
            head_inputs.append(masked_patches)
        head_out = self.student.dino_head(torch.cat(head_inputs)).split([x.shape[0] for x in head_inputs])
        global_logits = head_out[0]
        ibot_logits = self.student.ibot_head(masked_patches) if self.separate_ibot_head else head_out[-1]

        terms = {}
        terms["dino_global"] = self.dino_loss([global_logits], [dino_probs.flatten(0, 1)]) * 2 / self.n_dino_pairs
        if self.do_local:
            terms["dino_local"] = (
                self.dino_loss(head_out[1].chunk(self.n_local_crops), list(dino_probs)) / self.n_dino_pairs
            )
        terms["ibot"] = 2 * self.ibot_patch_loss.forward_masked(ibot_logits, ibot_probs, masks, masks_weight)
        if self.cfg.dino.koleo_loss_weight > 0:
            terms["koleo"] = self.cfg.dino.koleo_loss_weight * sum(
                self.koleo_loss(c) for c in global_cls.chunk(self.n_global_crops)
            )
        if use_supervised:
            logits = self.supervised_head(outputs[-1]["x_norm_clstoken"])
            terms["supervised"] = self.supervised_loss(logits.float(), supervised_batch[1])

        weights = {
            "dino_global": self.cfg.dino.loss_weight,
            "dino_local": self.cfg.dino.loss_weight,
            "ibot": self.cfg.ibot.loss_weight,
            "koleo": 1.0,
            "supervised": self.cfg.supervised.loss_weight,
        }
        total = sum(weights[name] * value for name, value in terms.items())
        return total, terms

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher <- momentum * teacher + (1 - momentum) * student`` on this rank's shards."""
        student, teacher = [], []
        for name in self.teacher.keys():
            for s, t in zip(self.student[name].parameters(), self.teacher[name].parameters()):
                student.append(local_tensor(s).detach())
                teacher.append(local_tensor(t))
        torch._foreach_lerp_(teacher, student, 1 - momentum)
