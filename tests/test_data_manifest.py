"""Manifests, importers (make_manifest), check_manifest, image loading and the datasets."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_exit, tiny_overrides
from PIL import Image

from dinov2.config.custom_hier import DATASETS, FilePrefixLabels, get_tree
from dinov2.data import check_manifest, make_manifest
from dinov2.data.collate import collate_supervised
from dinov2.data.datasets.dataloader_sup import SupervisedDataset, UnsupervisedDataset, load_image
from dinov2.data.manifest import read_manifests, stratified_splits, write_manifest
from dinov2.errors import DataError, LabelError
from dinov2.train import train
from dinov2.train.data import training_rows

PBC_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared/data/pbc_sample"
PBC_PREFIX_NODES = {
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


def write_image(path: Path, colour=(200, 100, 150), size=(20, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_tree(root: Path, files) -> None:
    for relative in files:
        if Path(relative).name.startswith(".DS_") or relative.endswith(".txt"):
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
        else:
            write_image(root / relative)


@pytest.fixture(scope="module")
def tree():
    return get_tree("v1")


def test_folder_per_class_import_skips_hidden_files_and_splits_reproducibly(tmp_path, capsys):
    root = tmp_path / "matek"
    files = [f"{label}/{label.lower()}_{i}.png" for label in ("NGS", "LYT", "EOS") for i in range(10)]
    write_tree(root, files + [".DS_Store", "NGS/.DS_Store", "NGS/notes.txt"])
    out = tmp_path / "manifests/matek.csv"
    assert make_manifest.main(["--dataset", "matek_2019", "--root", str(root), "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "neutrophil_segmented" in printed and "granulopoiesis" in printed
    manifest = read_manifests(out)
    assert len(manifest) == 30
    assert sorted(manifest["label"].unique()) == ["EOS", "LYT", "NGS"]
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in manifest["path"])
    for _, group in manifest.groupby("label"):  # stratified: 10 per label -> 8/1/1
        assert sorted(group["split"]) == ["test"] + ["train"] * 8 + ["val"]
    again = tmp_path / "again.csv"
    make_manifest.main(["--dataset", "matek_2019", "--root", str(root), "--out", str(again), "--seed", "3"])
    assert read_manifests(again)["split"].tolist() == manifest["split"].tolist()


def test_acevedo_import_reads_labels_from_file_name_prefixes(tmp_path, tree):
    root = tmp_path / "PBC_dataset_normal_DIB"
    write_tree(
        root,
        [
            "neutrophil/BNE_1.jpg",
            "neutrophil/SNE_2.jpg",
            "neutrophil/NEUTROPHIL_3.jpg",
            "neutrophil/.DS_169665.jpg",
            "ig/MY_4.jpg",
            "ig/IG_5.jpg",
            "basophil/BA_6.jpg",
        ],
    )
    manifest, skipped = make_manifest.scan_dataset("acevedo", root)
    assert skipped == 1
    assert sorted(manifest["label"]) == ["BA", "BNE", "IG", "MY", "NEUTROPHIL", "SNE"]
    from dinov2.config.custom_hier import resolve_labels

    nodes = [tree.nodes[i] for i in resolve_labels(tree, "acevedo", manifest["label"])]
    assert dict(zip(manifest["label"], nodes))["IG"] == "granulocytic_immature"


def test_unknown_labels_are_refused_with_each_label_and_count(tmp_path):
    root = tmp_path / "matek"
    write_tree(root, ["NGS/a.png", "XYZ/a.png", "XYZ/b.png", "Foo/c.png"])
    with pytest.raises(LabelError) as error:
        make_manifest.main(["--dataset", "matek_2019", "--root", str(root), "--out", str(tmp_path / "m.csv")])
    assert "'XYZ' (2)" in str(error.value) and "'Foo' (1)" in str(error.value)
    assert not (tmp_path / "m.csv").exists()


def test_read_manifests_resolves_relative_paths_concatenates_and_keeps_extra_columns(tmp_path):
    write_image(tmp_path / "a/img/x.png")
    write_image(tmp_path / "b/y.png")
    (tmp_path / "a/m.csv").write_text("path,label,dataset,split,patient\nimg/x.png,NGS,matek_2019,train,p1\n")
    (tmp_path / "b/m.csv").write_text(f"path,label,dataset,split\n{tmp_path / 'b/y.png'},,raabin,val\n")
    manifest = read_manifests([tmp_path / "a/m.csv", tmp_path / "b/m.csv"])
    assert manifest["path"].tolist() == [str(tmp_path / "a/img/x.png"), str(tmp_path / "b/y.png")]
    assert manifest["patient"].tolist() == ["p1", ""]
    written = write_manifest(manifest.iloc[:1], tmp_path / "a/copy.csv")
    assert pd.read_csv(written)["path"].tolist() == ["img/x.png"]


def test_read_manifests_names_file_and_row_of_bad_input(tmp_path):
    bad_split = tmp_path / "bad_split.csv"
    bad_split.write_text("path,label,dataset,split\nx.png,NGS,matek_2019,train\ny.png,NGS,matek_2019,training\n")
    with pytest.raises(DataError, match=r"bad_split.csv row 3: split 'training'"):
        read_manifests(bad_split)
    no_split = tmp_path / "no_split.csv"
    no_split.write_text("path,label,dataset\nx.png,NGS,matek_2019\n")
    with pytest.raises(DataError, match=r"no_split.csv lacks column\(s\) split"):
        read_manifests(no_split)
    with pytest.raises(DataError, match="missing.csv does not exist"):
        read_manifests(tmp_path / "missing.csv")


def test_stratified_splits_keep_a_training_item_per_label():
    splits = stratified_splits(["a"] * 20 + ["b"] * 2 + ["c"], 0.25, 0.25, seed=1)
    assert splits[:20].count("val") == 5 and splits[:20].count("test") == 5
    assert "train" in splits[20:22] and splits[22] == "train"
    assert splits == stratified_splits(["a"] * 20 + ["b"] * 2 + ["c"], 0.25, 0.25, seed=1)
    assert splits != stratified_splits(["a"] * 20 + ["b"] * 2 + ["c"], 0.25, 0.25, seed=2)


def test_check_manifest_names_every_bad_row(tmp_path, capsys):
    write_image(tmp_path / "good.png")
    write_image(tmp_path / "coarse.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,label,dataset,split\n"
        "good.png,NGS,matek_2019,train\n"
        "coarse.png,Neutrophil,raabin,train\n"
        "missing.png,NGS,matek_2019,train\n"
        "corrupt.jpg,NGS,matek_2019,val\n"
        "good.png,WHAT,matek_2019,test\n"
        "good.png,NGS,matek_2019,holdout\n"
    )
    assert check_manifest.main([str(manifest), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "2 good row(s), 4 bad row(s)" in out
    assert "row 4 (" in out and "missing file" in out
    assert "row 5 (" in out and "unreadable image" in out
    assert "row 6 (" in out and "unknown label 'WHAT'" in out
    assert "row 7 (" in out and "split 'holdout'" in out
    assert "neutrophil_segmented" in out and "matek_2019" in out and "raabin" in out


def test_load_image_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="corrupt.png cannot be decoded"):
        load_image(str(corrupt))
    with pytest.raises(DataError, match="nothing.png does not exist"):
        load_image(str(tmp_path / "nothing.png"))
    assert load_image(str(write_image(tmp_path / "ok.png", size=(7, 5)))).size == (7, 5)


def _mixed_manifest(tmp_path) -> pd.DataFrame:
    rows = [
        (write_image(tmp_path / "a.png", (255, 0, 0)), "NGS", "bone_marrow"),
        (write_image(tmp_path / "b.png", (0, 255, 0)), "ART", "bone_marrow"),  # maps to None
        (write_image(tmp_path / "c.png", (0, 0, 255)), "Neutrophil", "raabin"),
        (write_image(tmp_path / "d.png", (9, 9, 9)), "", "raabin"),  # unlabelled
    ]
    return pd.DataFrame([{"path": str(p), "label": label, "dataset": d, "split": "train"} for p, label, d in rows])


def test_supervised_dataset_returns_node_indices_and_drops_ignored_rows(tmp_path, tree):
    dataset = SupervisedDataset(_mixed_manifest(tmp_path), tree, transform=lambda image: image.getpixel((0, 0)))
    assert len(dataset) == 2
    assert dataset[0] == ((255, 0, 0), tree.index("neutrophil_segmented"))
    assert dataset[1] == ((0, 0, 255), tree.index("neutrophil"))
    assert dataset.labels.tolist() == [tree.index("neutrophil_segmented"), tree.index("neutrophil")]
    unsupervised = UnsupervisedDataset(_mixed_manifest(tmp_path), transform=lambda image: image.size)
    assert len(unsupervised) == 4 and unsupervised[3] == ((20, 20), None)


def test_unreadable_image_raises_or_is_skipped_into_the_log(tmp_path, tree):
    manifest = _mixed_manifest(tmp_path)
    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="a.png"):
        SupervisedDataset(manifest, tree, transform=np.asarray)[0]
    log = tmp_path / "skipped.txt"
    dataset = SupervisedDataset(
        manifest, tree, transform=lambda image: __import__("torch").zeros(3, 2, 2), skip_unreadable_log=log
    )
    assert dataset[0] is None
    assert str(tmp_path / "a.png") in log.read_text()
    images, labels = collate_supervised([dataset[0], dataset[1]])
    assert images.shape == (1, 3, 2, 2) and labels.tolist() == [tree.index("neutrophil")]
    with pytest.raises(DataError, match="every image of the batch was unreadable"):
        collate_supervised([dataset[0]])


@pytest.mark.skipif(not PBC_SAMPLE.is_dir(), reason=f"{PBC_SAMPLE} is absent")
def test_pbc_sample_prefixes_map_to_their_nodes(tree):
    from dinov2.config.custom_hier import resolve_labels

    manifest, skipped = make_manifest.scan_dataset("acevedo", PBC_SAMPLE / "PBC_dataset_normal_DIB")
    assert skipped == 1  # the stray .DS_169665.jpg
    assert set(manifest["label"]) == set(PBC_PREFIX_NODES)
    nodes = resolve_labels(tree, "acevedo", manifest["label"].tolist())
    assert {label: tree.nodes[i] for label, i in zip(manifest["label"], nodes)} == PBC_PREFIX_NODES


def test_make_manifest_cli_exits_2_with_a_one_paragraph_message(tmp_path):
    import subprocess
    import sys

    write_tree(tmp_path / "root", ["XYZ/a.png"])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dinov2.data.make_manifest",
            "--dataset",
            "raabin",
            "--root",
            str(tmp_path / "root"),
            "--out",
            str(tmp_path / "m.csv"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert "unknown raw label" in result.stderr and "'XYZ' (1)" in result.stderr and "Traceback" not in result.stderr


def test_a_file_prefix_dataset_is_one_edit_in_custom_hier(tmp_path, tree, monkeypatch):
    monkeypatch.setitem(
        DATASETS, "my_smears", FilePrefixLabels({"SEG": "neutrophil_segmented", "LY": "lymphocyte_typical"})
    )
    write_tree(tmp_path / "root", ["neutrophil/SEG_1.png", "neutrophil/SEG_2.png", "other/LY_3.png"])
    out = tmp_path / "m.csv"
    assert make_manifest.main(["--dataset", "my_smears", "--root", str(tmp_path / "root"), "--out", str(out)]) == 0
    assert sorted(read_manifests(out)["label"]) == ["LY", "SEG", "SEG"]


def test_labels_read_from_the_wrong_place_get_a_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS, "my_smears", {"SEG": "neutrophil_segmented"})
    write_tree(tmp_path / "root", ["neutrophil/SEG_1.png"])
    with pytest.raises(LabelError, match=r"'neutrophil' \(1\).*class folder names \(write its DATASETS entry as Fil"):
        make_manifest.main(["--dataset", "my_smears", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "m")])


def test_check_manifest_says_which_label_problem_it_is(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(DATASETS, "broken", {"X": "not_a_node"})
    write_image(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,label,dataset,split\na.png,NGS,pbc,train\na.png,WHAT,matek_2019,train\na.png,X,broken,train\n"
    )
    assert check_manifest.main([str(manifest), "--workers", "1"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "row 2 (" in out and "unknown dataset 'pbc' (not in DATASETS" in out
    assert "row 3 (" in out and "unknown label 'WHAT' for dataset 'matek_2019'" in out
    assert "row 4 (" in out and "maps raw label 'X' to 'not_a_node', which is not a node" in out
    assert out.count("unknown label") == 1


def test_an_empty_supervised_set_names_the_manifests_and_why(tmp_path, tree, capsys):
    rows = _mixed_manifest(tmp_path).iloc[[1, 3]]  # ART (mapped to None) and an unlabelled row
    with pytest.raises(DataError, match=r"my.csv has no row for the supervised loss: of 2 row\(s\), 1 are unlabelled"):
        SupervisedDataset(rows, tree, source="my.csv")
    manifest = write_manifest(rows, tmp_path / "unlabelled.csv")
    argv = ["--output-dir", tmp_path / "run", *tiny_overrides(manifest, **{"train.batch_size_per_gpu": 1})]
    code, err = cli_exit(train.main, argv, capsys)
    assert code == 2 and "Traceback" not in err and "cannot shard" not in err
    assert f"supervised manifest(s) {manifest} (split train) has no row" in err and "(bone_marrow)" in err
    assert "supervised.loss_weight=0" in err


def test_training_warns_about_rows_that_repeat_an_image(tmp_path, caplog):
    rows = [
        ("a.png", "BA", "train"),
        ("sub/../a.png", "BA", "train"),
        ("b.png", "EO", "train"),
        ("b.png", "EO", "test"),
    ]
    pd.DataFrame(
        [{"path": p, "label": label, "dataset": "acevedo", "split": split} for p, label, split in rows]
    ).to_csv(tmp_path / "m.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        frame = training_rows([tmp_path / "m.csv"], "train", "train.dataset_path_unsup")
    assert len(frame) == 3
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("train.dataset_path_unsup: 2 rows name 1 image(s)") and "a.png" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        training_rows([tmp_path / "m.csv"], None, "train.dataset_path_sup")  # b.png twice, in two splits
    assert "3 rows name 2 image(s)" not in caplog.text and "4 rows name 2 image(s)" in caplog.text
