"""Evaluation throughput: protocols + metrics, bootstrap intervals, and feature extraction vs a plain forward.

1. 5,000 samples x 384-d synthetic features (class means + noise) with the 13 label nodes of the
   PBC (acevedo) data set in hierarchy v1, two of them internal: wall time of stratified 5-fold
   k-NN (k = 1, 20) + logistic regression + every metric (floor: 2 s on 2 cores).
2. The pooled predictions of (1) as a 5,000-image test set: 1,000 bootstrap resamples of every
   metric for each of the three protocols (floor: 2 s more).
3. ViT-S/14 at 224 px on the CPU in the precision ``--precision`` chooses (auto: from the
   hardware): images/s of eval_hier's extraction path (JPEG decode, resize, DataLoader, forward,
   float32 copy) next to a plain backbone forward on a ready tensor of the same batch size in fp32
   and (where auto picks bf16, or with --precision bf16) in bf16, interleaved in one run; rates in
   wall time and in CPU time of the process (steadier on a shared machine). Floors: extraction
   >= 0.9x the plain fp32 forward on a CPU without fast bf16 (where auto picks fp32; emulate one
   with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) and >= 0.9x the plain bf16 forward on a
   fast-bf16 CPU.

    python scripts/bench_eval.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/bench_eval.py --skip-protocols
    python scripts/bench_eval.py --images /path/to/jpegs --n-images 128 --arch vit_small --precision bf16
"""

import argparse
import contextlib
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
from dinov2.eval.bootstrap import bootstrap_intervals
from dinov2.eval.features import DEFAULT_BATCH_SIZE, default_num_workers, extract_features
from dinov2.eval.metrics import classification_metrics, metric_functions, rare_classes, tree_feature_correlation
from dinov2.eval.protocols import expand_protocols, run_protocols, stratified_folds
from dinov2.models import build_backbone
from dinov2.utils.cli import run_cli
from dinov2.utils.precision import SETTINGS, choose_precision


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


