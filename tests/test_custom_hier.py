import numpy as np
import pytest

from dinov2.config.custom_hier import DATASETS, HIERARCHIES, IGNORED, get_tree, resolve_label, resolve_labels
from dinov2.errors import ConfigError, LabelError


@pytest.fixture(scope="module")
def tree():
    return get_tree("v1")


def _leaf_names(nested) -> list:
    """Leaf names of a nested HIERARCHIES mapping, in the order written."""
    if isinstance(nested, dict):
        return [leaf for name, children in nested.items() for leaf in (_leaf_names(children) if children else [name])]
    return list(nested)


def test_v1_invariants_and_published_structure(tree):
    """Facts that hold however many nodes are added: the leaves are those written, in that order
    (the logit order); node names are unique; the lineages come first; the published paths hold."""
    assert list(tree.leaves) == _leaf_names(HIERARCHIES["v1"])
    assert len(set(tree.nodes)) == len(tree.nodes) and tree.nodes[: len(tree.leaves)] == tree.leaves
    assert all(tree.depth(leaf) >= 2 for leaf in tree.leaves)
    assert tree.children("root")[:7] == (
        "lymphopoiesis",
        "erythropoiesis",
        "monopoiesis",
        "granulopoiesis",
        "thrombopoiesis",
        "blast_unspecified",
        "artefact",
    )
    assert tree.ancestors("promyelocyte_bilobed") == ("promyelocyte_group", "granulocytic_immature", "granulopoiesis")
    assert tree.at_level("lymphocyte_reactive", 2) == "lymphocyte_mature"
    assert tree.leaves_under("neutrophil") == ("neutrophil_band", "neutrophil_segmented")


def test_adding_a_leaf_grows_the_tree_and_keeps_every_label(monkeypatch):
    grown = {**HIERARCHIES["v1"], "artefact": ["smudge_cell", "debris"]}
    monkeypatch.setitem(HIERARCHIES, "v1", grown)
    tree = get_tree("v1")
    assert tree.leaves[-1] == "debris" and tree.parent("debris") == "artefact"
    for dataset, labels in DATASETS.items():
        if labels is not None:
            resolve_labels(tree, dataset, list(labels))


@pytest.mark.parametrize("dataset", [name for name, labels in DATASETS.items() if labels is not None])
def test_every_dataset_label_resolves_to_a_v1_node(tree, dataset):
    raw_labels = list(DATASETS[dataset])
    indices = resolve_labels(tree, dataset, raw_labels)
    assert indices.dtype == np.int64 and indices.shape == (len(raw_labels),)
    for raw, index in zip(raw_labels, indices):
        node = DATASETS[dataset][raw]
        assert index == (IGNORED if node is None else tree.index(node))


def test_expected_datasets_and_spot_checks(tree):
    assert {"acevedo", "matek_2019", "bone_marrow", "mll", "raabin", "lisc", "krd_wbc", "warthog"} <= set(DATASETS)
    assert resolve_label(tree, "acevedo", "IG") == tree.index("granulocytic_immature")
    assert resolve_label(tree, "raabin", "Lymphocyte") == tree.index("lymphocyte_mature")
    assert resolve_label(tree, "mll", "20-META") == resolve_label(tree, "mll", "20-Meta") == tree.index("metamyelocyte")
    assert [resolve_label(tree, "bone_marrow", label) for label in ("ART", "NIF", "OTH")] == [IGNORED] * 3
    assert isinstance(resolve_label(tree, "lisc", "Basophil"), int)


def test_unknown_labels_are_listed_with_counts_case_sensitive(tree):
    with pytest.raises(LabelError) as error:
        resolve_labels(tree, "raabin", ["Basophil", "basophil", "Blast", "basophil", "Monocyte"])
    message = str(error.value)
    assert "'basophil' (2)" in message and "'Blast' (1)" in message
    assert "'Monocyte' (" not in message and "case-sensitive" in message


def test_unknown_dataset_lists_known_ones(tree):
    with pytest.raises(LabelError, match="unknown dataset 'pbc'.*acevedo"):
        resolve_labels(tree, "pbc", ["BA"])


def test_demo_datasets_take_node_names(tree):
    assert resolve_labels(tree, "demo_fine", ["basophil", "neutrophil_band"]).tolist() == [
        tree.index("basophil"),
        tree.index("neutrophil_band"),
    ]
    assert resolve_label(tree, "demo_coarse", "granulopoiesis") == tree.index("granulopoiesis")
    with pytest.raises(LabelError, match="'neutrofil' \\(1\\).*node names"):
        resolve_labels(tree, "demo_coarse", ["neutrofil"])


def test_a_map_to_a_missing_node_is_an_error(tree, monkeypatch):
    monkeypatch.setitem(DATASETS, "broken", {"X": "not_a_node"})
    with pytest.raises(LabelError, match="'X' to 'not_a_node'"):
        resolve_label(tree, "broken", "X")


def test_get_tree_unknown_hierarchy():
    with pytest.raises(ConfigError, match="unknown hierarchy 'v9'.*v1"):
        get_tree("v9")
    assert get_tree("v1") == get_tree() and "v1" in HIERARCHIES
