"""The exported model file: backbone + supervised head + tree + preprocessing, in one ``torch.save`` dict.

On disk (plain tensors, strings, numbers, lists and dicts only, so ``torch.load(weights_only=True)``
reads it)::

    {"format": "dino_hier.model", "version": 1, "arch": {"arch": "vit_large", ...},
     "backbone": {flat DINOv2 keys}, "supervised_head": {"weight", "bias"} (absent without a head),
     "tree": nested mapping (absent without a tree), "hierarchy": "v1", "image_size": 224,
     "mean": [...], "std": [...]}

The supervised head is ``nn.Linear(embed_dim, len(tree.leaves))``: row ``i`` scores ``tree.leaves[i]``.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinov2.errors import CheckpointError, UserError
from dinov2.hierarchy import Tree
from dinov2.models import arch_config, build_backbone
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import MODEL_FILE_FORMAT, load_backbone_state, read_checkpoint
from dinov2.utils.io import atomic_write

MODEL_FILE_VERSION = 1


@dataclass
class ModelFile:
    """A loaded model file; ``backbone`` and ``supervised_head`` are on the CPU in eval mode."""

    backbone: DinoVisionTransformer
    supervised_head: nn.Linear | None
    tree: Tree | None
    hierarchy: str | None
    arch: dict[str, Any]
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu").clone() for key, value in module.state_dict().items()}


def _check_head(weight_shape: Sequence[int], embed_dim: int, tree: Tree | None, where: str) -> None:
    rows, cols = weight_shape
    if cols != embed_dim:
        raise CheckpointError(f"{where}: supervised_head takes {cols} features but the backbone gives {embed_dim}")
    if tree is not None and rows != len(tree.leaves):
        raise CheckpointError(
            f"{where}: supervised_head has {rows} outputs but the tree has {len(tree.leaves)} leaves "
            f"({', '.join(tree.leaves[:8])}{', ...' if len(tree.leaves) > 8 else ''})"
        )


def save_model_file(
    path: str | Path,
    backbone: DinoVisionTransformer,
    supervised_head: nn.Linear | None,
    tree: Tree | None,
    hierarchy: str | None,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Path:
    """Write the model file atomically (:func:`dinov2.utils.io.atomic_write`)."""
    path = Path(path)
    content: dict[str, Any] = {
        "format": MODEL_FILE_FORMAT,
        "version": MODEL_FILE_VERSION,
        "arch": arch_config(backbone),
        "backbone": _cpu_state(backbone),
        "hierarchy": hierarchy,
        "image_size": int(image_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }
    if supervised_head is not None:
        _check_head(tuple(supervised_head.weight.shape), backbone.embed_dim, tree, f"model file {path}")
        content["supervised_head"] = _cpu_state(supervised_head)
    if tree is not None:
        content["tree"] = tree.to_nested()
    with atomic_write(path) as out:
        torch.save(content, out)
    return path


def load_model_file(source: str | Path, cache_dir: str | Path | None = None) -> ModelFile:
    """Rebuild backbone, supervised head and tree from a model file (a path or URL)."""
    content = read_checkpoint(source, cache_dir)
    where = f"model file {source}"
    if content.get("format") != MODEL_FILE_FORMAT:
        raise CheckpointError(
            f"{source} is not a dino_hier model file (format {content.get('format')!r}); "
            "export one with the trainer, or load backbone-only weights with load_pretrained"
        )
    if content.get("version") != MODEL_FILE_VERSION:
        raise CheckpointError(f"{where} has version {content.get('version')!r}; this code reads {MODEL_FILE_VERSION}")
    missing = [key for key in ("arch", "backbone", "image_size", "mean", "std") if key not in content]
    if missing:
        raise CheckpointError(f"{where} lacks {missing}")

    arch = dict(content["arch"])
    try:
        backbone = build_backbone(**arch)
    except (UserError, TypeError) as error:
        raise CheckpointError(f"{where} has an unusable arch {arch}: {error}") from error
    load_backbone_state(backbone, content["backbone"], where)

    tree = Tree.from_nested(content["tree"]) if content.get("tree") is not None else None
    supervised_head = None
    if content.get("supervised_head") is not None:
        head_state = content["supervised_head"]
        if set(head_state) != {"weight", "bias"} or head_state["weight"].ndim != 2:
            raise CheckpointError(
                f"{where}: supervised_head must hold a 2-d weight and a bias, got {sorted(head_state)}"
            )
        _check_head(tuple(head_state["weight"].shape), backbone.embed_dim, tree, where)
        supervised_head = nn.Linear(*reversed(head_state["weight"].shape))
        supervised_head.load_state_dict(head_state)
        supervised_head.eval()

    return ModelFile(
        backbone=backbone.eval(),
        supervised_head=supervised_head,
        tree=tree,
        hierarchy=content.get("hierarchy"),
        arch=arch,
        image_size=int(content["image_size"]),
        mean=list(content["mean"]),
        std=list(content["std"]),
    )
