"""Metrics on hand-made cases with known answers, and hP/hR/hF1 against a set-based computation."""

import math

import numpy as np
import pytest

from dinov2.errors import LabelError
from dinov2.eval import metrics
from dinov2.hierarchy import Tree

# Unbalanced: leaves at depths 4, 4, 3, 2 and 1.
NESTED = {
    "myeloid": {"granulocyte": {"neutrophil": ["band", "segmented"], "eosinophil": None}, "monocyte": None},
    "platelet": None,
}


@pytest.fixture(scope="module")
def tree():
    return Tree.from_nested(NESTED)


def ids(tree, names):
    return np.array([tree.index(n) for n in names])


@pytest.fixture(scope="module")
def case(tree):
    # One internal-node label (neutrophil) predicted as a leaf under it: correct.
    y_true = ids(tree, ["band", "band", "segmented", "platelet", "neutrophil", "monocyte"])
    y_pred = ids(tree, ["band", "segmented", "segmented", "monocyte", "band", "platelet"])
    return y_true, y_pred


def test_flat_metrics_use_leaf_labels_only(tree, case):
    y_true, y_pred = case
    assert metrics.accuracy(y_true, y_pred, tree) == pytest.approx(2 / 5)
    # recalls: band 1/2, segmented 1, platelet 0, monocyte 0
    assert metrics.balanced_accuracy(y_true, y_pred, tree) == pytest.approx(0.375)
    # F1: band 2/3, segmented 2/3, platelet 0, monocyte 0; supports 2, 1, 1, 1
    assert metrics.f1_macro(y_true, y_pred, tree) == pytest.approx(1 / 3)
    assert metrics.f1_weighted(y_true, y_pred, tree) == pytest.approx(2 / 5)
    assert metrics.coarse_accuracy(y_true, y_pred, tree) == 1.0


def test_mistake_severity(tree, case):
    y_true, y_pred = case
    # band->segmented: 1 edge to neutrophil; platelet->monocyte: 1 to root; monocyte->platelet: 2 to root
    assert metrics.mistake_severity(y_true, y_pred, tree) == pytest.approx(4 / 3)
    assert metrics.mistake_severity(y_true, y_true, tree) == 0.0
    # a coarser prediction above the label is a mistake: band -> neutrophil is 1 edge
    assert metrics.mistake_severity(ids(tree, ["band"]), ids(tree, ["neutrophil"]), tree) == 1.0


def test_hierarchical_precision_recall(tree, case):
    y_true, y_pred = case
    # overlaps 4,3,4,0,3,0 = 14; |A(p)| 4,4,4,2,3(scored as label),1 = 18; |A(t)| 4,4,4,1,3,2 = 18
    hp, hr, hf = metrics.hierarchical_precision_recall_f1(y_true, y_pred, tree)
    assert (hp, hr, hf) == pytest.approx((14 / 18, 14 / 18, 14 / 18))
    hp, hr, hf = metrics.hierarchical_precision_recall_f1(ids(tree, ["band"]), ids(tree, ["neutrophil"]), tree)
    assert (hp, hr) == pytest.approx((1.0, 3 / 4))
    assert hf == pytest.approx(2 * 0.75 / 1.75)
    assert metrics.hierarchical_precision_recall_f1(ids(tree, ["platelet"]), ids(tree, ["band"]), tree)[2] == 0.0


def test_accuracy_per_level_excludes_shallow_labels(tree, case):
    y_true, y_pred = case
    levels = metrics.accuracy_per_level(y_true, y_pred, tree)
    assert levels == pytest.approx({1: 4 / 6, 2: 4 / 5, 3: 1.0, 4: 2 / 3})
    assert math.isnan(metrics.accuracy_at_level(ids(tree, ["platelet"]), ids(tree, ["platelet"]), tree, 2))


def test_rare_balanced_accuracy_order_and_absent_classes(tree, case):
    y_true, y_pred = case
    rare = ids(tree, ["neutrophil", "platelet", "eosinophil"])  # eosinophil absent: left out of the mean
    assert metrics.rare_balanced_accuracy(y_true, y_pred, tree, rare) == pytest.approx(0.5)
    assert math.isnan(metrics.rare_balanced_accuracy(y_true, y_pred, tree, []))
    # label monocyte predicted platelet once; swapping the arguments would score platelet (0) instead
    only = ids(tree, ["monocyte"])
    assert (
        metrics.rare_balanced_accuracy(
            ids(tree, ["monocyte", "monocyte"]), ids(tree, ["monocyte", "platelet"]), tree, only
        )
        == 0.5
    )
    assert metrics.rare_classes(y_true, tree, max_fraction=0.2) == sorted(
        ids(tree, ["segmented", "platelet", "neutrophil", "monocyte"]).tolist()
    )


