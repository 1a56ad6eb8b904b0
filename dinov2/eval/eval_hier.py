"""Evaluate a backbone on a labelled WBC data set with flat and hierarchical metrics.

    python -m dinov2.eval.eval_hier --model model.pth --data manifest.csv --output-dir eval_out
    python -m dinov2.eval.eval_hier --model DinoBloom-S.pth --arch dinobloom_s \\
        --data PBC_dataset_normal_DIB/ --dataset acevedo --output-dir eval_pbc

Teacher-backbone CLS features are extracted once (bf16 on the CPU) into OUT/features.npz and
reused by later runs with the same model, images and image size. Protocols: cosine k-NN (k = 1
and 20), logistic regression and the model's own supervised head, over stratified k-fold
cross-validation or the manifest's train/test split. Writes predictions.csv, metrics.json,
metrics.csv, report.md, confusion_<protocol>.png, tree_<protocol>.png and embedding.png.
"""

import argparse
import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn
from tqdm import tqdm

from dinov2.config.custom_hier import IGNORED, get_tree
from dinov2.data.make_manifest import scan_dataset
from dinov2.data.manifest import read_manifests, resolve_manifest_labels, stratified_splits
from dinov2.data.transforms import NORMALIZATION_MEAN, NORMALIZATION_STD, make_eval_transform
from dinov2.errors import CheckpointError, ConfigError, DataError, LabelError
from dinov2.eval import metrics as hier_metrics
from dinov2.eval.features import (
    add_extraction_arguments,
    cached_features,
    extract_features,
    extraction_settings,
    feature_cache_key,
    model_identity,
)
from dinov2.eval.plots import plot_confusion, plot_embedding, plot_tree_recall
from dinov2.eval.protocols import expand_protocols, manifest_split_fold, run_protocols, stratified_folds
from dinov2.eval.report import render_report, summarize_folds, worst_confusions, write_metrics
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

FOLDER_TEST_FRACTION = 0.2
FEATURE_CACHE = "features.npz"
DEFAULT_IMAGE_SIZE = 224


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


def choose_tree(model: EvalModel, hierarchy: str | None) -> tuple[Tree, str]:
    """The model file's tree when it has one (its head follows it), else ``get_tree(hierarchy or "v1")``."""
    if model.tree is None:
        name = hierarchy or "v1"
        return get_tree(name), name
    if hierarchy is not None and get_tree(hierarchy) != model.tree:
        raise ConfigError(
            f"--hierarchy {hierarchy} differs from the tree stored in the model file "
            f"({model.hierarchy}); leave --hierarchy out to use the model's tree"
        )
    return model.tree, model.hierarchy or "model file"


def load_manifest(data: str, dataset: str | None) -> pd.DataFrame:
    """A manifest CSV, or a folder read by :func:`dinov2.data.make_manifest.scan_dataset` (split: a stratified
    80/20 train/test); ``dataset`` overrides the dataset column."""
    path = Path(data)
    if path.is_dir():
        if dataset is None:
            raise ConfigError(f"{data} is a folder: pass --dataset (e.g. --dataset acevedo) to map its labels")
        manifest, _ = scan_dataset(dataset, path)
        manifest["split"] = stratified_splits(manifest["label"].tolist(), 0.0, FOLDER_TEST_FRACTION)
    elif path.is_file():
        manifest = read_manifests([path])
    else:
        raise DataError(f"--data {data}: no such manifest file or image folder")
    if dataset is not None:
        manifest = manifest.assign(dataset=dataset)
    if manifest.empty:
        raise DataError(f"--data {data} holds no images")
    return manifest.reset_index(drop=True)


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


