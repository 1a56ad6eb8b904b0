"""Evaluation figures drawn with matplotlib (Agg backend): confusion matrix in tree order, the tree
coloured by per-node recall, and a 2-D PCA embedding coloured by lineage."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from dinov2.eval.metrics import node_recall  # noqa: E402
from dinov2.hierarchy import ROOT  # noqa: E402

RECALL_COLORMAP = "RdYlGn"
NO_SAMPLES_COLOR = "0.8"


def confusion_in_tree_order(y_true, y_pred, tree):
    """``(node names, counts[label row, prediction column])`` over the nodes that occur, in pre-order."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = set(y_true.tolist()) | set(y_pred.tolist())
    names = [name for name in tree.preorder() if tree.index(name) in present]
    position = {tree.index(name): i for i, name in enumerate(names)}
    counts = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(counts, ([position[t] for t in y_true.tolist()], [position[p] for p in y_pred.tolist()]), 1)
    return names, counts


def plot_confusion(y_true, y_pred, tree, path: Path, title: str) -> None:
    """Row-normalised confusion matrix (colour) with counts, rows/columns in tree order, lineages separated."""
    names, counts = confusion_in_tree_order(y_true, y_pred, tree)
    rows = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = max(5.0, 0.42 * len(names) + 3.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    ticks = [_label_name(tree, n) for n in names]
    ax.set_xticks(range(len(names)), ticks, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), ticks, fontsize=8)
    ax.set_xlabel("predicted node (* = internal node)")
    ax.set_ylabel("label node (* = internal: correct when predicted under it)")
    for i in range(len(names)):
        for j in range(len(names)):
            if counts[i, j]:
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if fraction[i, j] > 0.6 else "black",
                )
    lineages = [tree.at_level(name, 1) for name in names]
    for i in range(1, len(names)):
        if lineages[i] != lineages[i - 1]:
            ax.axhline(i - 0.5, color="0.3", linewidth=0.8)
            ax.axvline(i - 0.5, color="0.3", linewidth=0.8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the label's samples")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label_name(tree, name: str) -> str:
    return name if tree.is_leaf(name) else f"{name} *"


def tree_layout(tree):
    """``{node: (x, y)}``: leaves at x = 0, 1, ... in logit order, a parent above its children's mean, y = -depth."""
    position = {}
    for i, leaf in enumerate(tree.leaves):
        position[leaf] = (float(i), -float(tree.depth(leaf)))
    for name in reversed(tree.preorder()):  # children before parents
        if not tree.is_leaf(name):
            xs = [position[child][0] for child in tree.children(name)]
            position[name] = (float(np.mean(xs)), -float(tree.depth(name)))
    top = [position[child][0] for child in tree.children(ROOT)]
    position[ROOT] = (float(np.mean(top)), 0.0)
    return position


def plot_tree_recall(y_true, y_pred, tree, path: Path, title: str) -> None:
    """The hierarchy with every node coloured by its recall (:func:`dinov2.eval.metrics.node_recall`);
    grey nodes have no sample labelled at or under them."""
    recall = node_recall(y_true, y_pred, tree)
    position = tree_layout(tree)
    cmap = plt.get_cmap(RECALL_COLORMAP)
    width = max(7.0, 0.45 * len(tree.leaves) + 2.0)
    fig, ax = plt.subplots(figsize=(width, 1.3 * tree.max_depth + 3.0))
    for name in tree.preorder():
        parent = tree.parent(name)
        (x0, y0), (x1, y1) = position[parent], position[name]
        ax.plot([x0, x1], [y0, y1], color="0.6", linewidth=0.8, zorder=1)
    ax.scatter(*position[ROOT], s=60, color="0.3", zorder=2)
    for name in tree.preorder():
        x, y = position[name]
        value = recall[tree.index(name)]
        color = NO_SAMPLES_COLOR if np.isnan(value) else cmap(value)
        ax.scatter(x, y, s=230, color=color, edgecolors="0.2", linewidths=0.6, zorder=3)
        if not np.isnan(value):  # recall in percent, white on the dark ends of the colour map
            ax.text(
                x,
                y,
                f"{100 * value:.0f}",
                ha="center",
                va="center",
                fontsize=6.5,
                zorder=4,
                color="white" if value < 0.2 or value > 0.85 else "black",
            )
        if tree.is_leaf(name):
            ax.text(x, y - 0.18, name, rotation=90, ha="center", va="top", fontsize=8)
        else:
            ax.text(
                x + 0.1,
                y + 0.14,
                name,
                rotation=28,
                rotation_mode="anchor",
                ha="left",
                va="bottom",
                fontsize=7,
                color="0.15",
            )
    ax.set_ylim(-tree.max_depth - 2.6, 0.9)
    ax.set_xlim(-1, len(tree.leaves))
    ax.axis("off")
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 100))
    fig.colorbar(mappable, ax=ax, fraction=0.025, pad=0.01, label="recall % (grey: no samples)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_embedding(
    features, y_true, tree, path: Path, title: str = "PCA of the features, coloured by lineage", seed: int = 0
) -> None:
    """2-D PCA (scikit-learn) of the features; colour = lineage (level-1 node) of each sample's label."""
    features = np.asarray(features, dtype=np.float32)
    points = (
        PCA(n_components=2, random_state=seed).fit_transform(features)
        if features.shape[0] > 1
        else np.zeros((features.shape[0], 2))
    )
    lineages = np.array([tree.at_level(tree.nodes[t], 1) for t in np.asarray(y_true).tolist()])
    names: Sequence[str] = [n for n in tree.children(ROOT) if n in set(lineages.tolist())]
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for i, name in enumerate(names):
        chosen = lineages == name
        ax.scatter(
            points[chosen, 0], points[chosen, 1], s=8, alpha=0.7, color=colors(i), label=f"{name} ({chosen.sum()})"
        )
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8, markerscale=2, loc="best")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
