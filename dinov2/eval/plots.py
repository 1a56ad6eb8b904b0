"""Evaluation figures drawn with matplotlib (Agg backend): confusion matrix in tree order, the tree
coloured by per-node recall, and a 2-D embedding (UMAP where umap-learn is installed, else PCA)
coloured by lineage and by data set."""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from dinov2.errors import ConfigError  # noqa: E402
from dinov2.eval.metrics import node_recall  # noqa: E402
from dinov2.hierarchy import ROOT  # noqa: E402

RECALL_COLORMAP = "RdYlGn"
NO_SAMPLES_COLOR = "0.8"
EMBEDDINGS = ("auto", "umap", "pca")
MAX_EMBEDDED = 5000
UMAP_MIN_POINTS = 16  # below this UMAP's neighbour graph is degenerate: PCA


def confusion_in_tree_order(y_true, y_pred, tree):
    """``(node names, counts[label row, prediction column])`` over the nodes that occur, in pre-order."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = set(y_true.tolist()) | set(y_pred.tolist())
    names = [name for name in tree.preorder() if tree.index(name) in present]
    position = {tree.index(name): i for i, name in enumerate(names)}
    counts = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(counts, ([position[t] for t in y_true.tolist()], [position[p] for p in y_pred.tolist()]), 1)
    return names, counts


def plot_confusion(y_true, y_pred, tree, path: Path, title: str, hierarchical: bool = True) -> None:
    """Row-normalised confusion matrix (colour) with counts, rows/columns in tree order, lineages separated
    (``hierarchical``)."""
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
    for i in range(1, len(names) if hierarchical else 0):
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


def embed_2d(features, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """``([N, 2] points, method name)``: UMAP (umap-learn, as in the paper's figures) for ``auto`` when it is
    installed and for ``umap``; PCA (scikit-learn) for ``pca`` or when umap-learn is missing."""
    features = np.asarray(features, dtype=np.float32)
    if method not in EMBEDDINGS:
        raise ConfigError(f"unknown embedding {method!r}; choose from {', '.join(EMBEDDINGS)}")
    use_umap = method == "umap" or (method == "auto" and importlib.util.find_spec("umap") is not None)
    if method == "umap" and importlib.util.find_spec("umap") is None:
        raise ConfigError("--embedding umap needs umap-learn: pip install 'dino_hier[umap]' (or umap-learn)")
    if features.shape[0] < 3:
        return np.zeros((features.shape[0], 2)), "PCA"
    if use_umap and features.shape[0] > UMAP_MIN_POINTS:
        import umap  # imported here: umap-learn is optional and its import (numba) takes seconds

        reducer = umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=seed, n_jobs=1)
        return reducer.fit_transform(features), "UMAP"
    return PCA(n_components=2, random_state=seed).fit_transform(features), "PCA"


def _scatter(ax, points, groups, names, title):
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for i, name in enumerate(names):
        chosen = groups == name
        ax.scatter(
            points[chosen, 0],
            points[chosen, 1],
            s=6,
            alpha=0.7,
            color=colors(i % colors.N),
            label=f"{name} ({chosen.sum()})",
        )
    ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_title(title, fontsize=10)


def plot_embedding(
    features, y_true, tree, datasets, path: Path, method: str = "auto", seed: int = 0, hierarchical: bool = True
) -> str:
    """2-D embedding (:func:`embed_2d`) of the features, coloured by lineage (level-1 node; by class without a
    hierarchy) and, when ``datasets`` holds several names, a second panel of the same points coloured by
    data set, where a domain shift shows. At most :data:`MAX_EMBEDDED` points (a seeded sample). Returns
    the method used."""
    features = np.asarray(features, dtype=np.float32)
    y_true, datasets = np.asarray(y_true), np.asarray(datasets, dtype=str)
    shown = np.arange(features.shape[0])
    if shown.size > MAX_EMBEDDED:
        shown = np.sort(np.random.default_rng(seed).choice(shown.size, MAX_EMBEDDED, replace=False))
    points, used = embed_2d(features[shown], method, seed)
    groups = np.array([tree.at_level(tree.nodes[t], 1) for t in y_true[shown].tolist()])
    names: Sequence[str] = [n for n in tree.children(ROOT) if n in set(groups.tolist())]
    dataset_names = sorted(set(datasets[shown].tolist()))
    panels = 2 if len(dataset_names) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 6), squeeze=False)
    sample = f", {shown.size} of {features.shape[0]} images" if shown.size < features.shape[0] else ""
    kind = "lineage" if hierarchical else "class"
    _scatter(axes[0, 0], points, groups, names, f"{used} of the features{sample}, coloured by {kind}")
    if panels == 2:
        _scatter(axes[0, 1], points, datasets[shown], dataset_names, f"the same {used}, coloured by data set")
    for ax in axes[0]:
        ax.set_xlabel(f"{used} 1")
        ax.set_ylabel(f"{used} 2")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return used
