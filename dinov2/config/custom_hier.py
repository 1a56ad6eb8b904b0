"""The white-blood-cell hierarchy and each dataset's label correspondences: the file users edit.

Adding a hierarchy
    Add an entry to ``HIERARCHIES``: a nested mapping ``{node: children}`` where children are
    another mapping, a list of leaf names, or ``None`` for a leaf (see :mod:`dinov2.hierarchy`).
    Node names must be unique across the whole tree; ``root`` is reserved. Select it in a run
    config with ``hierarchy: <name>``. Logits follow the leaves in the order written here, so the
    supervised head, the loss, the metrics and the reports follow the tree with no other change.

Adding a dataset (one edit: nothing else needs to know about it)
    Add ``DATASETS["my_dataset"] = {raw_label: node_name, ...}`` where ``raw_label`` is the value
    of the ``label`` column in the manifest and ``node_name`` is any node of the tree: a leaf for
    a fine label, an internal node (e.g. ``"neutrophil"`` or ``"granulocytic_immature"``) for a
    coarse one, or ``None`` to ignore the images of that label for the supervised loss (they
    still train the self-supervised part). The manifest's ``dataset`` column names the entry.
    ``make_manifest`` reads a raw label from the name of the image's class folder
    (``ROOT/<raw label>/**/<image>``); when the labels sit in file-name prefixes instead
    (``neutrophil/BNE_123.jpg`` -> ``BNE``), write the mapping as ``FilePrefixLabels({...})``.
    Writing ``DATASETS["my_dataset"] = None`` instead declares that the raw labels already are
    node names of the tree (used by the generated ``demo_*`` data).

Matching is exact and case-sensitive: ``"Basophil"`` and ``"basophil"`` are different raw labels;
list both if a dataset spells a class both ways. Raw labels are compared as strings. A label that
is not listed is an error naming every unknown label with its number of images, never a silent skip.
"""

from collections import Counter
from collections.abc import Iterable

import numpy as np

from dinov2.errors import ConfigError, LabelError
from dinov2.hierarchy import Tree

IGNORED = -1
"""Node index of a sample whose label the dataset maps to None (ignored by the supervised loss)."""


class FilePrefixLabels(dict):
    """A ``DATASETS`` entry whose raw labels are file-name prefixes, the part of the file name before
    the first underscore (``neutrophil/BNE_123.jpg`` -> ``BNE``), instead of class folder names."""


HIERARCHIES: dict[str, dict] = {
    # Lineage first (depth 1), maturity second (depth 2), then cell types.
    "v1": {
        "lymphopoiesis": {
            "lymphoid_immature": ["lymphoblast", "lymphocyte_immature"],
            "lymphocyte_mature": {
                "lymphocyte_typical_group": ["lymphocyte_typical", "plasma_cell"],
                "lymphocyte_atypical": [
                    "hairy_cell",
                    "lymphocyte_large_granular",
                    "lymphocyte_reactive",
                    "lymphocyte_neoplastic",
                ],
            },
        },
        "erythropoiesis": {
            "erythroid_immature": ["proerythroblast", "erythroblast"],
        },
        "monopoiesis": {
            "monocytic_immature": ["monoblast"],
            "monocytic_mature": ["monocyte"],
        },
        "granulopoiesis": {
            "granulocytic_immature": {
                "myeloblast": None,
                "promyelocyte_group": ["promyelocyte", "promyelocyte_bilobed", "fagott_cell"],
                "myelocyte": None,
                "metamyelocyte": None,
            },
            "granulocytic_mature": {
                "basophil": None,
                "neutrophil": ["neutrophil_band", "neutrophil_segmented"],
                "eosinophil_group": ["eosinophil", "eosinophil_abnormal"],
            },
        },
        "thrombopoiesis": ["platelet"],
        "blast_unspecified": ["blast"],
        "artefact": ["smudge_cell"],
    },
}

_FIVE_CLASSES = {
    "Basophil": "basophil",
    "Eosinophil": "eosinophil",
    "Lymphocyte": "lymphocyte_mature",
    "Monocyte": "monocyte",
    "Neutrophil": "neutrophil",
}

