"""Evaluate a backbone on labelled WBC data sets with flat and hierarchical metrics and confidence intervals.

    python -m dinov2.eval.eval_hier --model model.pth --data manifest.csv --output-dir eval_out
    python -m dinov2.eval.eval_hier --model model.pth --train-data pbc.csv \\
        --data raabin.csv lisc.csv --output-dir eval_ood
    python -m dinov2.eval.eval_hier --model DinoBloom-S.pth --arch dinobloom_s \\
        --data PBC_dataset_normal_DIB/ --dataset acevedo --output-dir eval_pbc
    python -m dinov2.eval.eval_hier --model out/hier --data test.csv --output-dir eval_over_training

Teacher-backbone CLS features are extracted once per manifest (in the precision chosen for the
hardware, --precision) into OUT/features/ and reused by later runs with the same model, images,
image size and precision. Protocols: cosine k-NN (k = 1 and 20), logistic regression and the model's
own supervised head. Designs: stratified k-fold cross-validation over --data (mean ± std over folds),
the manifest's train/test split (--split), or fit on --train-data and test on --data (the
out-of-domain design); a fixed test set gets a 95 % bootstrap interval for every metric. Metrics per
value of the manifests' dataset column and overall. Writes predictions.csv, metrics.json, metrics.csv,
report.md, confusion_<protocol>.png, tree_<protocol>.png and embedding.png. --model with a training
output folder evaluates every exported model in it and adds metrics_over_training.{csv,png}.
"""

import argparse
import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from dinov2.config.custom_hier import HIERARCHIES, get_tree
from dinov2.data.transforms import NORMALIZATION_MEAN, NORMALIZATION_STD, make_eval_transform
from dinov2.errors import CheckpointError, ConfigError, LabelError
from dinov2.eval import metrics as hier_metrics
from dinov2.eval.bootstrap import DEFAULT_RESAMPLES
from dinov2.eval.compare import compare_runs
from dinov2.eval.features import (
    CachedFeatures,
    add_extraction_arguments,
    cached_features,
    extract_features,
    extraction_settings,
    feature_cache_key,
    feature_cache_path,
    model_identity,
)
from dinov2.eval.labelled_data import (
    EvaluationPlan,
    LabelledSet,
    flat_tree,
    plan_evaluation,
    read_source,
    refuse_duplicates,
    resolve_set,
)
from dinov2.eval.output_lock import output_folder_lock
from dinov2.eval.plots import EMBEDDINGS, plot_confusion, plot_embedding, plot_tree_recall
from dinov2.eval.protocols import expand_protocols, run_protocols
from dinov2.eval.report import render_report, write_metrics, write_text_atomically
from dinov2.eval.scoring import BootstrapSettings, score_protocols
from dinov2.eval.training_run import evaluate_training_run
from dinov2.hierarchy import Tree
from dinov2.models import ARCHS, build_backbone
from dinov2.models.model_file import load_model_file
from dinov2.models.weights import (
    MODEL_FILE_FORMAT,
    PRESETS,
    backbone_state_dict,
    load_backbone_state,
    pretrained_arch,
    read_checkpoint,
)
from dinov2.utils.cli import run_cli
from dinov2.utils.io import output_folder

FEATURE_FOLDER = "features"
DEFAULT_IMAGE_SIZE = 224
NO_HIERARCHY = "none"


@dataclass
class EvalModel:
    """A backbone ready for feature extraction, with what the model file knows about it."""

    backbone: nn.Module
    supervised_head: nn.Module | None
    tree: Tree | None
    hierarchy: str | None
    image_size: int | None
    mean: Sequence[float]
    std: Sequence[float]
    identity: str


