import pickle
import random

import numpy as np
import pytest
import torch
from conftest import random_nested

from dinov2.errors import TreeError
from dinov2.hierarchy import ROOT, Tree

NESTED = {
    "lymphoid": {"immature_lymphoid": ["lymphoblast"], "lymphocyte": None},
    "myeloid": {
        "granulocyte": {"neutrophil": ["band", "segmented"], "basophil": None},
        "monocyte": None,
    },
    "platelet": None,
}


@pytest.fixture
def tree():
    return Tree.from_nested(NESTED)


def test_leaves_follow_depth_first_order_and_nodes_put_leaves_first(tree):
    assert tree.leaves == ("lymphoblast", "lymphocyte", "band", "segmented", "basophil", "monocyte", "platelet")
    assert tree.nodes[: len(tree.leaves)] == tree.leaves
    assert tree.internal_nodes == ("lymphoid", "immature_lymphoid", "myeloid", "granulocyte", "neutrophil")
    assert [tree.index(name) for name in tree.nodes] == list(range(len(tree.nodes)))
    assert ROOT not in tree and "band" in tree
    assert tree.preorder() == (
        "lymphoid",
        "immature_lymphoid",
        "lymphoblast",
        "lymphocyte",
        "myeloid",
        "granulocyte",
        "neutrophil",
        "band",
        "segmented",
        "basophil",
        "monocyte",
        "platelet",
    )
    assert tree.preorder("granulocyte") == ("neutrophil", "band", "segmented", "basophil")


def test_parent_depth_ancestors(tree):
    assert tree.parent("band") == "neutrophil"
    assert tree.parent("platelet") == ROOT
    assert tree.depth(ROOT) == 0 and tree.depth("myeloid") == 1 and tree.depth("band") == 4
    assert tree.ancestors("band") == ("neutrophil", "granulocyte", "myeloid")
    assert tree.ancestors("platelet") == ()
    assert tree.max_depth == 4
    assert tree.children(ROOT) == ("lymphoid", "myeloid", "platelet")
    assert tree.is_leaf("band") and not tree.is_leaf("neutrophil")


def test_lca_distance_and_levels(tree):
    assert tree.lca("band", "basophil") == "granulocyte"
    assert tree.lca("band", "neutrophil") == "neutrophil"
    assert tree.lca("band", "lymphocyte") == ROOT
    assert tree.distance("band", "band") == 0
    assert tree.distance("band", "segmented") == 2
    assert tree.distance("band", "monocyte") == 4
    assert tree.distance("band", "platelet") == 5
    assert tree.at_level("band", 1) == "myeloid"
    assert tree.at_level("band", 2) == "granulocyte"
    assert tree.at_level("band", 0) == ROOT
    assert tree.at_level("monocyte", 3) == "monocyte"  # shallower than the level: itself
    with pytest.raises(TreeError, match="level"):
        tree.at_level("band", -1)


def test_leaves_under_membership_and_arrays_agree(tree):
    assert tree.leaves_under("granulocyte") == ("band", "segmented", "basophil")
    assert tree.leaves_under("band") == ("band",)
    assert tree.leaves_under(ROOT) == tree.leaves
    membership = tree.membership()
    assert membership.dtype == torch.bool and membership.shape == (len(tree.nodes), len(tree.leaves))
    for i, name in enumerate(tree.nodes):
        expected = [leaf in tree.leaves_under(name) for leaf in tree.leaves]
        assert membership[i].tolist() == expected
        start, stop = tree.leaf_ranges[i]
        assert tree.leaves[start:stop] == tree.leaves_under(name)
        parent = tree.parent(name)
        assert tree.parent_indices[i] == (-1 if parent == ROOT else tree.index(parent))
        assert tree.node_depths[i] == tree.depth(name)


def test_tree_is_immutable(tree):
    assert isinstance(tree.leaves, tuple) and isinstance(tree.nodes, tuple)
    with pytest.raises(ValueError):
        tree.node_depths[0] = 7
    tree.membership()[0, 0] = False  # a fresh tensor: the tree does not change
    assert tree.membership()[0, 0]


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_and_pickle_on_random_trees(seed):
    tree = Tree.from_nested(random_nested(random.Random(seed)))
    again = Tree.from_nested(tree.to_nested())
    assert again == tree and hash(again) == hash(tree)
    assert again.nodes == tree.nodes
    assert pickle.loads(pickle.dumps(tree)) == tree
    # every node's leaves are contiguous in logit order
    for i, name in enumerate(tree.nodes):
        start, stop = tree.leaf_ranges[i]
        assert set(tree.leaves[start:stop]) == set(tree.leaves_under(name))
    has_parent = tree.parent_indices >= 0
    assert np.all(tree.node_depths[has_parent] == tree.node_depths[tree.parent_indices[has_parent]] + 1)
    assert np.all(tree.node_depths[~has_parent] == 1)


def test_to_nested_writes_leaf_lists(tree):
    nested = tree.to_nested()
    assert nested["myeloid"]["granulocyte"]["neutrophil"] == ["band", "segmented"]
    assert nested["platelet"] is None
    assert Tree.from_nested({"a": ["x"], "b": ["y"]}) != Tree.from_nested({"a": ["x"], "b": ["z"]})


@pytest.mark.parametrize(
    "nested, message",
    [
        ({"a": ["x", "y"], "b": ["x"]}, "'x' is listed twice"),
        ({"a": {"a": None}}, "'a' is listed twice"),
        ({"a": ["x", ""]}, "empty node name"),
        ({"a": ["x", " y"]}, "whitespace"),
        ({"root": ["x"]}, "reserved"),
        ({"a": ["root"]}, "reserved"),
        ({"a": ["x", 3]}, "must be strings, got 3"),
        ({"a": "x"}, "children of 'a'"),
        ({"a": []}, "'a' has an empty list of children"),
        ({"a": {}}, "'a' has an empty list of children"),
        ({}, "non-empty mapping"),
        (["x", "y"], "non-empty mapping"),
    ],
)
def test_validation_names_the_culprit(nested, message):
    with pytest.raises(TreeError, match=message):
        Tree.from_nested(nested)


def test_unknown_node_suggests_close_names(tree):
    with pytest.raises(TreeError, match="did you mean 'neutrophil'"):
        tree.index("neutrophill")
    with pytest.raises(TreeError, match="unknown node 'root'"):
        tree.index(ROOT)
