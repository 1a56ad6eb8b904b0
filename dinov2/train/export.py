"""Export the teacher backbone and the supervised head of a run as one model file.

``python -m dinov2.train.export OUT`` reads the newest ``OUT/checkpoint_*.pth`` (or the file
given with ``--checkpoint``) and writes ``OUT/model.pth`` (see
:func:`dinov2.models.model_file.save_model_file`): teacher backbone, supervised head, the tree,
the architecture, the image size and the normalisation.
"""

import argparse
from pathlib import Path

from torch import nn

from dinov2.config.custom_hier import get_tree
from dinov2.data.transforms import NORMALIZATION_MEAN, NORMALIZATION_STD
from dinov2.errors import CheckpointError
from dinov2.models import build_backbone
from dinov2.models.model_file import save_model_file
from dinov2.models.weights import strip_prefix
from dinov2.train.checkpointing import list_checkpoints, read_checkpoint_file
from dinov2.train.ssl_meta_arch import backbone_kwargs
from dinov2.utils.cli import run_cli
from dinov2.utils.config import config_from_dict


def export_model(model_state: dict, cfg, path: Path) -> Path:
    """Write the model file for a full training state dict (``teacher.backbone.*``, ``supervised_head.*``)."""
    backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg, 0.0))
    backbone.load_state_dict(strip_prefix(model_state, "teacher.backbone."))
    tree = get_tree(cfg.supervised.hierarchy)
    head_state = strip_prefix(model_state, "supervised_head.")
    supervised_head = nn.Linear(backbone.embed_dim, len(tree.leaves))
    supervised_head.load_state_dict(head_state)
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
    return Path(path)


def export_checkpoint(checkpoint: Path, path: Path) -> Path:
    state = read_checkpoint_file(checkpoint)
    return export_model(state["model"], config_from_dict(state["config"]), path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinov2.train.export", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="training output folder holding checkpoint_*.pth")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint to export (default: the newest in OUTPUT_DIR)"
    )
    parser.add_argument("--out", type=Path, default=None, help="model file to write (default: OUTPUT_DIR/model.pth)")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint
    if checkpoint is None:
        found = list_checkpoints(args.output_dir)
        if not found:
            raise CheckpointError(f"no checkpoint_*.pth in {args.output_dir}; train first or pass --checkpoint")
        checkpoint = found[-1]
    out = export_checkpoint(checkpoint, args.out or args.output_dir / "model.pth")
    print(f"exported {checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