def load_eval_model(source: str, arch: str | None = None, image_size: int = DEFAULT_IMAGE_SIZE) -> EvalModel:
    """An exported model file (carries arch, tree and preprocessing), or raw DINOv2/DinoBloom weights
    (a path, URL or preset name) loaded into the backbone named by ``arch`` (an arch such as
    ``vit_small`` or a preset such as ``dinobloom_s``; a preset ``source`` brings its own)."""
    checkpoint = read_checkpoint(source)
    if checkpoint.get("format") == MODEL_FILE_FORMAT:
        model = load_model_file(source)
        return EvalModel(
            model.backbone,
            model.supervised_head,
            model.tree,
            model.hierarchy,
            model.image_size,
            tuple(model.mean),
            tuple(model.std),
            model_identity(source),
        )
    arch = arch or (source if source in PRESETS else None)
    if arch is None:
        raise ConfigError(
            f"{source} is not a dino_hier model file, so its architecture is unknown; pass --arch "
            f"with an arch ({', '.join(a for a in ARCHS if a != 'vit_custom')}) or a preset "
            f"({', '.join(sorted(PRESETS))})"
        )
    layout = pretrained_arch(arch) if arch in PRESETS else {"arch": arch}
    backbone = build_backbone(**{**layout, "img_size": image_size})
    load_backbone_state(backbone, backbone_state_dict(checkpoint), str(source))
    return EvalModel(
        backbone.eval(),
        None,
        None,
        None,
        None,
        NORMALIZATION_MEAN,
        NORMALIZATION_STD,
        f"{model_identity(source)}|{json.dumps(layout, sort_keys=True)}",
    )


@dataclass
class TreeChoice:
    """The tree the labels are scored on, its name, whether it is a flat set of classes (``--hierarchy none``),
    and a note when it differs from the model file's tree."""

    tree: Tree
    name: str
    flat: bool
    note: str | None


def choose_tree(model: EvalModel, hierarchy: str | None, frames) -> TreeChoice:
    """``--hierarchy none``: the manifests' raw labels as flat classes; a name: that tree of ``HIERARCHIES``
    (also for a model file with another tree: its backbone is evaluated, its head is not); else the model
    file's tree, or ``v1`` for raw weights."""
    if hierarchy == NO_HIERARCHY:
        return TreeChoice(flat_tree(frames), NO_HIERARCHY, True, None)
    if hierarchy is None:
        if model.tree is not None:
            return TreeChoice(model.tree, model.hierarchy or "model file", False, None)
        return TreeChoice(get_tree("v1"), "v1", False, None)
    tree = get_tree(hierarchy)
    note = None
    if model.tree is not None and tree != model.tree:
        note = f"differs from the model file's tree ({model.hierarchy}): its backbone is evaluated, its head is not"
    return TreeChoice(tree, hierarchy, False, note)


def choose_protocols(names: str | None, model: EvalModel, choice: TreeChoice, source: str) -> tuple[list, dict]:
    """``(protocols to run, {skipped protocol: reason})``. The supervised head scores the model's own tree only;
    with another tree or none it is skipped with the reason, and asking for nothing else is an error."""
    has_head = model.supervised_head is not None
    if names is None:
        wanted = expand_protocols(["knn", "logreg"] + (["head"] if has_head else []))
    else:
        wanted = expand_protocols([p.strip() for p in names.split(",") if p.strip()])
        if "head" in wanted and not has_head:
            raise ConfigError(f"--protocols head needs a model file with a supervised head; {source} has none")
    skipped = {}
    if "head" in wanted and (choice.flat or choice.tree != model.tree):
        what = "no hierarchy (--hierarchy none)" if choice.flat else f"the tree {choice.name}"
        skipped["head"] = f"the supervised head predicts the leaves of the model file's tree, not {what}"
        wanted.remove("head")
    if not wanted:
        raise ConfigError(f"nothing to run: {skipped['head']}; choose --protocols knn,logreg")
    return wanted, skipped


