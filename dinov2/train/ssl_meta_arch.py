"""The training objective: DINO + iBOT + KoLeo on unlabelled crops, a supervised loss on a labelled batch.

``SSLMetaArch`` holds

* ``student``: ``backbone`` (ViT), ``dino_head``, with ``ibot.separate_head`` ``ibot_head``, and
  with ``supervised.loss`` ``hce`` (default) or ``ce`` ``classifier``: ``Linear(embed_dim,
  len(tree.leaves))`` on the CLS token of the labelled batch, through which that loss trains the backbone;
* ``teacher``: ``backbone``, ``dino_head`` (and ``ibot_head``), an exponential moving average of the
  student's (no gradients);
* with a contrastive ``supervised.loss`` (``supcon``, ``hier_supcon``: dinov2.loss.supcon),
  ``projection_head``: an MLP ``embed_dim → hidden → projection_dim`` on the student's CLS token, whose
  output the loss L2-normalises;
* ``supervised_head``: the classifier of the model file (``predict``, the ``head`` evaluation):
  ``Linear(embed_dim, len(tree.leaves))`` trained with the classifier loss (HCE for the contrastive
  losses) on the *teacher's* detached CLS token of the labelled batch. The exported backbone is the
  teacher's, and it lags the student: a head trained on the student's features reads the teacher's
  wrongly (measured: 78 % on its training batches with the student, 16 % with the teacher after a
  200-step fine-tuning), so the exported head learns on the features it will be given;
* the losses, whose state (the DINO / iBOT centres) is part of the checkpoint.

The student sees up to three named crop streams per step: ``global`` (``n_g = 2`` crops per image,
some patches masked), ``local`` (``n_l`` small crops; only when the DINO local term is on) and
``supervised`` (the labelled batch). With ``T = n_g (n_g - 1) + n_l n_g`` DINO crop pairs
(``n_l n_g`` counted only when the local term is on)::

    dino_global  = sum over the n_g (n_g - 1) pairs (student crop a, teacher crop b != a) of CE / T
    dino_local   = sum over the n_l n_g pairs (local crop, teacher global crop) of CE / T
    ibot         = n_g * mean over global crops of the mean CE over their masked patches
    koleo        = koleo_loss_weight * sum over global crops of KoLeo(student CLS)
    supervised   = HCE (or CE) of classifier(student CLS) on the labelled batch, or
                   SupCon / hierarchical SupCon of projection_head(student CLS) over every rank's batch
    supervised_head = HCE (or CE) of supervised_head(detached teacher CLS) on the labelled batch
    loss = dino.loss_weight * (dino_global + dino_local) + ibot.loss_weight * ibot + koleo
           + supervised.loss_weight * supervised + supervised_head

The terms carry gradients (the trainer detaches them for logging). DinoBloom / dino_hier log the
supervised term halved ("loss/2"); here every term is logged at its true value.
"""

import logging
import math

import torch
from torch import nn

from dinov2.errors import ConfigError
from dinov2.fsdp import local_tensor
from dinov2.layers.dino_head import DINOHead, adapt_head_state_dict
from dinov2.loss.dino_clstoken_loss import DINOLoss
from dinov2.loss.hierarchical_ce import LOSSES as CLASSIFIER_LOSSES
from dinov2.loss.hierarchical_ce import build_supervised_loss
from dinov2.loss.ibot_patch_loss import iBOTPatchLoss
from dinov2.loss.koleo_loss import KoLeoLoss
from dinov2.loss.supcon import CONTRASTIVE_LOSSES, build_contrastive_loss
from dinov2.models import build_backbone
from dinov2.models.weights import load_backbone_checkpoint, read_checkpoint, strip_prefix
from dinov2.utils.param_groups import layer_id

logger = logging.getLogger("dinov2")

SUPERVISED_LOSSES = CLASSIFIER_LOSSES + CONTRASTIVE_LOSSES
N_GLOBAL_CROPS = 2  # DINOv2's: two global crops per image, each the other's teacher view


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


def build_dino_head(head_cfg, embed_dim: int) -> DINOHead:
    """A DINO (or iBOT) projection head from its config block (``dino`` or ``ibot``)."""
    return DINOHead(
        embed_dim,
        head_cfg.head_n_prototypes,
        nlayers=head_cfg.head_nlayers,
        hidden_dim=head_cfg.head_hidden_dim,
        bottleneck_dim=head_cfg.head_bottleneck_dim,
    )


