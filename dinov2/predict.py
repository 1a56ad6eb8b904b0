"""Classify images with a dino_hier model file's supervised head, backing off to coarser nodes when unsure.

    python -m dinov2.predict --model model.pth --images cells/ --out preds.csv --threshold 0.8

For every image: the most probable leaf and its probability; the deepest node whose probability
(the sum of the softmax over the leaves under it) is at least ``--threshold`` — e.g.
``neutrophil`` rather than a coin-flip between band and segmented — and the lineage (level-1 node)
of the predicted leaf with its probability. Runs batched, on the GPU when there is one, in the
precision chosen for the hardware (``--precision``). ``--out`` is checked to be writable before
any image is read, and written whole (a temporary file, then a rename).
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dinov2.data.manifest import IMAGE_SUFFIXES, read_manifests
from dinov2.data.transforms import make_eval_transform
from dinov2.errors import CheckpointError, ConfigError, DataError, OutputError
from dinov2.eval.features import add_extraction_arguments, extract_features, extraction_settings
from dinov2.eval.report import write_text_atomically
from dinov2.hierarchy import ROOT
from dinov2.models.model_file import load_model_file
from dinov2.utils.cli import run_cli
from dinov2.utils.io import output_folder


def node_probabilities(leaf_probabilities, tree) -> np.ndarray:
    """``P(node) = Σ_{leaves l under node} P(l)``: ``[N, leaves]`` -> ``[N, nodes]`` in ``tree.nodes`` order."""
    membership = tree.membership().numpy().astype(np.float64)
    return np.asarray(leaf_probabilities, dtype=np.float64) @ membership.T


def back_off(leaf_probabilities, tree, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The deepest node with ``P(node) >= threshold`` per sample: ``(node index, its probability)``.

    Among equally deep qualifying nodes the most probable wins. When no node qualifies (possible
    only with a threshold above the largest lineage probability) the answer is the root: index -1,
    probability 1.
    """
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"--threshold must be in (0, 1], got {threshold}")
    probabilities = node_probabilities(leaf_probabilities, tree)
    depths = tree.node_depths.astype(np.float64)
    # depth dominates (integer steps), probability (< 1 after halving) breaks ties between equally deep nodes
    score = np.where(probabilities >= threshold - 1e-9, depths[None, :] + 0.5 * probabilities, -1.0)
    best = score.argmax(axis=1)
    found = score[np.arange(len(best)), best] >= 0
    nodes = np.where(found, best, -1)
    node_probs = np.where(found, probabilities[np.arange(len(best)), best], 1.0)
    return nodes, node_probs


def list_images(images: str) -> list[str]:
    """Image files of a folder (recursively, sorted; hidden files skipped) or the paths of a manifest CSV."""
    path = Path(images)
    if path.is_dir():
        files = sorted(
            str(p)
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {images}")
        return files
    if path.is_file():
        return read_manifests([path])["path"].astype(str).tolist()
    raise DataError(f"--images {images}: no such folder or manifest file")


def predictions_table(paths: Sequence[str], logits, tree, threshold: float) -> pd.DataFrame:
    """One row per image: leaf, leaf_probability, node, node_probability, lineage, lineage_probability."""
    leaf_probabilities = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
    node_probs = node_probabilities(leaf_probabilities, tree)
    leaves = leaf_probabilities.argmax(axis=1)
    nodes, chosen_probs = back_off(leaf_probabilities, tree, threshold)
    lineages = np.array([tree.index(tree.at_level(tree.leaves[leaf], 1)) for leaf in leaves], dtype=np.int64)
    rows = np.arange(len(leaves))
    return pd.DataFrame(
        {
            "path": list(paths),
            "leaf": [tree.leaves[leaf] for leaf in leaves],
            "leaf_probability": leaf_probabilities[rows, leaves],
            "node": [ROOT if n < 0 else tree.nodes[n] for n in nodes],
            "node_probability": chosen_probs,
            "lineage": [tree.nodes[n] for n in lineages],
            "lineage_probability": node_probs[rows, lineages],
        }
    )


def check_writable(out: Path) -> None:
    """OutputError naming ``--out`` when the CSV cannot be written there (a folder in its place, a folder
    that cannot be made or written): checked before any image is read."""
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give the path of the CSV file to write")
    output_folder(out.parent, option=f"--out {out}: its folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="dino_hier model file with a supervised head (from training)")
    parser.add_argument("--images", required=True, help="folder of images (searched recursively) or a manifest CSV")
    parser.add_argument("--out", required=True, help="CSV file to write, one row per image")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.8,
        help="back off to the deepest node whose probability is at least this (default: 0.8)",
    )
    add_extraction_arguments(parser)
    parser.add_argument("--image-size", type=int, default=None, help="input size in pixels (default: the model's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 < args.threshold <= 1.0:
        raise ConfigError(f"--threshold must be in (0, 1], got {args.threshold}")
    out = Path(args.out)
    check_writable(out)
    extraction = extraction_settings(args)
    model = load_model_file(args.model)
    if model.supervised_head is None or model.tree is None:
        raise CheckpointError(
            f"{args.model} has no supervised head (or no tree); prediction needs a model file "
            "exported from a run with a supervised head"
        )
    paths = list_images(args.images)
    print(f"precision: {extraction['precision']}")
    image_size = args.image_size or model.image_size
    _, logits = extract_features(
        model.backbone,
        paths,
        make_eval_transform(image_size, model.mean, model.std),
        model.supervised_head,
        desc="predict",
        **extraction,
    )
    table = predictions_table(paths, logits, model.tree, args.threshold)
    write_text_atomically(out, table.to_csv(index=False))
    backed_off = int((table["node"] != table["leaf"]).sum())
    print(
        f"wrote {len(table)} predictions to {out} ({backed_off} backed off to a coarser node "
        f"at threshold {args.threshold})"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