def rare_nodes(names: str | None, labels: np.ndarray, tree: Tree) -> list:
    """Node indices of ``--rare a,b`` (validated against the tree) or, by default, the labels under 2 % of samples."""
    if names is None:
        return hier_metrics.rare_classes(labels, tree, max_fraction=0.02)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in tree]
    if unknown:
        hints = {n: difflib.get_close_matches(n.lower(), tree.nodes, n=1) for n in unknown}
        listed = ", ".join(f"{n!r}" + (f" (did you mean {hints[n][0]!r}?)" if hints[n] else "") for n in unknown)
        raise LabelError(f"--rare names unknown node(s) of the hierarchy: {listed}; give node names, not raw labels")
    return [tree.index(n) for n in wanted]


def extract_sets(plan: EvaluationPlan, model: EvalModel, image_size: int, cache_dir: Path, head: bool, extraction):
    """Features (and head logits) of every set of the plan, each from its own cache file; concatenated in
    plan order, with one :class:`CachedFeatures` per set."""
    transform = make_eval_transform(image_size, model.mean, model.std)
    cached: list[CachedFeatures] = []
    for labelled_set in plan.sets:
        paths = labelled_set.frame["path"].astype(str).tolist()
        key = feature_cache_key(
            model.identity, paths, image_size, model.mean, model.std, extraction["precision"].name, {"head": head}
        )

        def extract(paths=paths, labelled_set=labelled_set):
            return extract_features(
                model.backbone,
                paths,
                transform,
                model.supervised_head if head else None,
                desc=f"features {labelled_set.name}",
                **extraction,
            )

        result = cached_features(feature_cache_path(cache_dir, labelled_set.name, key), key, extract)
        state = "reused" if result.reused else "extracted to"
        damaged = f" (the cache was {result.problem}; extracted again)" if result.problem else ""
        print(f"features of {labelled_set.source}: {state} {result.path} {result.features.shape}{damaged}")
        cached.append(result)
    features = np.concatenate([c.features for c in cached])
    logits = np.concatenate([c.logits for c in cached]) if head else None
    return features, logits, cached


def _count_labels(labels: np.ndarray, tree: Tree) -> tuple[int, int]:
    leaf = int((labels < len(tree.leaves)).sum())
    return leaf, int(labels.size - leaf)


