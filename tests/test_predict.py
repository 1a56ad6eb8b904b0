"""Prediction back-off on constructed probabilities, and the predict CLI on a tiny model file."""

import numpy as np
import pandas as pd
import pytest

from dinov2.errors import ConfigError
from dinov2.hierarchy import Tree
from dinov2.predict import back_off, node_probabilities, predictions_table

# leaves in logit order: band, segmented, eosinophil, monocyte, platelet
NESTED = {
    "myeloid": {"granulocyte": {"neutrophil": ["band", "segmented"], "eosinophil": None}, "monocyte": None},
    "platelet": None,
}


@pytest.fixture(scope="module")
def tree():
    return Tree.from_nested(NESTED)


@pytest.mark.parametrize("probabilities, threshold, expected, expected_probability", [
    ([0.85, 0.05, 0.04, 0.03, 0.03], 0.8, "band", 0.85),             # sure: the leaf
    ([0.45, 0.45, 0.05, 0.03, 0.02], 0.8, "neutrophil", 0.90),       # coin-flip band/segmented
    ([0.30, 0.30, 0.10, 0.25, 0.05], 0.8, "myeloid", 0.95),          # only the lineage is sure
    ([0.40, 0.10, 0.05, 0.05, 0.40], 0.8, "root", 1.0),              # not even a lineage
    ([0.36, 0.34, 0.10, 0.10, 0.10], 0.3, "band", 0.36),             # two leaves qualify: the more probable
    ([0.00, 0.00, 0.00, 0.00, 1.00], 1.0, "platelet", 1.0),          # a shallow leaf (depth 1)
])
def test_back_off_picks_deepest_sure_node(tree, probabilities, threshold, expected, expected_probability):
    nodes, node_probs = back_off(np.array([probabilities]), tree, threshold)
    name = "root" if nodes[0] < 0 else tree.nodes[nodes[0]]
    assert name == expected
    assert node_probs[0] == pytest.approx(expected_probability)


def test_node_probabilities_sum_leaves(tree):
    probs = node_probabilities(np.array([[0.1, 0.2, 0.3, 0.15, 0.25]]), tree)[0]
    assert probs[tree.index("neutrophil")] == pytest.approx(0.3)
    assert probs[tree.index("granulocyte")] == pytest.approx(0.6)
    assert probs[tree.index("myeloid")] == pytest.approx(0.75)


def test_bad_threshold(tree):
    with pytest.raises(ConfigError, match="threshold"):
        back_off(np.full((1, 5), 0.2), tree, 0.0)


def test_predictions_table(tree):
    logits = np.log(np.array([[0.45, 0.45, 0.05, 0.03, 0.02], [0.02, 0.02, 0.02, 0.04, 0.9]]))
    table = predictions_table(["a.jpg", "b.jpg"], logits, tree, threshold=0.8)
    assert table["leaf"].tolist() == ["band", "platelet"]
    assert table["node"].tolist() == ["neutrophil", "platelet"]
    assert table["lineage"].tolist() == ["myeloid", "platelet"]
    assert table["lineage_probability"].to_numpy() == pytest.approx([0.98, 0.9])
    assert table["leaf_probability"].to_numpy() == pytest.approx([0.45, 0.9])
    assert isinstance(table, pd.DataFrame)
