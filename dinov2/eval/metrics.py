"""Flat and hierarchical classification metrics, computed from the Tree.

Every metric is a pure function ``metric(y_true, y_pred, tree, ...) -> float`` in the style of
scikit-learn. ``y_true`` and ``y_pred`` are node indices into ``tree.nodes`` (leaves first, then
internal nodes). A label may be an internal node (a coarse annotation such as PBC's ``IG``); a
prediction is usually a leaf, but may be an internal node when a classifier was trained on
internal labels.

Conventions shared by all metrics:

* A prediction ``p`` is **correct** for a label ``t`` when ``p == t`` or ``p`` lies under ``t``
  (``t`` is an ancestor of ``p``): the annotation cannot judge finer levels than it names.
* ``A(n)`` is the ancestor set of node ``n`` *including* ``n`` and *excluding* the root, so
  ``|A(n)| = depth(n)`` and ``|A(t) ∩ A(p)| = depth(lca(t, p))``.
* **Flat metrics** (:func:`accuracy`, :func:`balanced_accuracy`, :func:`f1_weighted`,
  :func:`f1_macro`) use only the samples whose label is a leaf; a prediction counts as right
  only when it is that leaf. Samples labelled at internal nodes are scored separately by
  :func:`coarse_accuracy`.
* A metric with no sample to average over returns ``nan`` (never raises, never divides by zero);
  :func:`mistake_severity` with no mistakes is ``0.0``.
"""

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr
from sklearn.metrics import f1_score

from dinov2.errors import ConfigError, LabelError

NAN = float("nan")


def _as_indices(values, tree, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64).reshape(-1)
    bad = array[(array < 0) | (array >= len(tree.nodes))]
    if bad.size:
        raise LabelError(
            f"{what} holds {bad.size} value(s) that are not node indices of the tree "
            f"(0..{len(tree.nodes) - 1}), e.g. {int(bad[0])}"
        )
    return array


def _pair(y_true, y_pred, tree):
    y_true = _as_indices(y_true, tree, "y_true")
    y_pred = _as_indices(y_pred, tree, "y_pred")
    if y_true.shape != y_pred.shape:
        raise LabelError(f"y_true has {y_true.size} samples but y_pred has {y_pred.size}")
    return y_true, y_pred


def ancestor_matrix(tree) -> np.ndarray:
    """Boolean ``[nodes, nodes]`` matrix: ``M[n, a]`` is true when ``a`` ∈ A(n) (ancestor or self, root excluded)."""
    matrix = np.eye(len(tree.nodes), dtype=bool)
    for n, name in enumerate(tree.nodes):
        for ancestor in tree.ancestors(name):
            matrix[n, tree.index(ancestor)] = True
    return matrix


def is_correct(y_true, y_pred, tree) -> np.ndarray:
    """Per sample: the prediction equals the label or lies under it."""
    y_true, y_pred = _pair(y_true, y_pred, tree)
    return ancestor_matrix(tree)[y_pred, y_true]


def is_leaf_label(y_true, tree) -> np.ndarray:
    """Per sample: the label is a leaf (leaves come first in ``tree.nodes``)."""
    return _as_indices(y_true, tree, "y_true") < len(tree.leaves)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else NAN


def accuracy(y_true, y_pred, tree) -> float:
    """Fraction of leaf-labelled samples whose prediction is exactly their leaf; nan without any."""
    y_true, y_pred = _pair(y_true, y_pred, tree)
    leaf = is_leaf_label(y_true, tree)
    return _mean(y_true[leaf] == y_pred[leaf])


def coarse_accuracy(y_true, y_pred, tree) -> float:
    """Fraction of internal-node-labelled samples whose prediction lies under (or is) the label; nan without any."""
    y_true, y_pred = _pair(y_true, y_pred, tree)
    internal = ~is_leaf_label(y_true, tree)
    return _mean(is_correct(y_true[internal], y_pred[internal], tree))


def class_recalls(y_true, y_pred, tree, classes: Sequence[int] | None = None) -> dict[int, float]:
    """Recall per label node c: ``|{i: t_i = c, p_i correct}| / |{i: t_i = c}|``.

    ``classes`` defaults to the label nodes present in ``y_true``; a requested class absent from
    ``y_true`` is left out of the result (its recall is undefined).
    """
    y_true, y_pred = _pair(y_true, y_pred, tree)
    correct = is_correct(y_true, y_pred, tree)
    wanted = np.unique(y_true) if classes is None else np.asarray(list(classes), dtype=np.int64)
    return {int(c): float(correct[y_true == c].mean()) for c in wanted if np.any(y_true == c)}