def evaluate(args: argparse.Namespace, source: str, out_dir: Path) -> dict:
    """One model on the data of ``args``, written to ``out_dir``; returns the summary of metrics.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    extraction = extraction_settings(args)
    model = load_eval_model(source, args.arch, args.image_size or DEFAULT_IMAGE_SIZE)
    test_frames = [read_source(data, args.dataset) for data in args.data]
    train_frames = [read_source(data, args.train_dataset) for data in args.train_data or []]
    choice = choose_tree(model, args.hierarchy, train_frames + test_frames)
    tree = choice.tree
    protocols, skipped = choose_protocols(args.protocols, model, choice, source)
    for protocol, reason in skipped.items():
        print(f"protocol {protocol} skipped: {reason}")
    test_sets = [resolve_set(frame, tree, choice.flat) for frame in test_frames]
    train_sets: list[LabelledSet] = [resolve_set(frame, tree, choice.flat) for frame in train_frames]
    plan = plan_evaluation(test_sets, train_sets, args.split, args.folds, args.seed)
    refuse_duplicates(plan.sets)

    image_size = args.image_size or model.image_size or DEFAULT_IMAGE_SIZE
    head = "head" in protocols
    print(f"precision: {extraction['precision']}")
    cache_dir = Path(args.feature_cache) if args.feature_cache else out_dir / FEATURE_FOLDER
    features, logits, caches = extract_sets(plan, model, image_size, cache_dir, head, extraction)
    if head and logits.shape[1] != len(tree.leaves):
        raise CheckpointError(
            f"the supervised head gives {logits.shape[1]} logits but the tree has {len(tree.leaves)} leaves"
        )

    test_labels = plan.labels[plan.test_rows]
    rare = rare_nodes(args.rare, test_labels, tree)
    with tqdm(total=len(plan.folds) * len(protocols), desc="protocols x folds") as progress:
        predictions = run_protocols(protocols, features, plan.labels, plan.folds, logits, progress)
    bootstrap = BootstrapSettings(args.bootstrap, args.seed)
    results, table = score_protocols(predictions, plan, tree, rare, not choice.flat, bootstrap)
    write_text_atomically(out_dir / "predictions.csv", table.to_csv(index=False))
    for protocol, result in results.items():
        means = {k: round(v, 4) for k, v in result["mean"].items() if not math.isnan(v)}
        print(json.dumps({"protocol": protocol, **means}))
        rows = table[table["protocol"] == protocol]
        pooled_true = np.array([tree.index(n) for n in rows["label_node"]], dtype=np.int64)
        pooled_pred = np.array([tree.index(n) for n in rows["predicted_node"]], dtype=np.int64)
        title = f"{protocol}: confusion (rows: label" + (", tree order)" if not choice.flat else ")")
        plot_confusion(pooled_true, pooled_pred, tree, out_dir / f"confusion_{protocol}.png", title, not choice.flat)
        if not choice.flat:
            plot_tree_recall(
                pooled_true,
                pooled_pred,
                tree,
                out_dir / f"tree_{protocol}.png",
                f"{protocol}: recall per node (fraction of samples at or under a node predicted under it)",
            )
    embedding = plot_embedding(
        features,
        plan.labels,
        tree,
        plan.frame["dataset"].to_numpy(),
        out_dir / "embedding.png",
        args.embedding,
        args.seed,
        not choice.flat,
    )
    n_leaf, n_internal = _count_labels(test_labels, tree)
    precision = extraction["precision"]
    summary = {
        "run": {
            "model": source,
            "data": ", ".join(args.data),
            "train_data": ", ".join(args.train_data or []),
            "evaluation": plan.design,
            "fixed_test_set": plan.fixed_test_set,
            "intervals": (
                f"{100 * bootstrap.confidence:.0f} % percentile bootstrap intervals over test images "
                f"({bootstrap.resamples} resamples, seed {bootstrap.seed})"
                if plan.fixed_test_set and bootstrap.resamples
                else f"mean ± std over {len(plan.folds)} folds"
                if not plan.fixed_test_set
                else "no intervals (--bootstrap 0)"
            ),
            "bootstrap": vars(bootstrap) if plan.fixed_test_set and bootstrap.resamples else None,
            "hierarchy": choice.name,
            "hierarchical_metrics": not choice.flat,
            "tree_note": choice.note,
            "image_size": image_size,
            "precision": {"name": precision.name, "reason": precision.reason},
            "n_samples": int(test_labels.size),
            "n_leaf_labelled": n_leaf,
            "n_internal_labelled": n_internal,
            "n_train_images": int(len(plan.folds[0][0])) if plan.fixed_test_set else None,
            "left_out": plan.left_out,
            "n_leaves": len(tree.leaves),
            "max_depth": tree.max_depth,
            "protocols": protocols,
            "skipped_protocols": skipped,
            "feature_caches": [
                {"source": s.source, "path": str(c.path), "reused": c.reused, "problem": c.problem}
                for s, c in zip(plan.sets, caches)
            ],
            "embedding": embedding,
        },
        "tree": tree.to_nested(),
        "rare_classes": [tree.nodes[r] for r in rare],
        "tree_feature_spearman": (
            hier_metrics.tree_feature_correlation(plan.labels, features, tree) if not choice.flat else None
        ),
        "n_label_classes": int(np.unique(plan.labels).size),
        "protocols": results,
    }
    if args.compare:
        functions = hier_metrics.metric_functions(tree, rare, not choice.flat)
        summary["comparison"] = compare_runs(table, Path(args.compare), tree, functions, bootstrap)
    write_metrics(out_dir, summary)
    write_text_atomically(out_dir / "report.md", render_report(summary))
    print(f"wrote {out_dir / 'report.md'}, metrics.json, metrics.csv, predictions.csv and plots")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.eval.eval_hier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="exported dino_hier model file, raw DINOv2/DinoBloom weights (a path, URL or preset), or a training "
        "output folder: every OUT/eval/model_step*.pth and OUT/model.pth in it is evaluated, with a "
        "metric-vs-iteration table and plot",
    )
    parser.add_argument(
        "--arch",
        default=None,
        help="backbone of raw weights: an arch (vit_small, vit_base, vit_large, vit_giant2) or a "
        "preset whose layout the weights have (dinobloom_s, dinov2_vits14_reg, ...); "
        "model files carry their own",
    )
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        action="extend",
        help="test data: one or more manifest CSVs (path,label,dataset,split) or data set folders with one "
        "subfolder per class (read like dinov2.data.make_manifest; their --split is a stratified 80/20)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="dataset name in DATASETS of dinov2/config/custom_hier.py that maps the raw labels of --data; "
        "overrides the manifests' dataset column (required for a folder)",
    )
    parser.add_argument(
        "--train-data",
        nargs="+",
        action="extend",
        default=None,
        help="fit k-NN and logistic regression on these manifests or folders (all their labelled rows) and "
        "test on --data (all its labelled rows): the out-of-domain design, with bootstrap intervals",
    )
    parser.add_argument("--train-dataset", default=None, help="as --dataset, for --train-data (required for a folder)")
    parser.add_argument("--output-dir", required=True, help="folder for the metrics, report, plots and feature cache")
    parser.add_argument(
        "--feature-cache",
        default=None,
        help="folder of the feature cache files, one per manifest and model (default: OUTPUT_DIR/features); "
        "share one between runs so that a training set is extracted once for several test sets",
    )
    parser.add_argument(
        "--protocols",
        default=None,
        help="comma-separated subset of knn,logreg,head (default: knn,logreg plus head when the "
        "model has a supervised head for the tree in use)",
    )
    parser.add_argument(
        "--folds", type=int, default=5, help="stratified cross-validation folds (default: 5; unused with --split)"
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="instead of cross-validation, train on the manifests' train rows, test on their test rows",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the fold assignment, the bootstrap and the embedding (default: 0)"
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_RESAMPLES,
        help=f"bootstrap resamples of the test images for the 95%% intervals of a fixed test set (--split or "
        f"--train-data; default: {DEFAULT_RESAMPLES}; 0: no intervals)",
    )
    parser.add_argument(
        "--compare",
        default=None,
        help="an earlier eval_hier output folder on the same test images: report the paired bootstrap "
        "difference (this run - that one) of every metric with its 95%% interval",
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="square input size in pixels (default: the model file's, else 224)"
    )
    add_extraction_arguments(parser)
    parser.add_argument(
        "--rare",
        default=None,
        help="comma-separated node names of the rare classes (default: labels under 2%% of the test images)",
    )
    parser.add_argument(
        "--hierarchy",
        default=None,
        help=f"tree to score the labels on: a name in HIERARCHIES ({', '.join(HIERARCHIES)}; default: the model "
        f"file's tree, else v1), or {NO_HIERARCHY} (the manifests' raw labels as flat classes, no hierarchical "
        "metrics); a tree other than the model file's skips the head protocol",
    )
    parser.add_argument(
        "--embedding",
        choices=EMBEDDINGS,
        default="auto",
        help="2-D embedding plot: auto (UMAP where umap-learn is installed, else PCA), umap or pca",
    )
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    if args.train_data and args.split:
        raise ConfigError("--split and --train-data exclude each other: --train-data already says what is trained on")
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be 0 or more resamples, got {args.bootstrap}")
    if args.compare and Path(args.model).is_dir():
        raise ConfigError("--compare compares one model's run with another; give --model a model file")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    out_dir = output_folder(args.output_dir)
    with output_folder_lock(out_dir):
        if Path(args.model).is_dir():
            evaluate_training_run(Path(args.model), out_dir, lambda model, folder: evaluate(args, model, folder))
        else:
            evaluate(args, args.model, out_dir)
    return 0


if __name__ == "__main__":
    run_cli(main)
