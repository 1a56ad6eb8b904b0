"""Flat and hierarchical classification metrics, computed from the Tree.

Every metric is a pure function ``metric(y_true, y_pred, tree, ..., sample_weight=None) -> float`` in
the style of scikit-learn. ``y_true`` and ``y_pred`` are node indices into ``tree.nodes`` (leaves
first, then internal nodes). A label may be an internal node (a coarse annotation such as PBC's
``IG`` or the five-class sets' ``Neutrophil``); a prediction is usually a leaf, but may be an
internal node when a classifier was trained on internal labels.

Conventions shared by all metrics:

* A prediction ``p`` is **correct** for a label ``t`` when ``p == t`` or ``p`` lies under ``t``
  (``t`` is an ancestor of ``p``): the annotation cannot judge finer levels than it names.
* **Every labelled sample counts** in every metric, whatever the depth of its label.
  :func:`coarse_accuracy` additionally reports the samples labelled at internal nodes alone.
* The **label nodes** of a data set are the distinct values of ``y_true``; balanced accuracy and
  F1 average over them.
* ``A(n)`` is the ancestor set of node ``n`` *including* ``n`` and *excluding* the root, so
  ``|A(n)| = depth(n)`` and ``|A(t) ∩ A(p)| = depth(lca(t, p))``.
* A metric with no sample to average over returns ``nan`` (never raises, never divides by zero);
  :func:`mistake_severity` with no mistakes is ``0.0``.

Each metric is written as a function of weighted sums ``S = Σ_i w_i · s_i`` of integer per-sample
statistics ``s_i`` (:class:`Metric`). ``sample_weight`` (``[n]`` or ``[B, n]``, e.g. bootstrap
draw counts) sets ``w``; with a ``[B, n]`` matrix a metric returns ``B`` values from one matrix
product, and :mod:`dinov2.eval.bootstrap` stacks the statistics of every metric into one product.
"""

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

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


def sample_weights(sample_weight, n: int) -> tuple[np.ndarray, bool]:
    """``([B, n] float64 weights, whether a single value is wanted)``; None = one row of ones."""
    if sample_weight is None:
        return np.ones((1, n)), True
    weights = np.asarray(sample_weight, dtype=np.float64)
    single = weights.ndim == 1
    weights = weights.reshape(1, -1) if single else weights
    if weights.ndim != 2 or weights.shape[1] != n:
        raise LabelError(f"sample_weight has shape {np.shape(sample_weight)} but there are {n} samples")
    return weights, single


def _ratio(numerator, denominator, empty: float = NAN) -> np.ndarray:
    """``numerator / denominator`` elementwise, ``empty`` where the denominator is 0."""
    numerator, denominator = np.broadcast_arrays(np.asarray(numerator, float), np.asarray(denominator, float))
    return np.divide(numerator, denominator, out=np.full(numerator.shape, empty), where=denominator > 0)


def _mean_over_present(values: np.ndarray) -> np.ndarray:
    """Row means over the non-nan entries; nan for a row without any."""
    present = ~np.isnan(values)
    return _ratio(np.where(present, values, 0.0).sum(axis=1), present.sum(axis=1))


@dataclass(frozen=True)
class Statistics:
    """Per-sample statistics ``columns [n, k]`` (small integers) and ``combine``, which turns their
    weighted sums ``[B, k]`` into ``B`` metric values."""

    columns: np.ndarray
    combine: Callable[[np.ndarray], np.ndarray]


class Metric:
    """A metric ``fn(y_true, y_pred, tree, *args, sample_weight=None)`` defined by a function that returns
    its :class:`Statistics`. ``statistics(...)`` exposes them; ``bind(**kwargs)`` fixes extra arguments."""

    def __init__(self, define: Callable[..., Statistics], **bound) -> None:
        functools.update_wrapper(self, define)
        self.define = define
        self.bound = bound

    def statistics(self, y_true, y_pred, tree, *args, **kwargs) -> Statistics:
        y_true, y_pred = _pair(y_true, y_pred, tree)
        return self.define(y_true, y_pred, tree, *args, **{**self.bound, **kwargs})

    def __call__(self, y_true, y_pred, tree, *args, sample_weight=None, **kwargs):
        stats = self.statistics(y_true, y_pred, tree, *args, **kwargs)
        weights, single = sample_weights(sample_weight, stats.columns.shape[0])
        values = stats.combine(weights @ stats.columns.astype(np.float64))
        return float(values[0]) if single else values

    def bind(self, **kwargs) -> "Metric":
        return Metric(self.define, **{**self.bound, **kwargs})

    def __repr__(self) -> str:
        bound = ", ".join(f"{k}={v!r}" for k, v in self.bound.items())
        return f"Metric({self.__name__}{', ' + bound if bound else ''})"


