"""The built-in demo data set: deterministic, multi-granular, every label a tree node."""

import hashlib

import pandas as pd
import pytest

from dinov2.config.custom_hier import get_tree, resolve_labels
from dinov2.data import synthetic_cells
from dinov2.data.augmentations import DataAugmentationDINO, make_supervised_transform
from dinov2.data.collate import collate_supervised
from dinov2.data.datasets.dataloader_sup import SupervisedDataset, UnsupervisedDataset
from dinov2.data.manifest import read_manifests
from dinov2.errors import ConfigError


def digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo_manifest(tmp_path_factory):
    return synthetic_cells.generate_demo_dataset(tmp_path_factory.mktemp("demo"), n_per_class=4, size=48, seed=0)


def test_demo_is_byte_identical_for_a_seed(demo_manifest, tmp_path):
    again = synthetic_cells.generate_demo_dataset(tmp_path / "again", n_per_class=4, size=48, seed=0)
    assert digest(demo_manifest.parent) == digest(again.parent)
    other = synthetic_cells.generate_demo_dataset(tmp_path / "other", n_per_class=4, size=48, seed=1)
    assert digest(other.parent) != digest(demo_manifest.parent)


def test_every_demo_label_resolves_fine_at_leaves_coarse_at_internal_nodes(demo_manifest):
    tree = get_tree("v1")
    manifest = read_manifests(demo_manifest)
    assert len(manifest) == 4 * (len(synthetic_cells.DEMO_LEAVES) + len(synthetic_cells.DEMO_COARSE_NODES))
    for dataset, is_leaf in (("demo_fine", True), ("demo_coarse", False)):
        rows = manifest[manifest["dataset"] == dataset]
        nodes = [tree.nodes[i] for i in resolve_labels(tree, dataset, rows["label"])]
        assert all(tree.is_leaf(node) == is_leaf for node in nodes)
        assert all(leaf in tree.leaves_under(node) for leaf, node in zip(rows["leaf"], nodes))
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert (manifest.groupby(["dataset", "label"])["split"].apply(lambda s: (s == "train").sum()) >= 2).all()


def test_siblings_look_more_alike_than_distant_nodes():
    tree = get_tree("v1")
    band, segmented, lymphocyte = (
        synthetic_cells.appearance(tree, leaf)
        for leaf in ("neutrophil_band", "neutrophil_segmented", "lymphocyte_typical")
    )
    shared = lambda a, b: sum(a[key] == b[key] for key in synthetic_cells.DEFAULT_APPEARANCE)  # noqa: E731
    assert shared(band, segmented) > shared(band, lymphocyte)
    assert band["granules"] == segmented["granules"] == "fine" and lymphocyte["granules"] == "none"
    assert {synthetic_cells.appearance(tree, leaf)["nucleus"] for leaf in synthetic_cells.DEMO_LEAVES} == set(
        synthetic_cells.NUCLEUS_SHAPES
    )


def test_demo_feeds_both_datasets(demo_manifest):
    tree = get_tree("v1")
    manifest = read_manifests(demo_manifest)
    supervised = SupervisedDataset(manifest, tree, make_supervised_transform(32))
    images, labels = collate_supervised([supervised[i] for i in range(0, len(supervised), 9)])
    assert images.shape[1:] == (3, 32, 32) and labels.min() >= 0 and labels.max() < len(tree.nodes)
    views, target = UnsupervisedDataset(manifest, DataAugmentationDINO((0.4, 1), (0.1, 0.4), 2, 32, 16))[0]
    assert target is None and views["local_crops"][0].shape == (3, 16, 16)


def test_demo_cli_writes_images_and_manifest(tmp_path, capsys):
    assert synthetic_cells.main(["--out", str(tmp_path), "--n-per-class", "1", "--size", "40", "--seed", "2"]) == 0
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    assert len(manifest) == len(synthetic_cells.DEMO_LEAVES) + len(synthetic_cells.DEMO_COARSE_NODES)
    assert all((tmp_path / p).is_file() for p in manifest["path"])
    assert "demo_coarse" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="n_per_class >= 1"):
        synthetic_cells.main(["--out", str(tmp_path), "--n-per-class", "0"])