class Stopwatch:
    """Wall and CPU seconds (this process, all threads) of named steps; CPU time is less sensitive to other
    processes on a shared machine."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[name] = round(time.perf_counter() - wall, 3)
        self.cpu[name] = round(time.process_time() - cpu, 3)

    def record(self) -> dict:
        return {
            "seconds": {**self.wall, "total": round(sum(self.wall.values()), 3)},
            "cpu_seconds": {**self.cpu, "total": round(sum(self.cpu.values()), 3)},
        }


def time_protocols(n_samples: int, dim: int, folds: int):
    """5-fold k-NN (k = 1 and 20 from one neighbour search, as eval_hier) + logistic regression + every metric."""
    tree = get_tree("v1")
    features, labels = synthetic_features(tree, n_samples, dim)
    rare = rare_classes(labels, tree)
    clock = Stopwatch()
    with clock.step("folds"):
        split = stratified_folds(labels, folds)
    with clock.step("knn"):
        predictions = run_protocols(expand_protocols(["knn"]), features, labels, split)
    with clock.step("logreg"):
        predictions |= run_protocols(["logreg"], features, labels, split)
    with clock.step("metrics"):
        balanced = {}
        for protocol, fold_predictions in predictions.items():
            scores = [
                classification_metrics(labels[test], predicted, tree, rare)["balanced_accuracy"]
                for (_, test), predicted in zip(split, fold_predictions)
            ]
            balanced[protocol] = round(float(np.mean(scores)), 4)
        spearman = tree_feature_correlation(labels, features, tree)
    pooled_true = np.concatenate([labels[test] for _, test in split])
    pooled = {p: np.concatenate(fold_predictions) for p, fold_predictions in predictions.items()}
    record = {
        "n_samples": n_samples,
        "dim": dim,
        "labels": int(np.unique(labels).size),
        "folds": folds,
        **clock.record(),
        "balanced_accuracy": balanced,
        "tree_feature_spearman": round(spearman, 4),
    }
    return pooled_true, pooled, rare, record


def time_bootstrap(y_true, predictions: dict, rare, resamples: int) -> dict:
    """Bootstrap intervals of every metric for each protocol's predictions of one test set."""
    tree = get_tree("v1")
    functions = metric_functions(tree, rare)
    clock = Stopwatch()
    with clock.step("bootstrap"):
        intervals = {
            p: bootstrap_intervals(y_true, y_pred, functions, tree, n=resamples) for p, y_pred in predictions.items()
        }
    balanced = {p: [round(intervals[p]["balanced_accuracy"][k], 4) for k in ("low", "high")] for p in intervals}
    return {
        "test_images": int(len(y_true)),
        "resamples": resamples,
        "metrics": len(functions),
        "protocols": len(predictions),
        "seconds": clock.wall["bootstrap"],
        "cpu_seconds": clock.cpu["bootstrap"],
        "balanced_accuracy_interval": balanced,
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


def timed(work, n_images: int) -> tuple[float, float]:
    """``(images per wall second, images per CPU second of this process)`` of ``work()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return n_images / (time.perf_counter() - wall), n_images / max(time.process_time() - cpu, 1e-9)


def plain_forward(model, batch_size: int, image_size: int, n_images: int, bf16: bool) -> tuple[float, float]:
    """:func:`timed` ``forward_features`` on a ready random batch, under bf16 autocast or in fp32 (after a
    warm-up batch)."""
    images = torch.randn(batch_size, 3, image_size, image_size)
    steps = max(1, n_images // batch_size)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.forward_features(images)  # warm-up

        def work():
            for _ in range(steps):
                model.forward_features(images)["x_norm_clstoken"].float()

        return timed(work, steps * batch_size)


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
    parser.add_argument(
        "--resamples", type=int, default=1000, help="bootstrap resamples of the pooled test set (default: 1000)"
    )
    parser.add_argument(
        "--precision",
        choices=SETTINGS,
        default="auto",
        help="precision of the extraction, as eval_hier's --precision (default auto: from the hardware)",
    )
    parser.add_argument("--skip-protocols", action="store_true", help="only the extraction benchmark")
    parser.add_argument("--skip-extraction", action="store_true", help="only the protocol and bootstrap benchmarks")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if not args.skip_protocols:
        y_true, predictions, rare, result = time_protocols(args.samples, args.dim, args.folds)
        print(json.dumps({"bench": "protocols", **result}))
        print(json.dumps({"bench": "bootstrap", **time_bootstrap(y_true, predictions, rare, args.resamples)}))
    if not args.skip_extraction:
        time_extraction(args)
    return 0


def time_extraction(args: argparse.Namespace) -> None:
    precision = choose_precision(args.precision, torch.device("cpu"))
    # the plain bf16 forward only where bf16 is in play: where auto keeps fp32 it may run 70x slower
    bf16_slow = precision.name != "bf16" and choose_precision("auto", torch.device("cpu")).name != "bf16"

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

        def extract(images) -> tuple[float, float]:
            return timed(
                lambda: extract_features(
                    model,
                    images,
                    transform,
                    batch_size=args.batch_size,
                    num_workers=num_workers,
                    precision=precision,
                    desc="extract",
                ),
                len(images),
            )

        measure = {
            "extract": lambda: extract(paths),
            "forward_fp32": lambda: plain_forward(model, args.batch_size, args.image_size, len(paths), False),
        }
        if not bf16_slow:
            measure["forward_bf16"] = lambda: plain_forward(model, args.batch_size, args.image_size, len(paths), True)
        extract(paths[: args.batch_size])  # warm-up, as the plain forwards have theirs
        runs = {name: [] for name in measure}
        names = list(measure)
        for repeat in range(args.repeats):  # interleaved, in rotated order: load changes hit every kind alike
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                runs[name].append(measure[name]())
    rate = {name: statistics.median(wall for wall, _ in values) for name, values in runs.items()}
    cpu_rate = {name: statistics.median(cpu for _, cpu in values) for name, values in runs.items()}
    ratios, cpu_ratios = {}, {}
    for kind in ("fp32", "bf16"):
        if f"forward_{kind}" in rate:
            ratios[f"extract_over_forward_{kind}"] = rate["extract"] / rate[f"forward_{kind}"]
            cpu_ratios[f"extract_over_forward_{kind}"] = cpu_rate["extract"] / cpu_rate[f"forward_{kind}"]
    print(
        f"{args.arch} at {args.image_size}px, batch {args.batch_size}, {len(paths)} images, "
        f"{torch.get_num_threads()} threads, {num_workers} workers; extraction in {precision}"
    )
    bf16_cell = f"{rate['forward_bf16']:>13.1f}/s" if "forward_bf16" in rate else f"{'(bf16 slow)':>15}"
    print(f"{'extraction':<14} {'plain fwd fp32':>15} {'plain fwd bf16':>15}   ratios")
    print(
        f"{rate['extract']:>12.1f}/s {rate['forward_fp32']:>13.1f}/s {bf16_cell}   "
        + ", ".join(f"{name} {value:.2f}" for name, value in ratios.items())
    )
    print("the same ratios in CPU time: " + ", ".join(f"{name} {value:.2f}" for name, value in cpu_ratios.items()))
    print(
        json.dumps(
            {
                "bench": "extraction",
                "arch": args.arch,
                "image_size": args.image_size,
                "precision": precision.name,
                "precision_reason": precision.reason,
                "images_per_s": {k: round(v, 2) for k, v in rate.items()},
                **{name: round(value, 3) for name, value in ratios.items()},
                "images_per_cpu_s": {k: round(v, 2) for k, v in cpu_rate.items()},
                "cpu_time_ratios": {name: round(value, 3) for name, value in cpu_ratios.items()},
            }
        )
    )


if __name__ == "__main__":
    run_cli(main)