MetricFunction = Metric | Callable[..., float | np.ndarray]
"""``fn(y_true, y_pred, tree, sample_weight=None)``: a float, or ``[B]`` values for ``[B, n]`` weights."""


def _fraction(hit: np.ndarray, counted: np.ndarray | None = None) -> Statistics:
    """``Σ w·hit·counted / Σ w·counted`` (nan when nothing is counted)."""
    counted = np.ones(hit.shape, dtype=bool) if counted is None else counted
    return Statistics(np.stack([hit & counted, counted], axis=1), lambda s: _ratio(s[:, 0], s[:, 1]))


@functools.lru_cache(maxsize=16)
def _ancestor_matrix(tree) -> np.ndarray:
    matrix = np.eye(len(tree.nodes), dtype=bool)
    for n, name in enumerate(tree.nodes):
        for ancestor in tree.ancestors(name):
            matrix[n, tree.index(ancestor)] = True
    matrix.flags.writeable = False
    return matrix


def ancestor_matrix(tree) -> np.ndarray:
    """Boolean ``[nodes, nodes]`` matrix: ``M[n, a]`` is true when ``a`` ∈ A(n) (ancestor or self, root excluded)."""
    return _ancestor_matrix(tree)


def is_correct(y_true, y_pred, tree) -> np.ndarray:
    """Per sample: the prediction equals the label or lies under it."""
    y_true, y_pred = _pair(y_true, y_pred, tree)
    return ancestor_matrix(tree)[y_pred, y_true]


def is_leaf_label(y_true, tree) -> np.ndarray:
    """Per sample: the label is a leaf (leaves come first in ``tree.nodes``)."""
    return _as_indices(y_true, tree, "y_true") < len(tree.leaves)


@Metric
def accuracy(y_true, y_pred, tree) -> Statistics:
    """Fraction of samples whose prediction is correct (equal to the label or under it); nan without samples."""
    return _fraction(is_correct(y_true, y_pred, tree))


@Metric
def coarse_accuracy(y_true, y_pred, tree) -> Statistics:
    """Accuracy over the samples labelled at internal nodes alone; nan without any."""
    return _fraction(is_correct(y_true, y_pred, tree), ~is_leaf_label(y_true, tree))


def _mean_recall(y_true, y_pred, tree, classes) -> Statistics:
    """Mean over ``classes`` present (weight > 0) of ``Σ w·[t = c]·correct / Σ w·[t = c]``."""
    members = y_true[:, None] == np.asarray(classes, dtype=np.int64)[None, :]  # [n, C]
    hits = members & is_correct(y_true, y_pred, tree)[:, None]
    count = members.shape[1]
    return Statistics(
        np.concatenate([hits, members], axis=1),
        lambda s: _mean_over_present(_ratio(s[:, :count], s[:, count:])),
    )


@Metric
def balanced_accuracy(y_true, y_pred, tree) -> Statistics:
    """Mean recall over the label nodes present (leaf or internal).

    ``(1/|C|) Σ_{c∈C} |{i: t_i = c, p_i correct}| / |{i: t_i = c}|`` with C the label nodes of
    ``y_true`` that have samples (a class absent from the fold does not enter the mean).
    """
    return _mean_recall(y_true, y_pred, tree, np.unique(y_true))


@Metric
def rare_balanced_accuracy(y_true, y_pred, tree, rare: Sequence[int]) -> Statistics:
    """Balanced accuracy over the ``rare`` label nodes (leaf or internal) only.

    ``(1/|R'|) Σ_{c∈R'} recall(c)`` with R' the rare classes present in ``y_true``; recall uses the
    "correct" rule (prediction equal to or under the label), so coarse rare classes count too.
    nan when no rare class occurs.
    """
    return _mean_recall(y_true, y_pred, tree, list(rare))


def rare_classes(y_true, tree, max_fraction: float = 0.02) -> list:
    """Label nodes holding fewer than ``max_fraction`` of the samples (sorted node indices)."""
    y_true = _as_indices(y_true, tree, "y_true")
    nodes, counts = np.unique(y_true, return_counts=True)
    return [int(n) for n, count in zip(nodes, counts) if count < max_fraction * y_true.size]