def balanced_accuracy(y_true, y_pred, tree) -> float:
    """Mean over the leaf classes present among leaf-labelled samples of their recall.

    ``(1/|C|) Σ_{c∈C} |{i: t_i = p_i = c}| / |{i: t_i = c}|`` with C the leaves occurring in ``y_true``
    (a class absent from the fold does not enter the mean); nan without leaf-labelled samples.
    """
    y_true, y_pred = _pair(y_true, y_pred, tree)
    leaf = is_leaf_label(y_true, tree)
    recalls = class_recalls(y_true[leaf], y_pred[leaf], tree)
    return float(np.mean(list(recalls.values()))) if recalls else NAN


def rare_balanced_accuracy(y_true, y_pred, tree, rare: Sequence[int]) -> float:
    """Balanced accuracy over the ``rare`` label nodes (leaf or internal) only.

    ``(1/|R'|) Σ_{c∈R'} recall(c)`` with R' the rare classes present in ``y_true``; recall uses the
    "correct" rule (prediction equal to or under the label), so coarse rare classes count too.
    nan when no rare class occurs.
    """
    recalls = class_recalls(y_true, y_pred, tree, classes=rare)
    return float(np.mean(list(recalls.values()))) if recalls else NAN


def rare_classes(y_true, tree, max_fraction: float = 0.02) -> list:
    """Label nodes holding fewer than ``max_fraction`` of the samples (sorted node indices)."""
    y_true = _as_indices(y_true, tree, "y_true")
    nodes, counts = np.unique(y_true, return_counts=True)
    return [int(n) for n, count in zip(nodes, counts) if count < max_fraction * y_true.size]


def _f1(y_true, y_pred, tree, average: str) -> float:
    y_true, y_pred = _pair(y_true, y_pred, tree)
    leaf = is_leaf_label(y_true, tree)
    if not leaf.any():
        return NAN
    labels = np.unique(y_true[leaf])
    return float(f1_score(y_true[leaf], y_pred[leaf], labels=labels, average=average, zero_division=0))


def f1_weighted(y_true, y_pred, tree) -> float:
    """Support-weighted mean of per-leaf F1 over the leaves present in the leaf-labelled ``y_true``.

    ``Σ_c (n_c/n) · 2·P_c·R_c/(P_c+R_c)``; an undefined precision (class never predicted) counts as 0.
    """
    return _f1(y_true, y_pred, tree, "weighted")


def f1_macro(y_true, y_pred, tree) -> float:
    """Unweighted mean of per-leaf F1 over the leaves present in the leaf-labelled ``y_true``."""
    return _f1(y_true, y_pred, tree, "macro")


def mistake_severity(y_true, y_pred, tree) -> float:
    """Mean number of edges from the label up to its lowest common ancestor with the prediction, over mistakes.

    ``mean_{i: p_i not correct} depth(t_i) − depth(lca(t_i, p_i))`` (root depth 0). A prediction
    above the label (coarser) is a mistake of ``depth(t) − depth(p)``. No mistakes → 0.0.
    """
    y_true, y_pred = _pair(y_true, y_pred, tree)
    ancestors = ancestor_matrix(tree)
    mistakes = ~ancestors[y_pred, y_true]
    if not mistakes.any():
        return 0.0
    t, p = y_true[mistakes], y_pred[mistakes]
    lca_depth = (ancestors[t] & ancestors[p]).sum(axis=1)
    return float((tree.node_depths[t] - lca_depth).mean())


def hierarchical_precision_recall_f1(y_true, y_pred, tree):
    """Kiritchenko's micro-averaged hierarchical precision, recall and F1.

    ``hP = Σ_i |A(t_i) ∩ A(p_i)| / Σ_i |A(p_i)|``, ``hR = Σ_i |A(t_i) ∩ A(p_i)| / Σ_i |A(t_i)|``,
    ``hF1 = 2·hP·hR/(hP+hR)``, with A(n) the ancestors of n including n, excluding the root.
    A correct prediction under an internal label is scored as the label itself (``A(p) := A(t)``):
    the levels below the annotation are unknown, not wrong. Empty input → (nan, nan, nan).
    """
    y_true, y_pred = _pair(y_true, y_pred, tree)
    if y_true.size == 0:
        return NAN, NAN, NAN
    ancestors = ancestor_matrix(tree)
    scored = np.where(ancestors[y_pred, y_true], y_true, y_pred)
    overlap = (ancestors[y_true] & ancestors[scored]).sum()
    depths = tree.node_depths
    precision = overlap / depths[scored].sum()
    recall = overlap / depths[y_true].sum()
    f1 = 0.0 if overlap == 0 else 2 * precision * recall / (precision + recall)
    return float(precision), float(recall), float(f1)