def test_node_recall(tree, case):
    y_true, y_pred = case
    recall = metrics.node_recall(y_true, y_pred, tree)
    assert recall[tree.index("band")] == 0.5
    assert recall[tree.index("neutrophil")] == 1.0
    assert recall[tree.index("myeloid")] == pytest.approx(4 / 5)
    assert recall[tree.index("platelet")] == 0.0
    assert math.isnan(recall[tree.index("eosinophil")])


def test_empty_and_internal_only_inputs_give_nan(tree):
    empty = np.array([], dtype=np.int64)
    for metric in (metrics.accuracy, metrics.balanced_accuracy, metrics.f1_macro, metrics.coarse_accuracy):
        assert math.isnan(metric(empty, empty, tree))
    coarse = ids(tree, ["neutrophil"])
    assert math.isnan(metrics.accuracy(coarse, ids(tree, ["band"]), tree))
    assert metrics.mistake_severity(empty, empty, tree) == 0.0
    assert all(math.isnan(v) for v in metrics.hierarchical_precision_recall_f1(empty, empty, tree))


def test_bad_indices_are_loud(tree):
    with pytest.raises(LabelError, match="not node indices"):
        metrics.accuracy([0, 99], [0, 0], tree)
    with pytest.raises(LabelError, match="samples"):
        metrics.accuracy([0, 1], [0], tree)


def _set_based_hierarchical(y_true, y_pred, tree):
    """Kiritchenko with explicit sets; a prediction under the label is scored as the label."""
    overlap = predicted = true = 0
    for t, p in zip(y_true, y_pred):
        t_name, p_name = tree.nodes[t], tree.nodes[p]
        true_set = set(tree.ancestors(t_name)) | {t_name}
        pred_set = set(tree.ancestors(p_name)) | {p_name}
        if t_name in pred_set:
            pred_set = true_set
        overlap += len(true_set & pred_set)
        predicted += len(pred_set)
        true += len(true_set)
    precision, recall = overlap / predicted, overlap / true
    return precision, recall, 2 * precision * recall / (precision + recall)


def test_hierarchical_matches_set_based_computation(tree):
    rng = np.random.default_rng(0)
    for _ in range(5):
        y_true = rng.integers(0, len(tree.nodes), size=200)
        y_pred = rng.integers(0, len(tree.nodes), size=200)
        expected = _set_based_hierarchical(y_true, y_pred, tree)
        assert metrics.hierarchical_precision_recall_f1(y_true, y_pred, tree) == pytest.approx(expected)


def test_tree_feature_correlation(tree):
    # Path-indicator features: squared distance between centroids = tree distance, so rho = 1.
    names = ["band", "segmented", "eosinophil", "monocyte", "platelet", "neutrophil"]
    labels = np.repeat(ids(tree, names), 3)
    ancestors = metrics.ancestor_matrix(tree).astype(float)
    features = ancestors[labels]
    assert metrics.tree_feature_correlation(labels, features, tree) == pytest.approx(1.0)
    # band, segmented, platelet at 0, 10, 1: tree distances (2, 5, 5) vs feature distances (10, 1, 9)
    three = ids(tree, ["band", "segmented", "platelet"])
    assert metrics.tree_feature_correlation(three, [[0.0], [10.0], [1.0]], tree) == pytest.approx(-math.sqrt(3) / 2)
    assert math.isnan(metrics.tree_feature_correlation(ids(tree, ["band", "platelet"]), np.eye(2), tree))


def test_classification_metrics_keys(tree, case):
    y_true, y_pred = case
    result = metrics.classification_metrics(y_true, y_pred, tree, rare=ids(tree, ["platelet"]))
    assert result["rare_balanced_accuracy"] == 0.0
    assert {f"level_{k}_accuracy" for k in (1, 2, 3, 4)} <= set(result)
    assert result["hierarchical_f1"] == pytest.approx(14 / 18)