def prediction_at_label_nodes(y_true, y_pred, tree) -> np.ndarray:
    """Each prediction mapped onto the data set's label nodes (the values of ``y_true``), for F1.

    A correct prediction maps to its label; any other to the deepest label node at or above it,
    or to -1 when no label node is (the prediction then counts for no class: a false negative only).
    """
    y_true, y_pred = _pair(y_true, y_pred, tree)
    label_nodes = np.unique(y_true)
    ancestors = ancestor_matrix(tree)
    covering = ancestors[y_pred][:, label_nodes]  # [n, L]: label node at or above the prediction
    depth = np.where(covering, tree.node_depths[label_nodes][None, :], -1)
    above = label_nodes[depth.argmax(axis=1)] if label_nodes.size else np.zeros(y_true.size, dtype=np.int64)
    above = np.where(covering.any(axis=1), above, -1)
    return np.where(ancestors[y_pred, y_true], y_true, above)


def _f1(y_true, y_pred, tree, weighted: bool) -> Statistics:
    """Per label node c: ``F1_c = 2·TP_c / (n_c + m_c)`` with n_c the samples labelled c and m_c the
    predictions mapped to c (:func:`prediction_at_label_nodes`), averaged over the classes present."""
    mapped = prediction_at_label_nodes(y_true, y_pred, tree)
    classes = np.unique(y_true)
    labelled = y_true[:, None] == classes[None, :]
    predicted = mapped[:, None] == classes[None, :]
    count = classes.size

    def combine(sums):
        true_positives, support, predictions = sums[:, :count], sums[:, count : 2 * count], sums[:, 2 * count :]
        f1 = _ratio(2 * true_positives, support + predictions)
        if weighted:
            return _ratio(np.where(support > 0, f1 * support, 0.0).sum(axis=1), support.sum(axis=1))
        return _mean_over_present(np.where(support > 0, f1, NAN))

    return Statistics(np.concatenate([labelled & predicted, labelled, predicted], axis=1), combine)


@Metric
def f1_weighted(y_true, y_pred, tree) -> Statistics:
    """Support-weighted mean of per-class F1 over the label nodes present in ``y_true``.

    ``Σ_c (n_c/n) · 2·P_c·R_c/(P_c+R_c)`` with each prediction mapped onto the label nodes
    (:func:`prediction_at_label_nodes`); an undefined precision (class never predicted) counts as 0.
    """
    return _f1(y_true, y_pred, tree, weighted=True)


@Metric
def f1_macro(y_true, y_pred, tree) -> Statistics:
    """Unweighted mean of per-class F1 over the label nodes present in ``y_true`` (see :func:`f1_weighted`)."""
    return _f1(y_true, y_pred, tree, weighted=False)


@Metric
def mistake_severity(y_true, y_pred, tree) -> Statistics:
    """Mean number of edges from the label up to its lowest common ancestor with the prediction, over mistakes.

    ``mean_{i: p_i not correct} depth(t_i) − depth(lca(t_i, p_i))`` (root depth 0). A prediction
    above the label (coarser) is a mistake of ``depth(t) − depth(p)``. No mistakes → 0.0.
    """
    ancestors = ancestor_matrix(tree)
    mistakes = ~ancestors[y_pred, y_true]
    lca_depth = (ancestors[y_true] & ancestors[y_pred]).sum(axis=1)
    severity = np.where(mistakes, tree.node_depths[y_true] - lca_depth, 0)
    return Statistics(np.stack([severity, mistakes], axis=1), lambda s: _ratio(s[:, 0], s[:, 1], empty=0.0))


def _hierarchical(y_true, y_pred, tree, which: str) -> Statistics:
    """Columns ``|A(t) ∩ A(p')|, |A(p')|, |A(t)|`` with p' = t for a correct prediction."""
    ancestors = ancestor_matrix(tree)
    scored = np.where(ancestors[y_pred, y_true], y_true, y_pred)
    overlap = (ancestors[y_true] & ancestors[scored]).sum(axis=1)
    depths = tree.node_depths

    def combine(sums):
        overlap, predicted, true = sums[:, 0], sums[:, 1], sums[:, 2]
        precision, recall = _ratio(overlap, predicted), _ratio(overlap, true)
        if which == "precision":
            return precision
        if which == "recall":
            return recall
        f1 = _ratio(2 * precision * recall, precision + recall)
        return np.where(overlap > 0, f1, np.where(true > 0, 0.0, NAN))

    return Statistics(np.stack([overlap, depths[scored], depths[y_true]], axis=1), combine)