def accuracy_at_level(y_true, y_pred, tree, level: int) -> float:
    """Accuracy at one depth of the tree (level 1 = lineage).

    Over the samples whose label is at least ``level`` deep: fraction with
    ``at_level(p, level) == at_level(t, level)``. A prediction shallower than ``level`` is wrong
    there; labels shallower than ``level`` are excluded. nan when no label is that deep.
    """
    if level < 1:
        raise ConfigError(f"level must be 1 (lineage) or deeper, got {level}")
    y_true, y_pred = _pair(y_true, y_pred, tree)
    depths = tree.node_depths
    deep = depths[y_true] >= level
    if not deep.any():
        return NAN
    ancestors = ancestor_matrix(tree)
    at_level = ancestors & (depths[None, :] == level)  # row n: ancestor-or-self of n at ``level``
    t, p = y_true[deep], y_pred[deep]
    return float((at_level[t] == at_level[p]).all(axis=1).mean())


def accuracy_per_level(y_true, y_pred, tree) -> dict[int, float]:
    """``{level: accuracy_at_level}`` for every level 1..max depth of the tree."""
    return {level: accuracy_at_level(y_true, y_pred, tree, level) for level in range(1, tree.max_depth + 1)}


def node_recall(y_true, y_pred, tree) -> np.ndarray:
    """Recall of every node n of ``tree.nodes``: among samples labelled at or under n, the fraction predicted under n.

    Samples labelled above n (coarser) do not count for n. nan for nodes without such samples.
    """
    y_true, y_pred = _pair(y_true, y_pred, tree)
    ancestors = ancestor_matrix(tree)
    under_true = ancestors[y_true]  # [samples, nodes]: n ∈ A(t)
    under_pred = ancestors[y_pred]
    support = under_true.sum(axis=0)
    hits = (under_true & under_pred).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, hits / np.maximum(support, 1), np.nan)


def tree_feature_correlation(y_true, features, tree, metric: str = "euclidean") -> float:
    """Spearman correlation between tree distances and class-centroid feature distances.

    For every pair of label nodes (a, b) present in ``y_true``: ``tree.distance(a, b)`` (edges via
    the LCA) against ``metric`` distance between the mean features of a and b;
    ``scipy.stats.spearmanr`` over the pairs. nan with fewer than 3 classes or constant distances.
    """
    y_true = _as_indices(y_true, tree, "y_true")
    features = np.asarray(features, dtype=np.float64)
    if features.shape[0] != y_true.size:
        raise LabelError(f"features has {features.shape[0]} rows but y_true has {y_true.size} samples")
    classes = np.unique(y_true)
    if classes.size < 3:
        return NAN
    centroids = np.stack([features[y_true == c].mean(axis=0) for c in classes])
    names = [tree.nodes[c] for c in classes]
    tree_distances = [tree.distance(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    feature_distances = pdist(centroids, metric=metric)  # same (i < j) pair order
    if np.ptp(tree_distances) == 0 or np.ptp(feature_distances) == 0:
        return NAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = spearmanr(tree_distances, feature_distances).statistic
    return float(rho)


def classification_metrics(y_true, y_pred, tree, rare: Sequence[int] = ()) -> dict[str, float]:
    """All per-fold metrics of one protocol as a flat ``{name: value}`` dict (levels as ``level_<k>_accuracy``)."""
    h_precision, h_recall, h_f1 = hierarchical_precision_recall_f1(y_true, y_pred, tree)
    metrics = {
        "accuracy": accuracy(y_true, y_pred, tree),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, tree),
        "f1_weighted": f1_weighted(y_true, y_pred, tree),
        "f1_macro": f1_macro(y_true, y_pred, tree),
        "coarse_accuracy": coarse_accuracy(y_true, y_pred, tree),
        "mistake_severity": mistake_severity(y_true, y_pred, tree),
        "hierarchical_precision": h_precision,
        "hierarchical_recall": h_recall,
        "hierarchical_f1": h_f1,
        "rare_balanced_accuracy": rare_balanced_accuracy(y_true, y_pred, tree, rare),
    }
    for level, value in accuracy_per_level(y_true, y_pred, tree).items():
        metrics[f"level_{level}_accuracy"] = value
    return metrics
