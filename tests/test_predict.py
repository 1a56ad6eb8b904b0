"""Prediction back-off on constructed probabilities, and the predict CLI on a tiny model file."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dinov2.errors import CheckpointError, ConfigError, OutputError
from dinov2.hierarchy import Tree
from dinov2.predict import back_off, main, node_probabilities, predictions_table

# leaves in logit order: band, segmented, eosinophil, monocyte, platelet
NESTED = {
    "myeloid": {"granulocyte": {"neutrophil": ["band", "segmented"], "eosinophil": None}, "monocyte": None},
    "platelet": None,
}


@pytest.fixture(scope="module")
def tree():
    return Tree.from_nested(NESTED)


@pytest.mark.parametrize(
    "probabilities, threshold, expected, expected_probability",
    [
        ([0.85, 0.05, 0.04, 0.03, 0.03], 0.8, "band", 0.85),  # sure: the leaf
        ([0.45, 0.45, 0.05, 0.03, 0.02], 0.8, "neutrophil", 0.90),  # coin-flip band/segmented
        ([0.30, 0.30, 0.10, 0.25, 0.05], 0.8, "myeloid", 0.95),  # only the lineage is sure
        ([0.40, 0.10, 0.05, 0.05, 0.40], 0.8, "root", 1.0),  # not even a lineage
        ([0.36, 0.34, 0.10, 0.10, 0.10], 0.3, "band", 0.36),  # two leaves qualify: the more probable
        ([0.00, 0.00, 0.00, 0.00, 1.00], 1.0, "platelet", 1.0),  # a shallow leaf (depth 1)
    ],
)
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


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    from dinov2.config.custom_hier import get_tree
    from dinov2.models import build_backbone
    from dinov2.models.model_file import save_model_file

    root = tmp_path_factory.mktemp("predict")
    tree = get_tree("v1")
    torch.manual_seed(0)
    backbone = build_backbone("vit_test", img_size=28)
    head = torch.nn.Linear(backbone.embed_dim, len(tree.leaves))
    images = root / "images" / "nested"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, size=(40, 36, 3), dtype=np.uint8)).save(images / f"cell_{i}.png")
    (images / "._cell_0.png").write_bytes(b"macOS resource fork, not an image")  # hidden: skipped
    norm = dict(image_size=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return {
        "root": root,
        "tree": tree,
        "images": root / "images",
        "with_head": save_model_file(root / "with_head.pth", backbone, head, tree, "v1", **norm),
        "without_head": save_model_file(root / "without_head.pth", backbone, None, tree, "v1", **norm),
    }


def test_predict_cli_on_a_folder(model_files):
    out = model_files["root"] / "preds.csv"
    assert (
        main(
            [
                "--model",
                str(model_files["with_head"]),
                "--images",
                str(model_files["images"]),
                "--out",
                str(out),
                "--num-workers",
                "0",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    table = pd.read_csv(out)
    assert len(table) == 5
    assert list(table.columns) == [
        "path",
        "leaf",
        "leaf_probability",
        "node",
        "node_probability",
        "lineage",
        "lineage_probability",
    ]
    tree = model_files["tree"]
    assert set(table["leaf"]) <= set(tree.leaves)
    assert all(tree.at_level(leaf, 1) == lineage for leaf, lineage in zip(table["leaf"], table["lineage"]))
    assert (table["node_probability"] >= 0.8 - 1e-6).all()
    # the chosen node is the leaf or one of its ancestors (probability mass only grows upward)
    assert all(
        node == "root" or node == leaf or node in tree.ancestors(leaf)
        for node, leaf in zip(table["node"], table["leaf"])
    )
    # a manifest works too (labels are not needed); rows keep the manifest's order
    manifest = model_files["root"] / "manifest.csv"
    pd.DataFrame(
        {"path": sorted(table["path"], reverse=True), "label": "", "dataset": "demo_fine", "split": "test"}
    ).to_csv(manifest, index=False)
    assert (
        main(
            [
                "--model",
                str(model_files["with_head"]),
                "--images",
                str(manifest),
                "--out",
                str(out),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    from_manifest = pd.read_csv(out)
    assert from_manifest["path"].tolist() == sorted(table["path"], reverse=True)
    assert from_manifest.set_index("path")["leaf"].to_dict() == table.set_index("path")["leaf"].to_dict()
    # a certainty of 1 is only reached by the root: every answer backs off completely
    assert (
        main(
            [
                "--model",
                str(model_files["with_head"]),
                "--images",
                str(model_files["images"]),
                "--out",
                str(out),
                "--num-workers",
                "0",
                "--threshold",
                "1.0",
            ]
        )
        == 0
    )
    assert set(pd.read_csv(out)["node"]) == {"root"}


def test_predict_needs_a_supervised_head(model_files):
    with pytest.raises(CheckpointError, match="supervised head"):
        main(
            [
                "--model",
                str(model_files["without_head"]),
                "--images",
                str(model_files["images"]),
                "--out",
                str(model_files["root"] / "x.csv"),
            ]
        )


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--num-workers", "-1")])
def test_predict_names_a_bad_extraction_option(model_files, option, value):
    with pytest.raises(ConfigError, match=f"{option} must be"):
        main(
            [
                "--model",
                str(model_files["with_head"]),
                "--images",
                str(model_files["images"]),
                "--out",
                str(model_files["root"] / "x.csv"),
                option,
                value,
            ]
        )


def test_extraction_runs_where_asked_with_the_defaults_of_that_device(monkeypatch):
    import argparse

    from dinov2.eval.features import (
        DEFAULT_BATCH_SIZE,
        add_extraction_arguments,
        default_num_workers,
        extraction_settings,
    )
    from dinov2.utils import precision as precision_module

    parser = argparse.ArgumentParser()
    add_extraction_arguments(parser)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("auto", "cpu"):
        settings = extraction_settings(parser.parse_args(["--device", device, "--precision", "fp32"]))
        assert settings == {
            "device": torch.device("cpu"),
            "precision": precision_module.Precision("fp32", "set explicitly"),
            "batch_size": DEFAULT_BATCH_SIZE,
            "num_workers": default_num_workers(),
        }
    with pytest.raises(ConfigError, match="--device cuda but CUDA is not available"):
        extraction_settings(parser.parse_args(["--device", "cuda"]))
    # auto follows the hardware: a CPU whose bf16 is slow gets fp32, a fast one bf16
    for speedup, expected in ((0.02, "fp32"), (4.0, "bf16")):
        monkeypatch.setattr(precision_module, "cpu_bf16_speedup", lambda speedup=speedup: speedup)
        chosen = extraction_settings(parser.parse_args([]))["precision"]
        assert chosen.name == expected and "auto" in chosen.reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the choice only: nothing runs on it here
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    settings = extraction_settings(parser.parse_args([]))
    assert (settings["device"], settings["batch_size"], settings["num_workers"]) == (torch.device("cuda"), 128, 4)
    assert settings["precision"].name == "bf16"
    assert extraction_settings(parser.parse_args(["--device", "cpu", "--batch-size", "3"]))["batch_size"] == 3


def test_extraction_in_each_precision_gives_the_same_features(model_files):
    """fp32 is the reference; bf16 autocast stays close (the backbone's features, not a re-trained model)."""
    from dinov2.data.transforms import make_eval_transform
    from dinov2.eval.features import extract_features
    from dinov2.models.model_file import load_model_file
    from dinov2.utils.precision import Precision

    model = load_model_file(model_files["with_head"])
    paths = sorted(str(p) for p in model_files["images"].rglob("cell_*.png"))
    transform = make_eval_transform(28, model.mean, model.std)
    fp32, logits = extract_features(model.backbone, paths, transform, model.supervised_head, batch_size=2)
    bf16, _ = extract_features(
        model.backbone, paths, transform, batch_size=3, precision=Precision("bf16", "set explicitly")
    )
    assert fp32.dtype == bf16.dtype == np.float32 and logits.shape == (5, len(model_files["tree"].leaves))
    assert np.abs(fp32 - bf16).max() < 0.1 * np.abs(fp32).max() and not np.array_equal(fp32, bf16)
    default, _ = extract_features(model.backbone, paths, transform, batch_size=5)  # default: fp32, no autocast
    assert np.allclose(default, fp32, atol=1e-5)


@pytest.mark.parametrize("where", ["folder", "under_a_file", "under_proc"])
def test_predict_checks_out_before_inference(model_files, tmp_path, monkeypatch, where):
    from dinov2 import predict

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran before --out was checked")

    monkeypatch.setattr(predict, "extract_features", no_inference)
    if where == "folder":
        out, expected = tmp_path, "is a folder"
    elif where == "under_a_file":
        (tmp_path / "file").write_text("x")
        out, expected = tmp_path / "file" / "preds.csv", "file/preds.csv: its folder .* is a file"
    else:  # no folder can be made there, not even by root
        out, expected = Path("/proc/dino_hier_no_such_folder/preds.csv"), "cannot be used as an output folder"
    with pytest.raises(OutputError, match=expected):
        main(["--model", str(model_files["with_head"]), "--images", str(model_files["images"]), "--out", str(out)])


def test_predict_cli_exits_2_naming_out(model_files, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dinov2.predict",
            "--model",
            str(model_files["with_head"]),
            "--images",
            str(model_files["images"]),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--out" in result.stderr and "Traceback" not in result.stderr