@Metric
def hierarchical_precision(y_true, y_pred, tree) -> Statistics:
    """Kiritchenko's micro-averaged hierarchical precision ``hP = Σ_i |A(t_i) ∩ A(p_i)| / Σ_i |A(p_i)|``.

    A(n) holds the ancestors of n including n, excluding the root. A correct prediction under an
    internal label is scored as the label itself (``A(p) := A(t)``): the levels below the
    annotation are unknown, not wrong. nan without samples.
    """
    return _hierarchical(y_true, y_pred, tree, "precision")


@Metric
def hierarchical_recall(y_true, y_pred, tree) -> Statistics:
    """Hierarchical recall ``hR = Σ_i |A(t_i) ∩ A(p_i)| / Σ_i |A(t_i)|`` (see :func:`hierarchical_precision`)."""
    return _hierarchical(y_true, y_pred, tree, "recall")


@Metric
def hierarchical_f1(y_true, y_pred, tree) -> Statistics:
    """``hF1 = 2·hP·hR/(hP+hR)``; 0 when no prediction shares an ancestor with its label, nan without samples."""
    return _hierarchical(y_true, y_pred, tree, "f1")


def hierarchical_precision_recall_f1(y_true, y_pred, tree, sample_weight=None):
    """``(hP, hR, hF1)``; see :func:`hierarchical_precision`. Empty input → (nan, nan, nan)."""
    return tuple(
        fn(y_true, y_pred, tree, sample_weight=sample_weight)
        for fn in (hierarchical_precision, hierarchical_recall, hierarchical_f1)
    )


@Metric
def accuracy_at_level(y_true, y_pred, tree, level: int) -> Statistics:
    """Accuracy at one depth of the tree (level 1 = lineage).

    Over the samples whose label is at least ``level`` deep: fraction with
    ``at_level(p, level) == at_level(t, level)``. A prediction shallower than ``level`` is wrong
    there; labels shallower than ``level`` are excluded. nan when no label is that deep.
    """
    if level < 1:
        raise ConfigError(f"level must be 1 (lineage) or deeper, got {level}")
    depths = tree.node_depths
    at_level = ancestor_matrix(tree) & (depths[None, :] == level)  # row n: ancestor-or-self of n at ``level``
    return _fraction((at_level[y_true] == at_level[y_pred]).all(axis=1), depths[y_true] >= level)


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
    return _ratio((under_true & under_pred).sum(axis=0), under_true.sum(axis=0))


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


def metric_functions(tree, rare: Sequence[int] = (), hierarchical: bool = True) -> dict[str, Metric]:
    """``{name: fn(y_true, y_pred, tree, sample_weight=None)}`` of every per-fold metric, in report order.

    ``hierarchical=False`` (a flat set of classes, no tree) keeps the flat metrics and the rare-class
    balanced accuracy only; otherwise also coarse accuracy, mistake severity, hP/hR/hF1 and
    ``level_<k>_accuracy`` for every level of ``tree``.
    """
    functions = {fn.__name__: fn for fn in (accuracy, balanced_accuracy, f1_weighted, f1_macro)}
    if hierarchical:
        hierarchical_ones = (coarse_accuracy, mistake_severity, hierarchical_precision, hierarchical_recall)
        functions.update({fn.__name__: fn for fn in (*hierarchical_ones, hierarchical_f1)})
    functions["rare_balanced_accuracy"] = rare_balanced_accuracy.bind(rare=tuple(int(r) for r in rare))
    if hierarchical:
        for level in range(1, tree.max_depth + 1):
            functions[f"level_{level}_accuracy"] = accuracy_at_level.bind(level=level)
    return functions


def classification_metrics(
    y_true, y_pred, tree, rare: Sequence[int] = (), hierarchical: bool = True, sample_weight=None
) -> dict[str, float]:
    """All per-fold metrics of one protocol as a flat ``{name: value}`` dict (see :func:`metric_functions`)."""
    return {
        name: fn(y_true, y_pred, tree, sample_weight=sample_weight)
        for name, fn in metric_functions(tree, rare, hierarchical).items()
    }