def score_protocols(
    predictions, manifest: pd.DataFrame, labels: np.ndarray, folds, tree: Tree, rare, out_dir: Path
) -> dict:
    """Per protocol: metrics per fold, mean/std, worst confusions; writes predictions.csv and the
    confusion and tree plots (all folds pooled); prints one JSON line of mean metrics per protocol."""
    rows, results = [], {}
    for protocol, fold_predictions in predictions.items():
        fold_metrics = []
        for fold, ((_, test), predicted) in enumerate(zip(folds, fold_predictions)):
            fold_metrics.append(hier_metrics.classification_metrics(labels[test], predicted, tree, rare))
            rows.append(
                pd.DataFrame(
                    {
                        "path": manifest["path"].iloc[test].to_numpy(),
                        "label": manifest["label"].iloc[test].to_numpy(),
                        "label_node": [tree.nodes[t] for t in labels[test]],
                        "predicted_node": [tree.nodes[p] for p in predicted],
                        "correct": hier_metrics.is_correct(labels[test], predicted, tree),
                        "fold": fold,
                        "protocol": protocol,
                    }
                )
            )
        pooled_true = np.concatenate([labels[test] for _, test in folds])
        pooled_pred = np.concatenate(fold_predictions)
        results[protocol] = {
            "folds": fold_metrics,
            **summarize_folds(fold_metrics),
            "worst_confusions": worst_confusions(pooled_true, pooled_pred, tree),
        }
        means = {k: round(v, 4) for k, v in results[protocol]["mean"].items() if not math.isnan(v)}
        print(json.dumps({"protocol": protocol, **means}))
        plot_confusion(
            pooled_true,
            pooled_pred,
            tree,
            out_dir / f"confusion_{protocol}.png",
            f"{protocol}: confusion (rows: label, tree order)",
        )
        plot_tree_recall(
            pooled_true,
            pooled_pred,
            tree,
            out_dir / f"tree_{protocol}.png",
            f"{protocol}: recall per node (fraction of samples at or under a node predicted under it)",
        )
    pd.concat(rows, ignore_index=True).to_csv(out_dir / "predictions.csv", index=False)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.eval.eval_hier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="exported dino_hier model file, or raw DINOv2/DinoBloom weights: a path, URL or preset",
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
        help="manifest CSV (path,label,dataset,split), or a data set folder with one subfolder per "
        "class (read like dinov2.data.make_manifest; its --split is a stratified 80/20)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="dataset name in DATASETS of dinov2/config/custom_hier.py that maps the raw labels; "
        "overrides the manifest's dataset column (required for a folder)",
    )
    parser.add_argument("--output-dir", required=True, help="folder for the feature cache, metrics, report and plots")
    parser.add_argument(
        "--protocols",
        default=None,
        help="comma-separated subset of knn,logreg,head (default: knn,logreg plus head when the "
        "model has a supervised head)",
    )
    parser.add_argument(
        "--folds", type=int, default=5, help="stratified cross-validation folds (default: 5; unused with --split)"
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="instead of cross-validation, train on the manifest's train rows, test on its test rows",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default: 0)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="square input size in pixels (default: the model file's, else 224)"
    )
    add_extraction_arguments(parser)
    parser.add_argument(
        "--rare",
        default=None,
        help="comma-separated node names of the rare classes (default: labels under 2%% of samples)",
    )
    parser.add_argument(
        "--hierarchy", default=None, help="hierarchy name in HIERARCHIES for models without a tree (default: v1)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = output_folder(args.output_dir)
    extraction = extraction_settings(args)

    model = load_eval_model(args.model, args.arch, args.image_size or DEFAULT_IMAGE_SIZE)
    tree, hierarchy = choose_tree(model, args.hierarchy)
    if args.protocols is None:
        protocols = expand_protocols(["knn", "logreg"] + (["head"] if model.supervised_head is not None else []))
    else:
        protocols = expand_protocols([p.strip() for p in args.protocols.split(",") if p.strip()])
        if "head" in protocols and model.supervised_head is None:
            raise ConfigError(f"--protocols head needs a model file with a supervised head; {args.model} has none")

    manifest = load_manifest(args.data, args.dataset)
    all_labels = resolve_manifest_labels(manifest, tree)
    kept = all_labels != IGNORED
    manifest, labels = manifest[kept].reset_index(drop=True), all_labels[kept]
    if labels.size == 0:
        raise DataError(f"no image of {args.data} has a label that maps to a node (all unlabelled or ignored)")

    rare = rare_nodes(args.rare, labels, tree)
    folds = (
        manifest_split_fold(manifest["split"].tolist())
        if args.split
        else stratified_folds(labels, args.folds, args.seed)
    )
    image_size = args.image_size or model.image_size or DEFAULT_IMAGE_SIZE
    paths = manifest["path"].astype(str).tolist()
    key = feature_cache_key(
        model.identity, paths, image_size, model.mean, model.std, extra={"head": model.supervised_head is not None}
    )
    features, logits, reused = cached_features(
        out_dir / FEATURE_CACHE,
        key,
        lambda: extract_features(
            model.backbone,
            paths,
            make_eval_transform(image_size, model.mean, model.std),
            model.supervised_head,
            **extraction,
        ),
    )
    print(
        f"features: {'reused' if reused else 'extracted to'} {out_dir / FEATURE_CACHE} "
        f"({features.shape[0]} x {features.shape[1]})"
    )
    if "head" in protocols and (logits is None or logits.shape[1] != len(tree.leaves)):
        raise CheckpointError(
            f"the supervised head gives {None if logits is None else logits.shape[1]} logits "
            f"but the tree has {len(tree.leaves)} leaves"
        )

    with tqdm(total=len(folds) * len(protocols), desc="protocols x folds") as progress:
        predictions = run_protocols(protocols, features, labels, folds, logits, progress)
    results = score_protocols(predictions, manifest, labels, folds, tree, rare, out_dir)
    plot_embedding(features, labels, tree, out_dir / "embedding.png")

    summary = {
        "run": {
            "model": args.model,
            "data": args.data,
            "hierarchy": hierarchy,
            "image_size": image_size,
            "n_samples": int(labels.size),
            "n_leaf_labelled": int((labels < len(tree.leaves)).sum()),
            "n_internal_labelled": int((labels >= len(tree.leaves)).sum()),
            "n_unlabelled": int((~kept).sum()),
            "n_leaves": len(tree.leaves),
            "max_depth": tree.max_depth,
            "evaluation": "train/test split of the manifest"
            if args.split
            else f"stratified {args.folds}-fold cross-validation (seed {args.seed})",
            "protocols": protocols,
            "feature_cache": str(out_dir / FEATURE_CACHE),
            "feature_cache_reused": reused,
        },
        "rare_classes": [tree.nodes[r] for r in rare],
        "tree_feature_spearman": hier_metrics.tree_feature_correlation(labels, features, tree),
        "n_label_classes": int(np.unique(labels).size),
        "protocols": results,
    }
    write_metrics(out_dir, summary)
    (out_dir / "report.md").write_text(render_report(summary))
    print(f"wrote {out_dir / 'report.md'}, metrics.json, metrics.csv, predictions.csv and plots")
    return 0


if __name__ == "__main__":
    run_cli(main)