def frozen_layer_names(backbone, freeze_blocks: int) -> set:
    """Names of the backbone parameters that ``student.freeze_blocks = K`` fixes: with ``K > 0`` the
    patch embedding, the tokens (cls, register, mask, position) and blocks ``0 .. K-1``."""
    if not 0 <= freeze_blocks <= backbone.n_blocks:
        raise ConfigError(f"student.freeze_blocks must lie in 0..{backbone.n_blocks} (the depth), got {freeze_blocks}")
    if freeze_blocks == 0:
        return set()
    return {name for name, _ in backbone.named_parameters() if layer_id(name, backbone.n_blocks) <= freeze_blocks}


def supervised_term_on(cfg) -> bool:
    """Whether the run has the supervised term (``supervised.loss_weight > 0``): only then is a labelled
    batch loaded and the exported head trained."""
    return cfg.supervised.loss_weight > 0


def head_loss(loss: str) -> str:
    """The loss the exported head learns: the run's classifier loss, HCE for a contrastive one."""
    return loss if loss in CLASSIFIER_LOSSES else "hce"


def build_classifier(embed_dim: int, n_leaves: int) -> nn.Linear:
    """``Linear(embed_dim, n_leaves)``: weights from a truncated normal (std 0.02), zero bias."""
    classifier = nn.Linear(embed_dim, n_leaves)
    nn.init.trunc_normal_(classifier.weight, std=0.02)
    nn.init.zeros_(classifier.bias)
    return classifier


