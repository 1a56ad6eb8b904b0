"""Build a manifest from a data set's own folder layout.

Folder-per-class data sets (Matek, Raabin, ...): ``ROOT/<raw label>/**/<image>``. A data set whose
``DATASETS`` entry is ``FilePrefixLabels`` (``acevedo``, PBC: a folder per coarse class) takes the
raw label from the file name prefix before the first underscore (``neutrophil/BNE_123.jpg`` ->
``BNE``). Hidden files (``.DS_Store``, ``._x.jpg``) and files that are not images are skipped. Every
raw label must be listed in ``DATASETS[NAME]`` of ``dinov2/config/custom_hier.py``; splits are
stratified by raw label and reproducible.

    python -m dinov2.data.make_manifest --dataset acevedo --root PBC_dataset_normal_DIB --out pbc.csv
"""

import argparse
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from dinov2.config.custom_hier import get_tree, raw_label_source, resolve_labels
from dinov2.data.manifest import IMAGE_SUFFIXES, stratified_splits, write_manifest
from dinov2.errors import DataError
from dinov2.utils.cli import run_cli


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def scan_dataset(dataset: str, root) -> tuple[pd.DataFrame, int]:
    """Rows ``path,label,dataset`` for the images under ``root``, and the number of files skipped."""
    root = Path(root)
    from_prefix = raw_label_source(dataset) == "file_prefix"
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a folder")
    rows, skipped = [], 0
    for class_folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(p for p in class_folder.rglob("*") if not p.is_dir()):
            if not _is_image(path) or any(part.startswith(".") for part in path.relative_to(root).parts):
                skipped += 1
                continue
            label = path.stem.split("_")[0] if from_prefix else class_folder.name
            rows.append({"path": str(path.resolve()), "label": label, "dataset": dataset})
    if not rows:
        raise DataError(f"no images under {root} (expected one folder per class holding image files)")
    return pd.DataFrame(rows), skipped


def node_table(tree, counts: Counter, datasets: dict | None = None) -> str:
    """Depth-indented table (pre-order) of the labelled nodes and their ancestors: images labelled at
    the node, images in its subtree, and optionally the data sets labelling it."""
    shown = {name for name in counts if name in tree}
    shown |= {ancestor for name in list(shown) for ancestor in tree.ancestors(name)}
    subtree = Counter()
    for name, count in counts.items():
        if name in tree:
            for node in (name,) + tree.ancestors(name):
                subtree[node] += count
    header = f"{'tree node':44s} {'at node':>8s} {'subtree':>8s}" + ("  datasets" if datasets is not None else "")
    lines = [header]
    for name in [node for node in tree.preorder() if node in shown] + ["(ignored)", "(unlabelled)"]:
        if name in tree:
            row = f"{'  ' * (tree.depth(name) - 1) + name:44s} {counts.get(name, 0):8d} {subtree[name]:8d}"
        elif counts.get(name, 0):
            row = f"{name:44s} {counts[name]:8d} {'':8s}"
        else:
            continue
        if datasets is not None:
            row += "  " + ", ".join(sorted(datasets.get(name, ())))
        lines.append(row)
    return "\n".join(lines)


def print_counts(manifest: pd.DataFrame, tree, node_indices) -> None:
    """Counts per raw label (with its node) and per tree node."""
    nodes = [tree.nodes[index] if index >= 0 else "(ignored)" for index in node_indices]
    node_of = dict(zip(manifest["label"], nodes))
    print(f"{'raw label':24s} {'images':>7s}  node")
    for label, count in sorted(Counter(manifest["label"]).items()):
        print(f"{label:24s} {count:7d}  {node_of[label]}")
    print()
    print(node_table(tree, Counter(nodes)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.data.make_manifest",
        description="Build a manifest CSV (path,label,dataset,split) from a data set's folder layout.",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="data set name, a key of DATASETS in dinov2/config/custom_hier.py (e.g. acevedo, matek_2019)",
    )
    parser.add_argument("--root", required=True, help="the data set's folder: one subfolder per (coarse) class")
    parser.add_argument(
        "--out", required=True, help="manifest CSV to write; image paths below its folder are stored relative"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="fraction of each raw label for validation (default 0.1)"
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.1, help="fraction of each raw label for test (default 0.1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--hierarchy", default="v1", help="hierarchy the labels must resolve in (default v1)")
    args = parser.parse_args(argv)

    tree = get_tree(args.hierarchy)
    manifest, skipped = scan_dataset(args.dataset, args.root)
    source = {
        "folder": "the class folder names (write its DATASETS entry as FilePrefixLabels({...}) if the "
        "labels are file-name prefixes such as BNE in BNE_123.jpg)",
        "file_prefix": "the file-name prefixes before the first underscore (its DATASETS entry is "
        "FilePrefixLabels; make it a plain dict if the labels are the class folder names)",
    }[raw_label_source(args.dataset)]
    hint = f". The raw labels under {args.root} were read from {source}"
    node_indices = resolve_labels(tree, args.dataset, manifest["label"].tolist(), hint)
    manifest["split"] = stratified_splits(manifest["label"].tolist(), args.val_fraction, args.test_fraction, args.seed)
    path = write_manifest(manifest, args.out)
    print_counts(manifest, tree, node_indices)
    splits = Counter(manifest["split"])
    print(
        f"\nwrote {path}: {len(manifest)} images (train {splits['train']}, val {splits['val']}, "
        f"test {splits['test']}); skipped {skipped} hidden or non-image file(s)"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
