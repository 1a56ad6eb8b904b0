"""Optimizer parameter groups: layer-wise lr decay, patch-embed lr multiplier, selective weight decay.

For a ViT with ``L`` blocks, a parameter at layer ``l`` (0 = patch embedding and tokens,
``i + 1`` = block ``i``, ``L + 1`` = everything after the backbone: norm, heads) gets
``lr_multiplier = decay ** (L + 1 - l)``, times ``patch_embed_lr_mult`` for the patch embedding.
The exported classifier (``supervised_head.*``, a readout of the teacher that shapes nothing) gets
``head_lr_mult``.
Biases, norms, LayerScale ``gamma`` and tokens (cls, register, mask, position) get no weight
decay. The DINO/iBOT ``last_layer`` parameters are grouped apart so they can be frozen, and the
backbone apart from the heads so that it can follow its own schedule (a head warm-up).
"""

from collections import defaultdict

from torch import nn

TOKEN_NAMES = ("cls_token", "pos_embed", "mask_token", "register_tokens")
READOUT_PREFIX = "supervised_head."


def layer_id(name: str, n_blocks: int) -> int:
    """Depth of a backbone parameter (``name`` relative to the backbone): 0 for the patch embedding and
    tokens, ``i + 1`` for block ``i``, ``n_blocks + 1`` after the blocks."""
    if name.startswith(TOKEN_NAMES) or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        parts = name.split(".")
        # "blocks.<i>.*" or chunked "blocks.<chunk>.<i>.*"
        index = parts[2] if parts[2].isdigit() else parts[1]
        return int(index) + 1
    return n_blocks + 1


def param_group_key(
    name: str,
    backbone_prefix: str,
    n_blocks: int,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
    head_lr_mult: float = 1.0,
):
    """``(lr_multiplier, wd_multiplier, is_last_layer)`` of parameter ``name``."""
    lr_mult = head_lr_mult if name.startswith(READOUT_PREFIX) else 1.0
    if name.startswith(backbone_prefix):
        local = name[len(backbone_prefix) :]
        lr_mult = layerwise_decay ** (n_blocks + 1 - layer_id(local, n_blocks))
        if local.startswith("patch_embed"):
            lr_mult *= patch_embed_lr_mult
    leaf = name.split(".")[-1]
    no_decay = name.endswith(".bias") or "norm" in name or leaf == "gamma" or leaf in TOKEN_NAMES
    return lr_mult, 0.0 if no_decay else 1.0, "last_layer" in name


def build_param_groups(
    model: nn.Module,
    backbone_prefix: str,
    n_blocks: int,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
    head_lr_mult: float = 1.0,
):
    """Trainable parameters of ``model`` grouped by (lr multiplier, wd multiplier, is_last_layer, is_backbone)."""
    groups = defaultdict(list)
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = param_group_key(name, backbone_prefix, n_blocks, layerwise_decay, patch_embed_lr_mult, head_lr_mult)
            groups[(*key, name.startswith(backbone_prefix))].append(param)
    return [
        {
            "params": params,
            "lr_multiplier": lr_mult,
            "wd_multiplier": wd_mult,
            "is_last_layer": last,
            "is_backbone": backbone,
            "lr": 0.0,
            "weight_decay": 0.0,
        }
        for (lr_mult, wd_mult, last, backbone), params in sorted(groups.items())
    ]


def apply_schedules(optimizer, lr: float, wd: float, last_layer_lr: float, backbone_lr: float | None = None) -> None:
    """This step's lr and weight decay per group: ``last_layer_lr`` for the DINO/iBOT prototypes,
    ``backbone_lr`` (default ``lr``) for the backbone, ``lr`` for the rest; times the group's multipliers."""
    backbone_lr = lr if backbone_lr is None else backbone_lr
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else backbone_lr if group["is_backbone"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]
