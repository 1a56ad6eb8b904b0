"""Metrics on hand-made cases with known answers, and hP/hR/hF1 against a set-based computation."""

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from dinov2.config.custom_hier import get_tree, resolve_labels
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


def test_flat_metrics_count_every_labelled_sample(tree, case):
    y_true, y_pred = case
    # correct: band, segmented, band under neutrophil; wrong: band->segmented, platelet, monocyte
    assert metrics.accuracy(y_true, y_pred, tree) == pytest.approx(3 / 6)
    # recalls over the label nodes present: band 1/2, segmented 1, platelet 0, neutrophil 1, monocyte 0
    assert metrics.balanced_accuracy(y_true, y_pred, tree) == pytest.approx(2.5 / 5)
    # predictions mapped onto the label nodes: band, segmented, segmented, monocyte, neutrophil, platelet
    assert (
        metrics.prediction_at_label_nodes(y_true, y_pred, tree).tolist()
        == ids(tree, ["band", "segmented", "segmented", "monocyte", "neutrophil", "platelet"]).tolist()
    )
    # F1: band 2/3, segmented 2/3, platelet 0, neutrophil 1, monocyte 0; supports 2, 1, 1, 1, 1
    assert metrics.f1_macro(y_true, y_pred, tree) == pytest.approx(7 / 15)
    assert metrics.f1_weighted(y_true, y_pred, tree) == pytest.approx(3 / 6)
    assert metrics.coarse_accuracy(y_true, y_pred, tree) == 1.0


def test_a_classifier_that_always_says_eosinophil_scores_what_it_deserves():
    """A five-class set (two classes at internal nodes) all predicted eosinophil: the bug reported 1.000."""
    tree = get_tree("v1")
    raw = ["Basophil"] * 4 + ["Eosinophil"] * 6 + ["Lymphocyte"] * 10 + ["Monocyte"] * 4 + ["Neutrophil"] * 12
    y_true = resolve_labels(tree, "raabin", raw)
    y_pred = np.full(len(raw), tree.index("eosinophil"))
    assert metrics.accuracy(y_true, y_pred, tree) == pytest.approx(6 / 36)
    assert metrics.balanced_accuracy(y_true, y_pred, tree) == pytest.approx(1 / 5)
    # eosinophil: TP 6, 6 labelled, 36 predicted -> F1 = 12 / 42; the other four classes 0
    assert metrics.f1_macro(y_true, y_pred, tree) == pytest.approx(2 / 7 / 5)
    assert metrics.f1_weighted(y_true, y_pred, tree) == pytest.approx(6 / 36 * 2 / 7)
    assert metrics.coarse_accuracy(y_true, y_pred, tree) == 0.0


def test_pbc_mixing_ig_with_my_mmy_pmy_gives_the_hand_computed_values():
    tree = get_tree("v1")
    pairs = [
        ("IG", "myelocyte"),  # under the coarse label: correct
        ("IG", "promyelocyte"),  # correct
        ("IG", "granulocytic_immature"),  # the label itself (a classifier trained on IG): correct
        ("IG", "neutrophil_segmented"),  # wrong; F1 counts it for SNE
        ("MY", "myelocyte"),
        ("MY", "myelocyte"),
        ("MY", "metamyelocyte"),  # wrong; counted for MMY
        ("MMY", "metamyelocyte"),
        ("MMY", "granulocytic_immature"),  # above the label: wrong; counted for IG
        ("PMY", "promyelocyte_bilobed"),  # a sibling: wrong; the nearest label node above it is IG
        ("PMY", "myelocyte"),  # wrong; counted for MY
        ("SNE", "neutrophil_segmented"),
        ("SNE", "neutrophil_segmented"),
    ]
    y_true = resolve_labels(tree, "acevedo", [raw for raw, _ in pairs])
    y_pred = ids(tree, [node for _, node in pairs])
    assert metrics.is_correct(y_true, y_pred, tree).tolist() == [1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1]
    assert metrics.accuracy(y_true, y_pred, tree) == pytest.approx(8 / 13)
    # recalls IG 3/4, MY 2/3, MMY 1/2, PMY 0, SNE 1
    assert metrics.balanced_accuracy(y_true, y_pred, tree) == pytest.approx((3 / 4 + 2 / 3 + 1 / 2 + 0 + 1) / 5)
    assert metrics.coarse_accuracy(y_true, y_pred, tree) == pytest.approx(3 / 4)
    # F1 = 2 TP / (labelled + predicted): IG 6/9, MY 4/6, MMY 2/4, PMY 0, SNE 4/5; supports 4, 3, 2, 2, 2
    assert metrics.f1_macro(y_true, y_pred, tree) == pytest.approx(79 / 150)
    assert metrics.f1_weighted(y_true, y_pred, tree) == pytest.approx(109 / 195)
    mapped = metrics.prediction_at_label_nodes(y_true, y_pred, tree)
    labels = np.unique(y_true)
    for average in ("macro", "weighted"):  # the same as scikit-learn on the mapped predictions
        expected = f1_score(y_true, mapped, labels=labels, average=average, zero_division=0)
        assert metrics.classification_metrics(y_true, y_pred, tree)[f"f1_{average}"] == pytest.approx(expected)


def test_a_prediction_under_no_label_node_counts_for_no_class(tree):
    y_true = ids(tree, ["band", "segmented"])
    y_pred = ids(tree, ["platelet", "segmented"])
    assert metrics.prediction_at_label_nodes(y_true, y_pred, tree).tolist() == [-1, tree.index("segmented")]
    assert metrics.f1_macro(y_true, y_pred, tree) == pytest.approx(0.5)  # band 0, segmented 1


def test_sample_weights_equal_repeated_samples(tree):
    """Integer weights (bootstrap counts) give the metrics of the repeated samples; a [B, n] matrix gives B values."""
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, len(tree.nodes), size=40)
    y_pred = rng.integers(0, len(tree.leaves), size=40)
    counts = rng.integers(0, 4, size=(3, 40))
    counts[0] = rng.integers(1, 4, size=40)  # every label node kept: F1 is checked on this row too
    functions = metrics.metric_functions(tree, rare=ids(tree, ["band", "neutrophil"]))
    assert {"f1_macro", "hierarchical_f1", "level_4_accuracy", "rare_balanced_accuracy"} <= set(functions)
    for name, fn in functions.items():
        rows = fn(y_true, y_pred, tree, sample_weight=counts)
        assert rows.shape == (3,), name
        for row, weight in zip(rows, counts):
            repeated = np.repeat(np.arange(40), weight)
            present = np.isin(np.unique(y_true), y_true[repeated])
            if name.startswith("f1") and not present.all():
                continue  # F1 maps predictions onto the label nodes of the full set (the bootstrap convention)
            expected = fn(y_true[repeated], y_pred[repeated], tree)
            assert row == pytest.approx(expected, nan_ok=True), name
            assert fn(y_true, y_pred, tree, sample_weight=weight) == pytest.approx(expected, nan_ok=True), name


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
    assert metrics.accuracy(coarse, ids(tree, ["band"]), tree) == 1.0
    assert math.isnan(metrics.coarse_accuracy(ids(tree, ["band"]), ids(tree, ["band"]), tree))
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
