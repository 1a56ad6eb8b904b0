"""Backbone-only exports in the official DINOv2 key layout, and the timm call that loads them.

The file holds the backbone's flat state dict exactly as DINOv2 names it (``cls_token``,
``pos_embed``, ``register_tokens``, ``mask_token``, ``patch_embed.proj.*``, ``blocks.<i>.*``,
``norm.*``) and nothing else, so that

* timm converts it on load (its ``checkpoint_filter_fn`` recognises DINOv2 by ``mask_token``)::

      timm.create_model("vit_large_patch14_dinov2", pretrained=True,
                        pretrained_cfg_overlay={"file": "backbone.safetensors"}, img_size=224)

* DINOv2 / DinoBloom-style loaders (``model.load_state_dict(torch.load(path))`` on a DINOv2 ViT
  built with the training ``img_size``) read it as it is.

``pos_embed`` covers the training grid (224 px / 14 = 16 x 16 patches + cls = 257 tokens, as in
DinoBloom's files), so timm at that ``img_size`` uses it unresampled and its features equal this
project's. Formats: ``.pth`` (``torch.save`` of the tensor dict) or ``.safetensors`` (tensors only
by construction, plus the arch as string metadata).
"""

import json
from pathlib import Path
from typing import Any

import torch

from dinov2.errors import ConfigError
from dinov2.layers.swiglu_ffn import swiglu_hidden_features
from dinov2.models import arch_config
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.utils.io import atomic_write

try:  # optional: pip install safetensors (the `test` extra has it)
    from safetensors.torch import save_file as save_safetensors
except ImportError:
    save_safetensors = None

BACKBONE_FORMATS = ("pth", "safetensors")
# timm's DINOv2 ViTs (vit_<size>_patch14[_reg4]_dinov2): what their constructors set
_TIMM_SIZES = {"vit_small": "small", "vit_base": "base", "vit_large": "large"}
_TIMM_COMMON = dict(patch_size=14, in_chans=3, init_values=1e-5, qkv_bias=True, proj_bias=True)
_TIMM_DEFAULTS = {
    "small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "giant": dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2),
}


def backbone_format(path: Path, fmt: str | None = None) -> str:
    """``fmt`` if given (checked against the suffix), else the suffix's: ``pth`` or ``safetensors``."""
    suffix = Path(path).suffix.lstrip(".")
    fmt = fmt or (suffix if suffix in BACKBONE_FORMATS else "pth")
    if fmt not in BACKBONE_FORMATS:
        raise ConfigError(f"backbone format must be one of {BACKBONE_FORMATS}, got {fmt!r}")
    if suffix in BACKBONE_FORMATS and suffix != fmt:
        raise ConfigError(f"{path}: the suffix .{suffix} contradicts the format {fmt}")
    if fmt == "safetensors" and save_safetensors is None:
        raise ConfigError("the safetensors format needs the safetensors package: pip install safetensors")
    return fmt


def save_backbone_file(path: str | Path, backbone: DinoVisionTransformer, fmt: str | None = None) -> Path:
    """Write ``backbone``'s DINOv2-layout state dict (CPU, contiguous) as ``.pth`` or ``.safetensors``."""
    path = Path(path)
    fmt = backbone_format(path, fmt)
    state = {key: value.detach().to("cpu").contiguous().clone() for key, value in backbone.state_dict().items()}
    with atomic_write(path) as out:
        if fmt == "safetensors":  # save_file takes a file name
            metadata = {"format": "dinov2.backbone", "arch": json.dumps(arch_config(backbone), sort_keys=True)}
            save_safetensors(state, out.path, metadata=metadata)
        else:
            torch.save(state, out)
    return path


def timm_model_args(arch: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(timm model name, keyword arguments)`` that build the timm ViT with ``arch``'s layout
    (``arch`` as :func:`dinov2.models.arch_config` writes it). The name is timm's DINOv2 model of
    the same size where there is one (else the small one, or the giant one for a fused SwiGLU FFN);
    the keyword arguments hold what differs from that model's defaults, plus ``img_size``."""
    if arch["proj_bias"] != arch["ffn_bias"]:
        raise ConfigError(
            "timm's ViT has one bias switch for the attention projection and the MLP; this backbone has "
            f"proj_bias={arch['proj_bias']} and ffn_bias={arch['ffn_bias']}"
        )
    swiglu = arch["ffn_layer"] != "mlp"
    size = "giant" if swiglu else _TIMM_SIZES.get(arch["arch"], "small")
    registers = arch["num_register_tokens"]
    name = f"vit_{size}_patch14{'_reg4' if registers else ''}_dinov2"
    defaults = {**_TIMM_COMMON, **_TIMM_DEFAULTS[size]}
    # timm's fused SwiGLU (SwiGLUPacked) is int(embed_dim * mlp_ratio) wide: twice DINOv2's hidden width
    width = 2 * swiglu_hidden_features(int(arch["embed_dim"] * arch["mlp_ratio"])) if swiglu else None
    wanted = {
        "embed_dim": arch["embed_dim"],
        "depth": arch["depth"],
        "num_heads": arch["num_heads"],
        "patch_size": arch["patch_size"],
        "in_chans": arch["in_chans"],
        "init_values": arch["init_values"] or 0.0,  # timm drops None arguments; 0 means no LayerScale too
        "qkv_bias": arch["qkv_bias"],
        "proj_bias": arch["proj_bias"],
    }
    kwargs = {key: value for key, value in wanted.items() if value != defaults[key]}
    if registers not in (0, 4):  # the _reg4 models set reg_tokens=4 and no_embed_class=True
        kwargs["reg_tokens"] = registers
    if swiglu:
        if int(arch["embed_dim"] * defaults["mlp_ratio"]) != width:
            kwargs["mlp_ratio"] = (width + 0.5) / arch["embed_dim"]
    elif arch["mlp_ratio"] != defaults["mlp_ratio"]:
        kwargs["mlp_ratio"] = arch["mlp_ratio"]
    kwargs["img_size"] = arch["img_size"]
    return name, kwargs


def timm_snippet(path: str | Path, arch: dict[str, Any]) -> str:
    """The Python lines that load the backbone file ``path`` with timm (for READMEs and model cards)."""
    name, kwargs = timm_model_args(arch)
    layout = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
    return (
        "import timm\n"
        "model = timm.create_model(\n"
        f'    "{name}", pretrained=True, pretrained_cfg_overlay={{"file": "{path}"}},\n'
        f"    {layout})"
    )
