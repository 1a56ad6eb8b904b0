"""Evaluation throughput: protocols + metrics on synthetic features, and feature extraction vs a plain forward.

1. 5,000 samples x 384-d synthetic features (class means + noise) with the 13 label nodes of the
   PBC (acevedo) data set in hierarchy v1, two of them internal: wall time of stratified 5-fold
   k-NN (k = 1, 20) + logistic regression + every metric.
2. ViT-S/14 at 224 px on the CPU under bf16 autocast: images/s of the full extraction path
   (JPEG decode, resize, DataLoader, forward, float32 copy) next to a plain backbone forward on
   a ready tensor of the same batch size, measured in the same run (bf16 and fp32).

    python scripts/bench_eval.py
    python scripts/bench_eval.py --images /path/to/jpegs --n-images 128 --arch vit_small
"""

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinov2.config.custom_hier import DATASETS, get_tree
from dinov2.data.transforms import make_eval_transform
from dinov2.eval.features import DEFAULT_BATCH_SIZE, default_num_workers, extract_features
from dinov2.eval.metrics import classification_metrics, rare_classes, tree_feature_correlation
from dinov2.eval.protocols import expand_protocols, run_protocols, stratified_folds
from dinov2.models import build_backbone
from dinov2.utils.cli import run_cli


def synthetic_features(tree, n_samples: int, dim: int, scale: float = 0.1, seed: int = 0):
    """Tree-shaped features: class mean = scale x Σ over the label's ancestors-or-self of a random
    direction per node, plus unit Gaussian noise; labels are the PBC label nodes (13, two internal)."""
    rng = np.random.default_rng(seed)
    nodes = sorted({tree.index(node) for node in DATASETS["acevedo"].values()})
    labels = rng.choice(nodes, size=n_samples)
    directions = rng.normal(scale=scale, size=(len(tree.nodes), dim))
    means = {n: sum(directions[tree.index(a)] for a in (tree.nodes[n],) + tree.ancestors(tree.nodes[n])) for n in nodes}
    features = np.stack([means[label] for label in labels]) + rng.normal(size=(n_samples, dim))
    return features.astype(np.float32), labels


def time_protocols(n_samples: int, dim: int, folds: int) -> dict:
    tree = get_tree("v1")
    features, labels = synthetic_features(tree, n_samples, dim)
    protocols = expand_protocols(["knn", "logreg"])
    rare = rare_classes(labels, tree)
    start = time.perf_counter()
    split = stratified_folds(labels, folds)
    predictions = {}
    times = {}
    for protocol in protocols:
        t0 = time.perf_counter()
        predictions[protocol] = run_protocols([protocol], features, labels, split)[protocol]
        times[protocol] = time.perf_counter() - t0
    t0 = time.perf_counter()
    balanced = {}
    for protocol in protocols:
        scores = [
            classification_metrics(labels[test], predicted, tree, rare)["balanced_accuracy"]
            for (_, test), predicted in zip(split, predictions[protocol])
        ]
        balanced[protocol] = round(float(np.mean(scores)), 4)
    spearman = tree_feature_correlation(labels, features, tree)
    times["metrics"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - start
    return {
        "n_samples": n_samples,
        "dim": dim,
        "labels": int(np.unique(labels).size),
        "folds": folds,
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "balanced_accuracy": balanced,
        "tree_feature_spearman": round(spearman, 4),
    }


def write_jpegs(folder: Path, count: int, size=(363, 360), seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"cell_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def plain_forward_rate(model, batch_size: int, image_size: int, n_images: int, bf16: bool) -> float:
    images = torch.randn(batch_size, 3, image_size, image_size)
    steps = max(1, n_images // batch_size)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.forward_features(images)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            model.forward_features(images)["x_norm_clstoken"].float()
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000, help="synthetic samples for the protocols (default: 5000)")
    parser.add_argument("--dim", type=int, default=384, help="synthetic feature dimension (default: 384)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: 5)")
    parser.add_argument(
        "--arch", default="vit_small", help="backbone for the extraction benchmark (default: vit_small)"
    )
    parser.add_argument("--image-size", type=int, default=224, help="input size in pixels (default: 224)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per forward pass (default: {DEFAULT_BATCH_SIZE}, as eval_hier)",
    )
    parser.add_argument("--n-images", type=int, default=128, help="images to extract (default: 128)")
    parser.add_argument(
        "--images", default=None, help="folder of JPEGs to extract (default: generated 363x360 noise JPEGs)"
    )
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: as eval_hier)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of each extraction timing; median (default: 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch compute threads (default 0: leave as is); fewer than the cores leaves one "
        "to the data-loading workers",
    )
    parser.add_argument("--skip-protocols", action="store_true", help="only the extraction benchmark")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if not args.skip_protocols:
        result = time_protocols(args.samples, args.dim, args.folds)
        print(json.dumps({"bench": "protocols", **result}))

    torch.manual_seed(0)
    model = build_backbone(args.arch, img_size=args.image_size).eval()
    num_workers = default_num_workers() if args.num_workers is None else args.num_workers
    transform = make_eval_transform(args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            paths = sorted(str(p) for p in Path(args.images).rglob("*.jpg") if not p.name.startswith("."))
            paths = paths[: args.n_images]
        else:
            paths = write_jpegs(Path(tmp), args.n_images)
        rates = {"extract_bf16": [], "forward_bf16": [], "forward_fp32": []}
        for _ in range(args.repeats):  # interleaved so that load changes on the machine hit all alike
            start = time.perf_counter()
            extract_features(
                model, paths, transform, batch_size=args.batch_size, num_workers=num_workers, desc="extract"
            )
            rates["extract_bf16"].append(len(paths) / (time.perf_counter() - start))
            rates["forward_bf16"].append(plain_forward_rate(model, args.batch_size, args.image_size, len(paths), True))
            rates["forward_fp32"].append(plain_forward_rate(model, args.batch_size, args.image_size, len(paths), False))
    rate = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"{args.arch} at {args.image_size}px, batch {args.batch_size}, {len(paths)} images, "
        f"{torch.get_num_threads()} threads, {num_workers} workers"
    )
    print(f"{'extraction bf16':<18} {'plain fwd bf16':>15} {'plain fwd fp32':>15} {'extract/fwd bf16':>17}")
    print(
        f"{rate['extract_bf16']:>14.1f}/s {rate['forward_bf16']:>13.1f}/s {rate['forward_fp32']:>13.1f}/s "
        f"{rate['extract_bf16'] / rate['forward_bf16']:>17.2f}"
    )
    print(
        json.dumps(
            {
                "bench": "extraction",
                "arch": args.arch,
                "image_size": args.image_size,
                "images_per_s": {k: round(v, 2) for k, v in rate.items()},
                "extract_over_forward_bf16": round(rate["extract_bf16"] / rate["forward_bf16"], 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
