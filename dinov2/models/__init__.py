"""Backbones by name: ``build_backbone("vit_large", img_size=224, ...)`` and its inverse :func:`arch_config`."""

import inspect
from typing import Any

from dinov2.errors import ConfigError
from dinov2.models.vision_transformer import ARCHS, DinoVisionTransformer

_OPTIONS = [
    name for name in inspect.signature(DinoVisionTransformer.__init__).parameters if name not in ("self", "arch")
]


def build_backbone(arch: str, **overrides: Any) -> DinoVisionTransformer:
    """The ViT called ``arch`` (one of ``ARCHS``), with any constructor argument overridden."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown backbone arch {arch!r}; choose one of {sorted(ARCHS)}")
    unknown = sorted(set(overrides) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown backbone option(s) {unknown} for {arch}; known options: {_OPTIONS}")
    return DinoVisionTransformer(arch=arch, **{**ARCHS[arch], **overrides})


def arch_config(model: DinoVisionTransformer) -> dict[str, Any]:
    """JSON-able ``{"arch": name, **every constructor argument}``; ``build_backbone(**cfg)`` rebuilds the layout."""
    return {"arch": model.arch, **model.config}


__all__ = ["ARCHS", "DinoVisionTransformer", "arch_config", "build_backbone"]
