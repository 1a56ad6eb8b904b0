"""Aggregation over folds and the written outputs: metrics.json, metrics.csv, report.md."""

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dinov2.eval.metrics import ancestor_matrix
from dinov2.utils.io import atomic_write

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


def _clean(value):
    """JSON-able copy: numpy scalars to Python, nan to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return _finite_or_none(float(value))
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def metrics_table(results: dict) -> pd.DataFrame:
    """One row per protocol, data set (``all`` = every test image) and fold, plus ``mean``/``std`` over
    folds or ``ci_low``/``ci_high`` (the bootstrap interval) on a fixed test set."""
    rows = []
    for protocol, result in results["protocols"].items():
        for dataset, scores in [("all", result), *result["datasets"].items()]:
            for fold, metrics in enumerate(scores["folds"]):
                rows.append({"protocol": protocol, "dataset": dataset, "fold": str(fold), **metrics})
            if "interval" in scores:
                for bound in ("low", "high"):
                    values = {name: entry[bound] for name, entry in scores["interval"].items()}
                    rows.append({"protocol": protocol, "dataset": dataset, "fold": f"ci_{bound}", **values})
            else:
                rows.append({"protocol": protocol, "dataset": dataset, "fold": "mean", **scores["mean"]})
                rows.append({"protocol": protocol, "dataset": dataset, "fold": "std", **scores["std"]})
    return pd.DataFrame(rows)


def write_metrics(out_dir: Path, results: dict) -> None:
    """``metrics.json`` (everything, nan as null) and ``metrics.csv`` (:func:`metrics_table`), each written to a
    unique temporary name and renamed into place."""
    write_text_atomically(out_dir / "metrics.json", json.dumps(_clean(results), indent=2) + "\n")
    write_text_atomically(out_dir / "metrics.csv", metrics_table(results).to_csv(index=False))


def write_text_atomically(path: Path, text: str) -> Path:
    """``text`` written to a unique temporary file beside ``path``, then renamed over it
    (:func:`dinov2.utils.io.atomic_write`): concurrent writers never share a temporary file."""
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return Path(path)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def cell(scores: dict, name: str) -> str:
    """``value [low, high]`` on a fixed test set, ``mean ± std`` over folds, ``n/a`` when undefined."""
    if "interval" in scores:
        entry = scores["interval"][name]
        if entry["value"] is None or math.isnan(entry["value"]):
            return "n/a"
        return f"{_fmt(entry['value'])} [{_fmt(entry['low'])}, {_fmt(entry['high'])}]"
    mean, std = scores["mean"][name], scores["std"][name]
    if mean is None or math.isnan(mean):
        return "n/a"
    return _fmt(mean) if len(scores["folds"]) == 1 else f"{_fmt(mean)} ± {_fmt(std)}"


SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "f1_weighted", "f1_macro", "hierarchical_f1", "mistake_severity")
SUMMARY_HEADERS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced acc.",
    "f1_weighted": "weighted F1",
    "f1_macro": "macro F1",
    "hierarchical_f1": "hier. F1",
    "mistake_severity": "mistake severity",
}


def _run_lines(results: dict) -> list[str]:
    info = results["run"]
    lines = [f"- model: `{info['model']}`"]
    if info["train_data"]:
        lines.append(f"- trained on: `{info['train_data']}` ({info['n_train_images']} images)")
    lines.append(f"- tested on: `{info['data']}`")
    lines.append(f"- design: {info['evaluation']}; {info['intervals']}")
    lines.append(
        f"- scored: {info['n_samples']} test images ({info['n_leaf_labelled']} labelled at leaves, "
        f"{info['n_internal_labelled']} at internal nodes), every one in every metric"
    )
    if info["left_out"]:
        lines.append("- left out (labelled images are counted here, never dropped silently):")
        lines += [f"  - {e['source']}: {e['count']} image(s): {e['reason']}" for e in info["left_out"]]
    else:
        lines.append("- left out: none")
    if info["hierarchical_metrics"]:
        lines.append(
            f"- hierarchy: {info['hierarchy']} ({info['n_leaves']} leaves, depth {info['max_depth']})"
            + (f"; {info['tree_note']}" if info["tree_note"] else "")
        )
    else:
        lines.append(
            f"- hierarchy: none: the manifests' {info['n_leaves']} raw labels are flat classes; the hierarchical "
            "metrics (coarse accuracy, mistake severity, hierarchical P/R/F1, accuracy per level) are left out"
        )
    for protocol, reason in info["skipped_protocols"].items():
        lines.append(f"- protocol `{protocol}` skipped: {reason}")
    lines.append(
        f"- precision: {info['precision']['name']} ({info['precision']['reason']}); image size {info['image_size']}"
    )
    for cache in info["feature_caches"]:
        state = "reused" if cache["reused"] else "extracted"
        problem = f" (the cache was {cache['problem']}; extracted again)" if cache["problem"] else ""
        lines.append(f"- features of `{cache['source']}`: {state}, `{cache['path']}`{problem}")
    lines.append(f"- rare classes: {', '.join(results['rare_classes']) or 'none'}")
    if info["hierarchical_metrics"]:
        lines.append(
            "- Spearman correlation between tree distance and class-centroid feature distance: "
            f"{_fmt(results['tree_feature_spearman'])} (over {results['n_label_classes']} label classes)"
        )
    return lines


EXPLANATION = (
    "Every labelled test image counts in every metric: a prediction is correct when it equals the label or lies "
    "under it (a coarse label such as IG cannot judge finer levels). Balanced accuracy is the mean recall over "
    "the data set's label nodes; F1 is computed over those label nodes, each prediction mapped to the label node "
    "at or above it (none: wrong). *Coarse accuracy* repeats accuracy over the images labelled at internal nodes "
    "alone. Mistake severity is the mean number of edges from the label up to its lowest common ancestor with the "
    "prediction, over mistakes only. k-NN is cosine with DINOv2's weighted vote (exp(similarity / 0.07)); "
    "logistic regression is L-BFGS with L2 = 100 / (feature dim × classes) on unscaled features, as DinoBloom."
)


def _summary_table(rows: list[tuple[list[str], dict]], metrics: list[str], first: list[str]) -> list[str]:
    lines = [
        "| " + " | ".join(first + [SUMMARY_HEADERS[m] for m in metrics]) + " |",
        "|---" * (len(first) + len(metrics)) + "|",
    ]
    lines += ["| " + " | ".join(keys + [cell(scores, m) for m in metrics]) + " |" for keys, scores in rows]
    return lines


def render_report(results: dict) -> str:
    """report.md: what was run and counted, a summary per protocol and per data set (intervals or mean ± std),
    a table per protocol, the per-level table, the worst confusions, a comparison, and the figures."""
    info = results["run"]
    protocols = results["protocols"]
    metrics = [m for m in SUMMARY_METRICS if any(m in r["mean"] for r in protocols.values())]
    lines = ["# Evaluation report", "", *_run_lines(results), "", EXPLANATION, "", "## Summary (all test images)", ""]
    lines += _summary_table([([p], r) for p, r in protocols.items()], metrics, ["protocol"])
    datasets = sorted({name for r in protocols.values() for name in r["datasets"]})
    if len(datasets) > 1:
        lines += [
            "",
            "## Per data set",
            "",
            "The same metrics over the test images of each value of the `dataset` column.",
            "",
        ]
        rows = [([name, p], r["datasets"][name]) for name in datasets for p, r in protocols.items()]
        lines += _summary_table(rows, metrics, ["data set", "protocol"])
    for protocol, result in protocols.items():
        spread = "value [interval]" if "interval" in result else "mean ± std"
        lines += ["", f"## {protocol}", "", f"| metric | {spread} | per fold |", "|---|---|---|"]
        for name, description in METRIC_DESCRIPTIONS.items():
            if name in result["mean"]:
                per_fold = ", ".join(_fmt(m[name]) for m in result["folds"])
                lines.append(f"| {description} | {cell(result, name)} | {per_fold} |")
    levels = sorted(
        {k for r in protocols.values() for k in r["mean"] if k.startswith("level_")}, key=lambda k: int(k.split("_")[1])
    )
    if levels:
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
            lines.append(f"| {level.split('_')[1]} | " + " | ".join(cell(r, level) for r in protocols.values()) + " |")
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
    if "comparison" in results:
        lines += _comparison_lines(results["comparison"])
    lines += ["", "## Figures", ""]
    for protocol in protocols:
        tree_link = f", [tree coloured by recall](tree_{protocol}.png)" if info["hierarchical_metrics"] else ""
        lines.append(f"- {protocol}: [confusion matrix](confusion_{protocol}.png){tree_link}")
    lines.append(f"- [feature embedding ({info['embedding']})](embedding.png)")
    return "\n".join(lines) + "\n"


def _comparison_lines(comparison: dict) -> list[str]:
    lines = [
        "",
        f"## Compared with `{comparison['other']}`",
        "",
        f"Paired bootstrap over the {comparison['n_images']} test images both runs scored ({comparison['resamples']} "
        f"resamples, seed {comparison['seed']}): difference = this run − the other, with its "
        f"{100 * comparison['confidence']:.0f} % interval; an interval that excludes 0 is a difference on this "
        "test set.",
        "",
        "| protocol | metric | this run | other | difference [interval] |",
        "|---|---|---|---|---|",
    ]
    for protocol, per_metric in comparison["protocols"].items():
        for name, entry in per_metric.items():
            lines.append(
                f"| {protocol} | {name} | {_fmt(entry['a'])} | {_fmt(entry['b'])} | "
                f"{_fmt(entry['difference'], 4)} [{_fmt(entry['low'], 4)}, {_fmt(entry['high'], 4)}] |"
            )
    return lines