def build_projection_head(supervised_cfg, embed_dim: int) -> nn.Sequential:
    """SupCon's projection: ``Linear → ReLU → Linear`` to ``projection_dim`` (hidden width
    ``projection_hidden_dim``, or ``embed_dim`` when null, as in the published SupCon code)."""
    hidden = supervised_cfg.projection_hidden_dim or embed_dim
    return nn.Sequential(
        nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, supervised_cfg.projection_dim)
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
        self.tree = tree
        self.n_local_crops = cfg.crops.local_crops_number
        self.dino_local_term = dino_local_loss_enabled(cfg)
        # (student crop, teacher crop) pairs of the DINO loss: global-global (not the same crop) + local-global
        self.n_dino_pairs = N_GLOBAL_CROPS * (N_GLOBAL_CROPS - 1)
        if self.dino_local_term:
            self.n_dino_pairs += self.n_local_crops * N_GLOBAL_CROPS
        self.separate_ibot_head = cfg.ibot.separate_head
        self.sinkhorn_knopp = cfg.train.centering == "sinkhorn_knopp"
        self.n_prototypes = cfg.dino.head_n_prototypes
        self.koleo_weight = cfg.dino.koleo_loss_weight
        self.supervised_on = supervised_term_on(cfg)
        self.loss_weights = {
            "dino_global": cfg.dino.loss_weight,
            "dino_local": cfg.dino.loss_weight,
            "ibot": cfg.ibot.loss_weight,
            "koleo": 1.0,  # koleo_loss_weight is applied inside the term
            "supervised": cfg.supervised.loss_weight,
            "supervised_head": 1.0,  # reaches supervised_head alone (its input is detached)
        }

        student_backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg, cfg.student.drop_path_rate))
        teacher_backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg, 0.0))
        self.embed_dim = student_backbone.embed_dim
        self.student = nn.ModuleDict(
            {"backbone": student_backbone, "dino_head": build_dino_head(cfg.dino, self.embed_dim)}
        )
        self.teacher = nn.ModuleDict(
            {"backbone": teacher_backbone, "dino_head": build_dino_head(cfg.dino, self.embed_dim)}
        )
        if self.separate_ibot_head:
            self.student["ibot_head"] = build_dino_head(cfg.ibot, self.embed_dim)
            self.teacher["ibot_head"] = build_dino_head(cfg.ibot, self.embed_dim)
        elif cfg.ibot.head_n_prototypes != cfg.dino.head_n_prototypes:
            raise ConfigError("ibot.head_n_prototypes must equal dino.head_n_prototypes when ibot.separate_head=false")
        self.supervised_head = build_classifier(self.embed_dim, len(tree.leaves))

        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(cfg.ibot.head_n_prototypes)
        self.koleo_loss = KoLeoLoss()
        loss = cfg.supervised.loss
        if loss not in SUPERVISED_LOSSES:
            raise ConfigError(f"unknown supervised.loss {loss!r}; choose one of {', '.join(SUPERVISED_LOSSES)}")
        self.projection_head = self.contrastive_loss = None
        if loss in CLASSIFIER_LOSSES:
            self.student["classifier"] = build_classifier(self.embed_dim, len(tree.leaves))
        else:
            self.projection_head = build_projection_head(cfg.supervised, self.embed_dim)
            self.contrastive_loss = build_contrastive_loss(
                tree, loss, cfg.supervised.temperature, cfg.supervised.level_penalty, cfg.supervised.level_order
            )
        self.supervised_loss = build_supervised_loss(tree, loss=head_loss(loss), alpha=cfg.supervised.alpha)

        if cfg.student.pretrained_weights and load_pretrained:  # not when a checkpoint will overwrite them
            self.load_pretrained_weights(cfg.student.pretrained_weights)
        self.teacher.load_state_dict(
            {k: v for k, v in self.student.state_dict().items() if k.split(".")[0] in self.teacher}
        )
        self.teacher.requires_grad_(False)
        self.frozen_backbone_names = frozen_layer_names(student_backbone, cfg.student.freeze_blocks)
        for name, param in student_backbone.named_parameters():
            param.requires_grad_(name not in self.frozen_backbone_names)

    def load_pretrained_weights(self, source: str) -> None:
        """Backbone from ``source`` (file, URL or preset; read once); DINO/iBOT heads too when it has
        them with matching shapes (a DINOv2/DinoBloom training checkpoint), else they stay random."""
        checkpoint = read_checkpoint(source)
        load_backbone_checkpoint(self.student.backbone, checkpoint, source)
        logger.info("student and teacher backbones initialised from %s", source)
        if isinstance(checkpoint.get("model"), dict):
            checkpoint = checkpoint["model"]
        for head_name in ("dino_head", "ibot_head"):
            if head_name not in self.student:
                continue
            head = self.student[head_name]
            own = head.state_dict()
            for prefix in (f"teacher.{head_name}.", f"{head_name}.", f"student.{head_name}."):
                state = adapt_head_state_dict(strip_prefix(checkpoint, prefix))
                if state and state.keys() == own.keys() and all(state[k].shape == own[k].shape for k in own):
                    head.load_state_dict(state)
                    logger.info("%s initialised from %s (%s*)", head_name, source, prefix)
                    break
            else:
                logger.info("%s: no matching weights in %s, randomly initialised", head_name, source)

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (head warm-up) or release the student backbone, except its permanently frozen
        layers (``student.freeze_blocks``); a frozen parameter gets no gradient, no optimiser step
        and no EMA work."""
        for name, param in self.student.backbone.named_parameters():
            if name not in self.frozen_backbone_names and param.requires_grad != trainable:
                param.requires_grad_(trainable)

    # ------------------------------------------------------------------ teacher
    @torch.no_grad()
    def teacher_targets(self, global_crops, masks, n_masked_patches, teacher_temp, supervised_images=None):
        """Teacher probabilities: DINO ``[n_g, B, K]`` (crops swapped: row a is the target of
        student crop a) and iBOT ``[n_masked, K]`` for the patches where ``masks`` is True
        (the student's masked patches; the teacher sees them unmasked); and the teacher's CLS
        tokens of ``supervised_images`` (None without), from the same backbone call."""
        crops, patches = [global_crops], [masks]
        if supervised_images is not None:
            crops.append(supervised_images)
            patches.append(None)
        outputs = self.teacher.backbone(crops, is_training=True, patches=patches)
        out = outputs[0]
        supervised_cls = outputs[1]["x_norm_clstoken"] if supervised_images is not None else None
        first, second = out["x_norm_clstoken"].chunk(N_GLOBAL_CROPS)
        cls = torch.cat((second, first))
        patches = out["x_norm_patchtokens"]
        if self.separate_ibot_head:
            dino_logits = self.teacher.dino_head(cls)
            ibot_logits = self.teacher.ibot_head(patches)
        else:
            dino_logits, ibot_logits = self.teacher.dino_head(torch.cat((cls, patches))).split(
                [cls.shape[0], patches.shape[0]]
            )
        if self.sinkhorn_knopp:
            dino_probs = self.dino_loss.sinkhorn_knopp_teacher(dino_logits, teacher_temp)
            ibot_probs = self.ibot_patch_loss.sinkhorn_knopp_teacher(ibot_logits, teacher_temp, n_masked_patches)
        else:
            dino_probs = self.dino_loss.softmax_center_teacher(dino_logits, teacher_temp)
            self.dino_loss.update_center(dino_logits)
            ibot_probs = self.ibot_patch_loss.softmax_center_teacher(ibot_logits, teacher_temp)
            self.ibot_patch_loss.update_center(ibot_logits)
        return dino_probs.view(N_GLOBAL_CROPS, -1, dino_probs.shape[-1]), ibot_probs, supervised_cls

    # ------------------------------------------------------------------ student
    def collapsed_dino_values(self) -> dict:
        """The DINO terms' values when student and teacher both output the uniform distribution
        over the prototypes (a collapsed head: its gradient vanishes there): ``ln K`` per pair of
        crops, with the terms' pair weights."""
        log_k = math.log(self.n_prototypes)
        values = {"dino_global": log_k * N_GLOBAL_CROPS * (N_GLOBAL_CROPS - 1) / self.n_dino_pairs}
        if self.dino_local_term:
            values["dino_local"] = log_k * self.n_local_crops * N_GLOBAL_CROPS / self.n_dino_pairs
        return values

    def forward_losses(self, batch: dict, supervised_batch, teacher_temp: float) -> tuple:
        """All loss terms of one step: ``(total, {term: value})``; ``supervised_batch`` is
        ``(images, node labels)`` or None."""
        global_crops, masks = batch["collated_global_crops"], batch["collated_masks"]

        use_supervised = supervised_batch is not None and self.supervised_on
        supervised_images, supervised_labels = supervised_batch if use_supervised else (None, None)

        # 1: teacher targets for the global crops (and its CLS tokens of the labelled batch)
        dino_targets, ibot_targets, teacher_supervised_cls = self.teacher_targets(
            global_crops, masks, batch["n_masked_patches"], teacher_temp, supervised_images
        )

        # 2: one student backbone call over the named crop streams: (crops, iBOT mask, selected patches).
        # The losses read the CLS tokens and the global crops' masked patch tokens: the last block
        # computes those alone (forward_features_selected; exact)
        streams = {"global": (global_crops, masks, masks)}
        if self.dino_local_term:
            streams["local"] = (batch["collated_local_crops"], None, None)
        if use_supervised:
            streams["supervised"] = (supervised_images, None, None)
        crops, crop_masks, patches = (list(column) for column in zip(*streams.values()))
        out = dict(zip(streams, self.student.backbone(crops, masks=crop_masks, is_training=True, patches=patches)))
        global_cls = out["global"]["x_norm_clstoken"]
        masked_patches = out["global"]["x_norm_patchtokens"]

        # 3: student heads, the DINO head once over every row it projects
        head_inputs = {"global_cls": global_cls}
        if self.dino_local_term:
            head_inputs["local_cls"] = out["local"]["x_norm_clstoken"]
        if not self.separate_ibot_head:
            head_inputs["masked_patches"] = masked_patches
        rows = [x.shape[0] for x in head_inputs.values()]
        logits = dict(zip(head_inputs, self.student.dino_head(torch.cat(list(head_inputs.values()))).split(rows)))
        if self.separate_ibot_head:
            logits["masked_patches"] = self.student.ibot_head(masked_patches)

        # 4: loss terms
        terms = {}
        terms["dino_global"] = (
            self.dino_loss([logits["global_cls"]], [dino_targets.flatten(0, 1)]) * N_GLOBAL_CROPS / self.n_dino_pairs
        )
        if self.dino_local_term:
            local_logits = logits["local_cls"].chunk(self.n_local_crops)
            terms["dino_local"] = self.dino_loss(local_logits, list(dino_targets)) / self.n_dino_pairs
        terms["ibot"] = N_GLOBAL_CROPS * self.ibot_patch_loss.forward_masked(
            logits["masked_patches"], ibot_targets, masks, batch["masks_weight"]
        )
        if self.koleo_weight > 0:
            terms["koleo"] = self.koleo_weight * sum(map(self.koleo_loss, global_cls.chunk(N_GLOBAL_CROPS)))
        if use_supervised:
            supervised_cls = out["supervised"]["x_norm_clstoken"]
            if self.contrastive_loss is None:
                classifier_logits = self.student.classifier(supervised_cls)
                terms["supervised"] = self.supervised_loss(classifier_logits.float(), supervised_labels)
            else:
                terms["supervised"] = self.contrastive_loss(self.projection_head(supervised_cls), supervised_labels)
            head_logits = self.supervised_head(teacher_supervised_cls)
            terms["supervised_head"] = self.supervised_loss(head_logits.float(), supervised_labels)

        total = sum(self.loss_weights[name] * value for name, value in terms.items())
        return total, terms

    def supervised_modules(self) -> list:
        """The trained modules outside ``student``: ``supervised_head`` and the projection head, if any."""
        return [m for m in (self.supervised_head, self.projection_head) if m is not None]

    def last_layer_parameters(self) -> list:
        """The student DINO/iBOT heads' last (prototype) layers: frozen for the first iterations."""
        return [param for name, param in self.student.named_parameters() if ".last_layer." in name]

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher <- momentum * teacher + (1 - momentum) * student`` on this rank's shards, for the
        student parameters that train (a frozen one equals its teacher copy, which stays bit-identical)."""
        student, teacher = [], []
        for name in self.teacher.keys():
            for s, t in zip(self.student[name].parameters(), self.teacher[name].parameters()):
                if not s.requires_grad:
                    continue
                student.append(local_tensor(s).detach())
                teacher.append(local_tensor(t))
        torch._foreach_lerp_(teacher, student, 1 - momentum)
