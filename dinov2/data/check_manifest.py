"""Check manifests before training: every image decodes, every label resolves, every split is valid.

Prints a per-node table (images labelled at each node, in its subtree, and the data sets that
label it) and exits with status 1 naming each bad row (missing file, unreadable image, unknown
label, bad split); status 0 when all rows are good.

    python -m dinov2.data.check_manifest pbc.csv matek.csv [--hierarchy v1]
"""

import argparse
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from dinov2.config.custom_hier import DATASETS, get_tree, resolve_label
from dinov2.data.datasets.dataloader_sup import load_image
from dinov2.data.make_manifest import node_table
from dinov2.data.manifest import read_manifest_rows, row_problems
from dinov2.errors import DataError, LabelError
from dinov2.utils.cli import run_cli


def _image_problem(path: str) -> str:
    if not os.path.isfile(path):
        return "missing file"
    try:
        load_image(path)
    except DataError as error:
        return f"unreadable image ({error.__cause__ or error})"
    return ""


def _node(tree, dataset: str, label: str) -> tuple:
    """``(node name or "(ignored)" / "(unlabelled)", "")`` or ``(None, what is wrong)``."""
    if label == "":
        return "(unlabelled)", ""
    if dataset not in DATASETS:
        return None, f"unknown dataset {dataset!r} (not in DATASETS of dinov2/config/custom_hier.py)"
    known = DATASETS[dataset]
    if label not in (tree if known is None else known):
        return None, f"unknown label {label!r} for dataset {dataset!r}"
    try:
        index = resolve_label(tree, dataset, label)
    except LabelError as error:  # the label maps to a node that is not in this tree
        return None, str(error)
    return (tree.nodes[index] if index >= 0 else "(ignored)"), ""


def check_manifests(paths: Sequence[str], tree, workers: int = 0) -> tuple[list[str], Counter, dict]:
    """Bad-row messages, images per node name, and the data sets labelling each node."""
    bad_rows: list[str] = []
    counts: Counter = Counter()
    datasets = defaultdict(set)
    workers = workers or min(32, 2 * (os.cpu_count() or 1))
    for manifest_path in paths:
        frame = read_manifest_rows(manifest_path)
        problems = row_problems(frame)
        node_of = {key: _node(tree, *key) for key in set(zip(frame["dataset"], frame["label"]))}
        with ThreadPoolExecutor(workers) as pool:
            image_problems = list(
                tqdm(
                    pool.map(_image_problem, frame["path"]),
                    total=len(frame),
                    desc=f"decoding {manifest_path}",
                    unit="img",
                )
            )
        for row, (path, dataset, label) in enumerate(zip(frame["path"], frame["dataset"], frame["label"])):
            node, label_problem = node_of[(dataset, label)]
            row_issues = [issue for issue in (problems[row], image_problems[row], label_problem) if issue]
            if row_issues:
                bad_rows.append(f"{manifest_path} row {row + 2} ({path}): {'; '.join(row_issues)}")
            else:
                counts[node] += 1
                datasets[node].add(dataset)
    return bad_rows, counts, datasets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.data.check_manifest",
        description="Decode every image and resolve every label of one or more manifests; list the bad rows.",
    )
    parser.add_argument("manifests", nargs="+", help="manifest CSV file(s) (path,label,dataset,split)")
    parser.add_argument("--hierarchy", default="v1", help="hierarchy the labels must resolve in (default v1)")
    parser.add_argument("--workers", type=int, default=0, help="decoding threads (default: 2 x CPU cores)")
    args = parser.parse_args(argv)

    tree = get_tree(args.hierarchy)
    bad_rows, counts, datasets = check_manifests(args.manifests, tree, args.workers)
    print(node_table(tree, counts, datasets))
    good = sum(counts.values())
    print(f"\n{good} good row(s), {len(bad_rows)} bad row(s)")
    for message in bad_rows:
        print(f"bad row: {message}")
    return 1 if bad_rows else 0


if __name__ == "__main__":
    run_cli(main)