DATASETS: dict[str, dict[str, str | None] | None] = {
    # PBC (Acevedo et al. 2020); the raw label is the file name prefix.
    "acevedo": FilePrefixLabels(
        {
            "BA": "basophil",
            "EO": "eosinophil",
            "ERB": "erythroblast",
            "IG": "granulocytic_immature",
            "MY": "myelocyte",
            "MMY": "metamyelocyte",
            "PMY": "promyelocyte",
            "LY": "lymphocyte_typical",
            "MO": "monocyte",
            "BNE": "neutrophil_band",
            "SNE": "neutrophil_segmented",
            "NEUTROPHIL": "neutrophil",
            "PLATELET": "platelet",
        }
    ),
    # AML cytomorphology, LMU (Matek et al. 2019).
    "matek_2019": {
        "BAS": "basophil",
        "EBO": "erythroblast",
        "EOS": "eosinophil",
        "KSC": "smudge_cell",
        "LYA": "lymphocyte_atypical",
        "LYT": "lymphocyte_typical",
        "MMZ": "metamyelocyte",
        "MOB": "monoblast",
        "MON": "monocyte",
        "MYB": "myelocyte",
        "MYO": "myeloblast",
        "NGB": "neutrophil_band",
        "NGS": "neutrophil_segmented",
        "PMB": "promyelocyte_bilobed",
        "PMO": "promyelocyte",
    },
    # Bone marrow cytomorphology (Matek et al. 2021).
    "bone_marrow": {
        "ABE": "eosinophil_abnormal",
        "BAS": "basophil",
        "BLA": "blast",
        "EBO": "erythroblast",
        "EOS": "eosinophil",
        "FGC": "fagott_cell",
        "HAC": "hairy_cell",
        "KSC": "smudge_cell",
        "LYI": "lymphocyte_immature",
        "LYT": "lymphocyte_typical",
        "MMZ": "metamyelocyte",
        "MON": "monocyte",
        "MYB": "myelocyte",
        "NGB": "neutrophil_band",
        "NGS": "neutrophil_segmented",
        "PEB": "proerythroblast",
        "PLM": "plasma_cell",
        "PMO": "promyelocyte",
        "ART": None,  # artefact
        "NIF": None,  # not identifiable
        "OTH": None,  # other cell
    },
    # MLL Munich Leukemia Laboratory codes (both spellings occur).
    "mll": {
        "01-NORMO": "erythroblast",
        "1-Normo": "erythroblast",
        "04-LGL": "lymphocyte_large_granular",
        "05-MONO": "monoblast",
        "5-MONO": "monoblast",
        "08-LYMPH-neo": "lymphocyte_neoplastic",
        "09-BASO": "basophil",
        "9-BASO": "basophil",
        "10-EOS": "eosinophil",
        "11-STAB": "neutrophil_band",
        "12-LYMPH-reaktiv": "lymphocyte_reactive",
        "13-MYBL": "myeloblast",
        "14-LYMPH-typ": "lymphocyte_typical",
        "15-SEG": "neutrophil_segmented",
        "16-PLZ": "plasma_cell",
        "17-Kernschatten": "smudge_cell",
        "18-PMYEL": "promyelocyte",
        "19-MYEL": "myelocyte",
        "20-Meta": "metamyelocyte",
        "20-META": "metamyelocyte",
        "21-Haarzelle": "hairy_cell",
    },
    # Five coarse peripheral-blood classes.
    "raabin": dict(_FIVE_CLASSES),
    "lisc": dict(_FIVE_CLASSES),
    "krd_wbc": dict(_FIVE_CLASSES),
    "warthog": dict(_FIVE_CLASSES),
    # Generated demo data (dinov2.data.synthetic_cells): raw labels are node names.
    "demo_fine": None,
    "demo_coarse": None,
}


def get_tree(name: str = "v1") -> Tree:
    """The :class:`Tree` of ``HIERARCHIES[name]``; ConfigError listing the known names otherwise."""
    if name not in HIERARCHIES:
        raise ConfigError(
            f"unknown hierarchy {name!r}; known: {', '.join(sorted(HIERARCHIES))} "
            "(add one to HIERARCHIES in dinov2/config/custom_hier.py)"
        )
    return Tree.from_nested(HIERARCHIES[name])


def dataset_labels(dataset: str) -> dict[str, str | None] | None:
    """The ``DATASETS`` entry of ``dataset``; LabelError listing the known data sets otherwise."""
    if dataset not in DATASETS:
        raise LabelError(
            f"unknown dataset {dataset!r}; known: {', '.join(sorted(DATASETS))} "
            "(add its raw labels to DATASETS in dinov2/config/custom_hier.py)"
        )
    return DATASETS[dataset]


def raw_label_source(dataset: str) -> str:
    """How ``make_manifest`` reads the dataset's raw labels: ``"file_prefix"`` or ``"folder"``."""
    return "file_prefix" if isinstance(dataset_labels(dataset), FilePrefixLabels) else "folder"


def _node_index(tree: Tree, dataset: str, raw_label: str, node: str | None) -> int:
    if node is None:
        return IGNORED
    if node not in tree:
        raise LabelError(
            f"dataset {dataset!r} maps raw label {raw_label!r} to {node!r}, which is not a node "
            "of the hierarchy; fix DATASETS in dinov2/config/custom_hier.py"
        )
    return tree.index(node)


def resolve_label(tree: Tree, dataset: str, raw_label: str) -> int:
    """Node index (into ``tree.nodes``) of one raw label of a dataset, or -1 when the dataset ignores it."""
    return int(resolve_labels(tree, dataset, [raw_label])[0])


def resolve_labels(tree: Tree, dataset: str, raw_labels: Iterable[str], hint: str = "") -> np.ndarray:
    """Node indices (int64, -1 = ignored) of raw labels of a dataset, matched exactly as strings.

    Raises LabelError listing every unknown raw label with its count, most frequent first (then
    ``hint``, e.g. where the labels were read from).
    """
    label_map = dataset_labels(dataset)
    raw_labels = [str(label) for label in raw_labels]
    counts = Counter(raw_labels)
    if label_map is None:
        label_map = {label: label for label in counts if label in tree}
    unknown = [(label, n) for label, n in counts.most_common() if label not in label_map]
    if unknown:
        listed = ", ".join(f"{label!r} ({n})" for label, n in unknown)
        expected = (
            "node names of the hierarchy" if DATASETS[dataset] is None else f"one of {', '.join(map(repr, label_map))}"
        )
        raise LabelError(
            f"dataset {dataset!r} has {len(unknown)} unknown raw label(s): {listed}; expected "
            f"{expected} (matching is case-sensitive; edit DATASETS in dinov2/config/custom_hier.py){hint}"
        )
    index = {label: _node_index(tree, dataset, label, label_map[label]) for label in counts}
    return np.fromiter((index[label] for label in raw_labels), dtype=np.int64, count=len(raw_labels))
