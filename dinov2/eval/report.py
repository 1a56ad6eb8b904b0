"""Aggregation over folds and the written outputs: predictions.csv, metrics.json, metrics.csv, report.md."""

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dinov2.eval.metrics import ancestor_matrix

METRIC_DESCRIPTIONS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy (mean recall over the label nodes)",
    "f1_weighted": "weighted F1 (over the label nodes)",
    "f1_macro": "macro F1 (over the label nodes)",
    "coarse_accuracy": "coarse accuracy (the samples labelled at internal nodes alone)",
    "mistake_severity": "mistake severity (edges to the LCA, mistakes only; lower is better)",
    "hierarchical_precision": "hierarchical precision",
    "hierarchical_recall": "hierarchical recall",
    "hierarchical_f1": "hierarchical F1",
    "rare_balanced_accuracy": "balanced accuracy on rare classes",
}


def _finite_or_none(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def summarize_folds(fold_metrics: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """``{"mean": {...}, "std": {...}}`` over folds, ignoring nan folds (population std, ddof=0); nan if all nan."""
    names = list(fold_metrics[0])
    table = np.array([[m[name] for name in names] for m in fold_metrics], dtype=np.float64)
    valid = ~np.isnan(table)
    count = valid.sum(axis=0)
    total = np.where(valid, table, 0.0).sum(axis=0)
    mean = np.divide(total, count, out=np.full(len(names), np.nan), where=count > 0)
    squares = np.where(valid, (table - mean) ** 2, 0.0).sum(axis=0)
    std = np.sqrt(np.divide(squares, count, out=np.full(len(names), np.nan), where=count > 0))
    return {"mean": dict(zip(names, mean.tolist())), "std": dict(zip(names, std.tolist()))}


def worst_confusions(y_true, y_pred, tree, top: int = 10) -> list[dict]:
    """The most frequent mistakes (label, prediction) with their count and tree distance, most frequent first."""
    correct = ancestor_matrix(tree)[np.asarray(y_pred), np.asarray(y_true)]
    pairs = Counter(zip(np.asarray(y_true)[~correct].tolist(), np.asarray(y_pred)[~correct].tolist()))
    rows = [
        {
            "label": tree.nodes[t],
            "predicted": tree.nodes[p],
            "count": n,
            "tree_distance": tree.distance(tree.nodes[t], tree.nodes[p]),
        }
        for (t, p), n in pairs.items()
    ]
    return sorted(rows, key=lambda r: (-r["count"], -r["tree_distance"], r["label"], r["predicted"]))[:top]


def write_metrics(out_dir: Path, results: dict) -> None:
    """``metrics.json`` (everything, nan as null) and ``metrics.csv`` (one row per protocol and fold, plus mean/std)."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (np.floating, float)):
            return _finite_or_none(float(value))
        if isinstance(value, np.integer):
            return int(value)
        return value

    (out_dir / "metrics.json").write_text(json.dumps(clean(results), indent=2) + "\n")
    rows = []
    for protocol, result in results["protocols"].items():
        for fold, metrics in enumerate(result["folds"]):
            rows.append({"protocol": protocol, "fold": str(fold), **metrics})
        rows.append({"protocol": protocol, "fold": "mean", **result["mean"]})
        rows.append({"protocol": protocol, "fold": "std", **result["std"]})
    pd.DataFrame(rows).to_csv(out_dir / "metrics.csv", index=False)


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _mean_std(result: dict, name: str) -> str:
    mean, std = result["mean"][name], result["std"][name]
    if mean is None or math.isnan(mean):
        return "n/a"
    return _fmt(mean) if len(result["folds"]) == 1 else f"{_fmt(mean)} ± {_fmt(std)}"


def render_report(results: dict) -> str:
    """report.md: run summary, a table per protocol (mean ± std over folds), the per-level table,
    the worst confusions with their tree distance, and links to the figures."""
    info = results["run"]
    protocols = results["protocols"]
    lines = [
        "# Evaluation report",
        "",
        f"- model: `{info['model']}`",
        f"- data: `{info['data']}` — {info['n_samples']} samples ({info['n_leaf_labelled']} labelled at leaves, "
        f"{info['n_internal_labelled']} at internal nodes; {info['n_unlabelled']} left out: unlabelled or ignored "
        "by the dataset mapping)",
        f"- hierarchy: {info['hierarchy']} ({info['n_leaves']} leaves, depth {info['max_depth']}); "
        f"image size {info['image_size']}",
        f"- evaluation: {info['evaluation']}",
        f"- rare classes: {', '.join(results['rare_classes']) or 'none'}",
        f"- Spearman correlation between tree distance and class-centroid feature distance: "
        f"{_fmt(results['tree_feature_spearman'])} (over {results['n_label_classes']} label classes)",
        "",
        "Every labelled sample counts in every metric: a prediction is correct when it equals the label or lies "
        "under it (a coarse label such as IG cannot judge finer levels). Balanced accuracy is the mean recall "
        "over the data set's label nodes; F1 is computed over those label nodes, each prediction mapped to the "
        "label node at or above it (none: wrong). *Coarse accuracy* repeats accuracy over the samples labelled "
        "at internal nodes alone. Mistake severity is the mean number of edges from the label up to its lowest common "
        "ancestor with the prediction, over mistakes only. k-NN is cosine with DINOv2's weighted vote "
        "(exp(similarity / 0.07)); logistic regression is L-BFGS with L2 = 100 / (feature dim × classes) "
        "on unscaled features, as DinoBloom.",
        "",
        "## Summary",
        "",
        "| protocol | accuracy | balanced acc. | weighted F1 | hier. F1 | mistake severity |",
        "|---|---|---|---|---|---|",
    ]
    for protocol, result in protocols.items():
        cells = [
            _mean_std(result, m)
            for m in ("accuracy", "balanced_accuracy", "f1_weighted", "hierarchical_f1", "mistake_severity")
        ]
        lines.append(f"| {protocol} | " + " | ".join(cells) + " |")
    for protocol, result in protocols.items():
        lines += ["", f"## {protocol}", "", "| metric | mean ± std | per fold |", "|---|---|---|"]
        for name, description in METRIC_DESCRIPTIONS.items():
            per_fold = ", ".join(_fmt(m[name]) for m in result["folds"])
            lines.append(f"| {description} | {_mean_std(result, name)} | {per_fold} |")
    levels = sorted(
        {k for r in protocols.values() for k in r["mean"] if k.startswith("level_")}, key=lambda k: int(k.split("_")[1])
    )
    lines += [
        "",
        "## Accuracy per level",
        "",
        "A sample counts at level k when its label is at least k deep (level 1 = lineage).",
        "",
        "| level | " + " | ".join(protocols) + " |",
        "|---" * (len(protocols) + 1) + "|",
    ]
    for level in levels:
        lines.append(f"| {level.split('_')[1]} | " + " | ".join(_mean_std(r, level) for r in protocols.values()) + " |")
    lines += ["", "## Worst confusions (all folds pooled)"]
    for protocol, result in protocols.items():
        lines += ["", f"### {protocol}", ""]
        if not result["worst_confusions"]:
            lines.append("No mistakes.")
            continue
        lines += ["| label | predicted | count | tree distance |", "|---|---|---|---|"]
        lines += [
            f"| {r['label']} | {r['predicted']} | {r['count']} | {r['tree_distance']} |"
            for r in result["worst_confusions"]
        ]
    lines += ["", "## Figures", ""]
    for protocol in protocols:
        lines.append(
            f"- {protocol}: [confusion matrix](confusion_{protocol}.png), "
            f"[tree coloured by recall](tree_{protocol}.png)"
        )
    lines.append("- [feature embedding (PCA) by lineage](embedding.png)")
    return "\n".join(lines) + "\n"
