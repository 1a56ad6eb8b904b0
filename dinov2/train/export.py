"""Export the teacher backbone (and the supervised head) of a run.

``python -m dinov2.train.export OUT`` reads the newest readable ``OUT/checkpoint_*.pth`` (or the
file given with ``--checkpoint``) and writes ``OUT/model.pth`` (see
:func:`dinov2.models.model_file.save_model_file`): teacher backbone, supervised head, the tree,
the architecture, the image size and the normalisation. ``--backbone-only`` writes the teacher
backbone alone in the official DINOv2 key layout instead (``OUT/backbone.pth`` or, with
``--format safetensors``, ``OUT/backbone.safetensors``), which timm, DINOv2 and DinoBloom loaders
read (see :mod:`dinov2.models.backbone_file`). Every export writes ``MODEL_CARD.md`` beside it
(:mod:`dinov2.train.model_card`).
"""

import argparse
from pathlib import Path

from torch import nn

from dinov2.config.custom_hier import get_tree
from dinov2.data.transforms import NORMALIZATION_MEAN, NORMALIZATION_STD
from dinov2.errors import CheckpointError
from dinov2.models import build_backbone
from dinov2.models.backbone_file import BACKBONE_FORMATS, backbone_format, save_backbone_file
from dinov2.models.model_file import save_model_file
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import strip_prefix
from dinov2.train.checkpointing import list_checkpoints, read_checkpoint_file, skip_damaged
from dinov2.train.model_card import (
    BACKBONE_FILE,
    MODEL_FILE,
    TrainingProgress,
    latest_evaluation,
    write_model_card,
)
from dinov2.train.ssl_meta_arch import backbone_kwargs, supervised_term_on
from dinov2.utils.cli import run_cli
from dinov2.utils.config import config_from_dict

EXPORTS_DIR = "eval"  # periodic exports of a run: OUT/eval/step_<step>/ (dinov2.train.periodic_export)


def teacher_backbone(model_state: dict, cfg) -> DinoVisionTransformer:
    """The teacher backbone of a training state dict (``teacher.backbone.*``), at the training image size."""
    backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg, 0.0))
    backbone.load_state_dict(strip_prefix(model_state, "teacher.backbone."))
    return backbone.eval()


def export_model(model_state: dict, cfg, path: Path, progress: TrainingProgress, evaluation=None) -> Path:
    """Write the model file for a training state dict (``teacher.backbone.*``, ``supervised_head.*``; the
    head only when the run trained it: ``supervised.loss_weight > 0``) and its model card (with the
    summary of the ``evaluation`` metrics.json, if given)."""
    path = Path(path)
    backbone = teacher_backbone(model_state, cfg)
    tree = get_tree(cfg.supervised.hierarchy)
    supervised_head = None  # without the supervised term nothing trained it
    if supervised_term_on(cfg):
        supervised_head = nn.Linear(backbone.embed_dim, len(tree.leaves))
        supervised_head.load_state_dict(strip_prefix(model_state, "supervised_head."))
    save_model_file(
        path,
        backbone=backbone,
        supervised_head=supervised_head,
        tree=tree,
        hierarchy=cfg.supervised.hierarchy,
        image_size=cfg.supervised.image_size or cfg.crops.global_crops_size,
        mean=list(NORMALIZATION_MEAN),
        std=list(NORMALIZATION_STD),
    )
    write_model_card(path.parent, cfg, progress, backbone, {path.name: MODEL_FILE}, evaluation)
    return path


def export_checkpoint(checkpoint: Path, path: Path, backbone_only: bool = False, fmt: str | None = None) -> Path:
    """Export a training checkpoint: the model file, or with ``backbone_only`` the teacher backbone alone
    in the DINOv2 key layout (``pth`` or ``safetensors``); either with its model card, which carries the
    newest evaluation of the run's periodic exports if there is one."""
    state = read_checkpoint_file(checkpoint)
    cfg = config_from_dict(state["config"])
    progress = TrainingProgress.of_checkpoint(state)
    evaluation = latest_evaluation(Path(checkpoint).parent / EXPORTS_DIR)
    if not backbone_only:
        return export_model(state["model"], cfg, path, progress, evaluation)
    backbone = teacher_backbone(state["model"], cfg)
    path = save_backbone_file(path, backbone, fmt)
    write_model_card(path.parent, cfg, progress, backbone, {path.name: BACKBONE_FILE}, evaluation)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinov2.train.export", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="training output folder holding checkpoint_*.pth")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint to export (default: the newest in OUTPUT_DIR)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="file to write (default: OUTPUT_DIR/model.pth; with --backbone-only OUTPUT_DIR/backbone.<format>)",
    )
    parser.add_argument(
        "--backbone-only",
        action="store_true",
        help="write the teacher backbone alone with the official DINOv2 keys, loadable by timm "
        "(vit_*_patch14_dinov2 with pretrained_cfg_overlay={'file': ...}), DINOv2 and DinoBloom code",
    )
    parser.add_argument(
        "--format",
        choices=BACKBONE_FORMATS,
        default=None,
        help="file format of --backbone-only: pth (torch.save) or safetensors (default: from the --out "
        "suffix, else pth)",
    )
    args = parser.parse_args(argv)
    if args.format and not args.backbone_only:
        parser.error("--format applies to --backbone-only exports (the model file is always .pth)")
    checkpoint = args.checkpoint
    if checkpoint is None:
        found = list_checkpoints(args.output_dir)
        if not found:
            raise CheckpointError(f"no checkpoint_*.pth in {args.output_dir}; train first or pass --checkpoint")
        checkpoint = skip_damaged(found)[-1]  # a damaged newer one is skipped, with a warning
    if args.backbone_only:
        fmt = backbone_format(args.out or Path("backbone"), args.format)
        out = export_checkpoint(checkpoint, args.out or args.output_dir / f"backbone.{fmt}", True, fmt)
    else:
        out = export_checkpoint(checkpoint, args.out or args.output_dir / "model.pth")
    print(f"exported {checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
