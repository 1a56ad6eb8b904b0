"""The whole eval_hier CLI on a tiny generated data set and a tiny model file (vit_test, 28 px)."""

import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from dinov2.config import custom_hier
from dinov2.config.custom_hier import get_tree
from dinov2.data.manifest import read_manifests
from dinov2.data.synthetic_cells import generate_demo_dataset
from dinov2.errors import ConfigError, DataError, LabelError
from dinov2.eval import eval_hier, metrics, protocols
from dinov2.eval.output_lock import output_folder_lock
from dinov2.models import build_backbone
from dinov2.models.model_file import save_model_file

IMAGE_SIZE = 28


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo images (14 leaves + 3 coarse nodes, 4 each) and two model files: with and without a head."""
    root = tmp_path_factory.mktemp("eval_cli")
    manifest = generate_demo_dataset(root / "data", n_per_class=4, size=32, seed=0)
    tree = get_tree("v1")
    torch.manual_seed(0)
    backbone = build_backbone("vit_test", img_size=IMAGE_SIZE)
    head = torch.nn.Linear(backbone.embed_dim, len(tree.leaves))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    with_head = save_model_file(root / "with_head.pth", backbone, head, tree, "v1", IMAGE_SIZE, mean, std)
    without_head = save_model_file(root / "without_head.pth", backbone, None, tree, "v1", IMAGE_SIZE, mean, std)
    raw = root / "raw_backbone.pth"
    torch.save(backbone.state_dict(), raw)
    return {
        "root": root,
        "manifest": manifest,
        "with_head": with_head,
        "without_head": without_head,
        "raw": raw,
        "tree": tree,
    }


def run(demo, out, *extra):
    return eval_hier.main(
        [
            "--model",
            str(demo["with_head"]),
            "--data",
            str(demo["manifest"]),
            "--output-dir",
            str(out),
            "--folds",
            "2",
            "--batch-size",
            "16",
            "--num-workers",
            "0",
            "--embedding",
            "pca",
            *extra,
        ]
    )


def test_cli_writes_every_output_and_reuses_the_feature_cache(demo, monkeypatch):
    out = demo["root"] / "out"
    assert run(demo, out) == 0
    protocols = ["knn_k1", "knn_k20", "logreg", "head"]
    expected = ["predictions.csv", "metrics.json", "metrics.csv", "report.md", "embedding.png"]
    expected += [f"{kind}_{p}.png" for p in protocols for kind in ("confusion", "tree")]
    for name in expected:
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "features").glob("manifest-*.npz"))) == 1

    summary = json.loads((out / "metrics.json").read_text())
    assert list(summary["protocols"]) == protocols
    assert [cache["reused"] for cache in summary["run"]["feature_caches"]] == [False]
    assert summary["run"]["precision"]["name"] in ("fp32", "bf16") and summary["run"]["precision"]["reason"]
    n_samples = summary["run"]["n_samples"]
    assert n_samples == 17 * 4 and summary["run"]["n_internal_labelled"] == 3 * 4
    assert summary["run"]["left_out"] == [] and "interval" not in summary["protocols"]["knn_k1"]

    # every sample once per protocol; the numbers can be recomputed from predictions.csv
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns[:7]) == [
        "path",
        "label",
        "dataset",
        "label_node",
        "predicted_node",
        "correct",
        "fold",
    ]
    assert len(predictions) == n_samples * len(protocols)
    tree = demo["tree"]
    fold = predictions[(predictions["protocol"] == "knn_k20") & (predictions["fold"] == 1)]
    y_true = np.array([tree.index(n) for n in fold["label_node"]])
    y_pred = np.array([tree.index(n) for n in fold["predicted_node"]])
    recorded = summary["protocols"]["knn_k20"]["folds"][1]
    hierarchical_f1 = metrics.hierarchical_precision_recall_f1(y_true, y_pred, tree)[2]
    assert recorded["hierarchical_f1"] == pytest.approx(hierarchical_f1)
    assert recorded["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy(y_true, y_pred, tree))
    head_rows = predictions[predictions["protocol"] == "head"]
    assert set(head_rows["predicted_node"]) <= set(tree.leaves)

    table = pd.read_csv(out / "metrics.csv")
    assert set(table["fold"].astype(str)) == {"0", "1", "mean", "std"}
    assert set(table["dataset"]) == {"all", "demo_coarse", "demo_fine"}
    report = (out / "report.md").read_text()
    assert "## Accuracy per level" in report and "## Worst confusions" in report and "| tree distance |" in report
    assert "## Per data set" in report and "precision: " in report and "left out: none" in report

    # second run, same inputs: the cache is read, nothing is extracted
    monkeypatch.setattr(eval_hier, "extract_features", no_extraction)
    assert run(demo, out, "--protocols", "head", "--split", "--bootstrap", "200") == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert [cache["reused"] for cache in summary["run"]["feature_caches"]] == [True]
    assert list(summary["protocols"]) == ["head"]
    head = summary["protocols"]["head"]
    assert len(head["folds"]) == 1
    interval = head["interval"]["hierarchical_f1"]  # a fixed test set: a bootstrap interval per metric
    assert interval["low"] <= interval["value"] == head["folds"][0]["hierarchical_f1"] <= interval["high"]
    split_rows = pd.read_csv(out / "predictions.csv")
    manifest = pd.read_csv(demo["manifest"])
    assert len(split_rows) == (manifest["split"] == "test").sum()
    left_out = summary["run"]["left_out"]  # the val rows: counted, with the reason
    assert [entry["count"] for entry in left_out] == [(manifest["split"] == "val").sum()]
    assert "neither train nor test" in left_out[0]["reason"]
    table = pd.read_csv(out / "metrics.csv")
    assert set(table["fold"].astype(str)) == {"0", "ci_low", "ci_high"}


def test_raw_backbone_needs_an_arch(demo, tmp_path):
    args = [
        "--model",
        str(demo["raw"]),
        "--data",
        str(demo["manifest"]),
        "--output-dir",
        str(tmp_path),
        "--folds",
        "2",
        "--num-workers",
        "0",
        "--embedding",
        "pca",
        "--protocols",
        "knn",
        "--image-size",
        str(IMAGE_SIZE),
    ]
    with pytest.raises(ConfigError, match="--arch"):
        eval_hier.main(args)
    assert eval_hier.main(args + ["--arch", "vit_test"]) == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["run"]["hierarchy"] == "v1" and list(summary["protocols"]) == ["knn_k1", "knn_k20"]


def test_bad_inputs_are_loud(demo, tmp_path):
    base = ["--data", str(demo["manifest"]), "--output-dir", str(tmp_path), "--folds", "2", "--num-workers", "0"]
    with pytest.raises(ConfigError, match="supervised head"):
        eval_hier.main(["--model", str(demo["without_head"]), "--protocols", "head", *base])
    with pytest.raises(ConfigError, match="unknown protocol"):
        eval_hier.main(["--model", str(demo["with_head"]), "--protocols", "svm", *base])
    bad = tmp_path / "bad.csv"
    pd.read_csv(demo["manifest"]).assign(label="not_a_cell").to_csv(bad, index=False)
    with pytest.raises(LabelError, match="not_a_cell"):
        eval_hier.main(["--model", str(demo["with_head"]), "--data", str(bad), "--output-dir", str(tmp_path)])
    with pytest.raises(DataError, match="no such manifest"):
        eval_hier.main(
            ["--model", str(demo["with_head"]), "--data", str(tmp_path / "missing.csv"), "--output-dir", str(tmp_path)]
        )


def test_user_error_exits_2_without_traceback(demo, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dinov2.eval.eval_hier",
            "--model",
            str(demo["raw"]),
            "--data",
            str(demo["manifest"]),
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--arch" in result.stderr and "Traceback" not in result.stderr


def test_folder_of_class_subfolders(demo, tmp_path):
    folder = demo["root"] / "data" / "images" / "demo_fine"  # one subfolder per leaf name
    assert (
        eval_hier.main(
            [
                "--model",
                str(demo["without_head"]),
                "--data",
                str(folder),
                "--dataset",
                "demo_fine",
                "--output-dir",
                str(tmp_path),
                "--protocols",
                "knn",
                "--split",
                "--num-workers",
                "0",
                "--embedding",
                "pca",
            ]
        )
        == 0
    )
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert set(predictions["label_node"]) <= set(demo["tree"].leaves)
    assert len(predictions) == 2 * 14  # knn_k1 + knn_k20 on the 20 % test rows: 1 of 4 images per leaf


def test_knn_weighted_vote_beats_plain_majority():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = np.array([5, 5, 7])
    test = np.array([[0.2, 1.0]])
    assert protocols.knn_predict(train, labels, test, k=1).tolist() == [7]
    # two far neighbours of node 5 lose against one very close neighbour of node 7: exp(s / 0.07) weights
    assert protocols.knn_predict(train, labels, test, k=3).tolist() == [7]
    assert protocols.knn_predict(train, labels, np.array([[1.0, 0.05]]), k=20).tolist() == [5]
    # several k from one neighbour search give what each k alone gives
    rng = np.random.default_rng(0)
    many_train, many_labels, many_test = rng.normal(size=(60, 5)), rng.integers(0, 4, 60), rng.normal(size=(30, 5))
    shared = protocols.knn_predict_ks(many_train, many_labels, many_test, (1, 5, 20), chunk_size=7)
    for k in (1, 5, 20):
        assert np.array_equal(shared[k], protocols.knn_predict(many_train, many_labels, many_test, k))


def test_logreg_predicts_training_nodes():
    rng = np.random.default_rng(0)
    labels = np.repeat([3, 11, 20], 10)
    features = rng.normal(size=(30, 8)) + 4.0 * np.eye(8)[[0, 1, 2]].repeat(10, axis=0)
    predicted = protocols.logreg_predict(features[::2], labels[::2], features[1::2])
    assert (predicted == labels[1::2]).mean() >= 0.9
    assert protocols.logreg_predict(features[:5], labels[:5], features[5:8]).tolist() == [3, 3, 3]


def test_folds():
    labels = np.repeat([0, 1, 2], [6, 4, 2])
    folds = protocols.stratified_folds(labels, 2, seed=0)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(12))
    assert all(set(train).isdisjoint(test) for train, test in folds)
    assert [np.bincount(labels[test], minlength=3).tolist() for _, test in folds] == [[3, 2, 1], [3, 2, 1]]
    with pytest.raises(DataError, match="folds"):
        protocols.stratified_folds(labels, 7)
    with pytest.raises(DataError, match="split 'test'"):
        protocols.manifest_split_fold(["train", "val", "train"])
    train, test = protocols.manifest_split_fold(["train", "test", "val", "train"])[0]
    assert train.tolist() == [0, 3] and test.tolist() == [1]


def no_extraction(*args, **kwargs):
    raise AssertionError("features were extracted")


def test_train_on_one_set_test_on_others_with_intervals_and_one_extraction_per_manifest(demo, tmp_path, monkeypatch):
    frame = read_manifests([demo["manifest"]])
    held_out = frame["split"] != "train"
    manifests = {
        "train": frame[~held_out],
        "fine_test": frame[held_out & (frame["dataset"] == "demo_fine")],
        "coarse_test": frame[held_out & (frame["dataset"] == "demo_coarse")],
    }
    for name, rows in manifests.items():
        rows.to_csv(tmp_path / f"{name}.csv", index=False)
    cache = tmp_path / "cache"
    base = ["--model", str(demo["with_head"]), "--train-data", str(tmp_path / "train.csv"), "--feature-cache"]
    base += [str(cache), "--protocols", "knn,logreg", "--bootstrap", "200", "--num-workers", "0", "--embedding", "pca"]
    both = tmp_path / "both"
    tests = [str(tmp_path / "fine_test.csv"), str(tmp_path / "coarse_test.csv")]
    assert eval_hier.main([*base, "--data", *tests, "--output-dir", str(both)]) == 0
    summary = json.loads((both / "metrics.json").read_text())
    run_info = summary["run"]
    assert run_info["evaluation"].startswith("trained on") and run_info["n_train_images"] == len(manifests["train"])
    assert run_info["n_samples"] == held_out.sum() and run_info["n_internal_labelled"] > 0
    assert len(list(cache.glob("*.npz"))) == 3  # one cache file per manifest

    result = summary["protocols"]["logreg"]
    assert set(result["datasets"]) == {"demo_fine", "demo_coarse"}
    predictions = pd.read_csv(both / "predictions.csv")
    for name, scores in [("demo_coarse", result["datasets"]["demo_coarse"]), (None, result)]:
        rows = predictions[(predictions["protocol"] == "logreg") & ((predictions["dataset"] == name) | (name is None))]
        interval = scores["interval"]["accuracy"]  # every labelled image counts, coarse labels too
        assert interval["value"] == pytest.approx(rows["correct"].mean())
        assert interval["low"] <= interval["value"] <= interval["high"] and interval["low"] < interval["high"]
    report = (both / "report.md").read_text()
    assert "## Per data set" in report and "95 % percentile bootstrap intervals" in report
    table = pd.read_csv(both / "metrics.csv")
    assert {"ci_low", "ci_high"} <= set(table["fold"].astype(str)) and "demo_coarse" in set(table["dataset"])

    # another test set later: the training set's features come from the shared cache
    monkeypatch.setattr(eval_hier, "extract_features", no_extraction)
    coarse_only = tmp_path / "coarse_only"
    assert eval_hier.main([*base, "--data", str(tmp_path / "coarse_test.csv"), "--output-dir", str(coarse_only)]) == 0
    again = json.loads((coarse_only / "metrics.json").read_text())
    assert all(cache["reused"] for cache in again["run"]["feature_caches"])
    # the same images and seed give the same resamples: the same interval as the data-set row above
    assert again["protocols"]["logreg"]["interval"] == result["datasets"]["demo_coarse"]["interval"]
    with pytest.raises(ConfigError, match="exclude each other"):
        eval_hier.main([*base, "--data", str(tmp_path / "coarse_test.csv"), "--output-dir", str(tmp_path), "--split"])


def test_hierarchy_none_scores_raw_labels_as_flat_classes_and_skips_the_head_with_a_note(demo, tmp_path):
    assert run(demo, tmp_path, "--hierarchy", "none") == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["run"]["hierarchy"] == "none" and summary["run"]["hierarchical_metrics"] is False
    assert list(summary["protocols"]) == ["knn_k1", "knn_k20", "logreg"]
    assert "supervised head" in summary["run"]["skipped_protocols"]["head"]
    assert set(summary["protocols"]["logreg"]["mean"]) == {
        "accuracy",
        "balanced_accuracy",
        "f1_weighted",
        "f1_macro",
        "rare_balanced_accuracy",
    }
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert (predictions["label_node"] == predictions["label"]).all()
    report = (tmp_path / "report.md").read_text()
    assert "hierarchical metrics (coarse accuracy" in report and "are left out" in report
    assert "protocol `head` skipped" in report and not list(tmp_path.glob("tree_*.png"))
    with pytest.raises(ConfigError, match="nothing to run"):
        run(demo, tmp_path / "head_only", "--hierarchy", "none", "--protocols", "head")


def test_another_hierarchy_evaluates_the_backbone_and_skips_the_head(demo, tmp_path, monkeypatch):
    nested = copy.deepcopy(custom_hier.HIERARCHIES["v1"])
    nested["artefact"] = ["smudge_cell", "debris"]
    monkeypatch.setitem(custom_hier.HIERARCHIES, "v1_debris", nested)
    assert run(demo, tmp_path, "--hierarchy", "v1_debris", "--protocols", "knn,head") == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["run"]["hierarchy"] == "v1_debris" and summary["run"]["n_leaves"] == len(demo["tree"].leaves) + 1
    assert "differs from the model file's tree" in summary["run"]["tree_note"]
    assert list(summary["protocols"]) == ["knn_k1", "knn_k20"] and "head" in summary["run"]["skipped_protocols"]


@pytest.mark.slow
def test_compare_reports_the_paired_bootstrap_difference(demo, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run(demo, first, "--split", "--protocols", "knn", "--bootstrap", "100") == 0
    assert run(demo, second, "--split", "--protocols", "logreg,knn", "--bootstrap", "100", "--compare", str(first)) == 0
    comparison = json.loads((second / "metrics.json").read_text())["comparison"]
    assert list(comparison["protocols"]) == ["knn_k1", "knn_k20"] and comparison["resamples"] == 100
    same = comparison["protocols"]["knn_k1"]["accuracy"]  # the same features and classifier: no difference
    assert same["difference"] == 0 and same["low"] == same["high"] == 0 and same["a"] == same["b"]
    assert "## Compared with" in (second / "report.md").read_text()
    fewer = tmp_path / "fewer"  # a run that scored one image less cannot be paired
    fewer.mkdir()
    pd.read_csv(first / "predictions.csv").iloc[1:].to_csv(fewer / "predictions.csv", index=False)
    with pytest.raises(DataError, match="different images"):
        run(demo, tmp_path / "third", "--split", "--protocols", "knn", "--compare", str(fewer))


@pytest.mark.slow
def test_a_training_folder_gives_metrics_over_iterations(demo, tmp_path):
    run_dir = tmp_path / "run"
    for step in (10, 20):
        (run_dir / "eval" / f"step_{step:07d}").mkdir(parents=True)
        shutil.copy(demo["without_head"], run_dir / "eval" / f"step_{step:07d}" / "model.pth")
    shutil.copy(demo["with_head"], run_dir / "model.pth")
    (run_dir / "checkpoint_0000030.pth").write_bytes(b"")
    out = tmp_path / "out"
    args = ["--model", str(run_dir), "--data", str(demo["manifest"]), "--output-dir", str(out), "--split"]
    assert eval_hier.main([*args, "--protocols", "knn", "--num-workers", "0", "--embedding", "pca"]) == 0
    table = pd.read_csv(out / "metrics_over_training.csv")
    assert table["step"].tolist() == [10, 10, 20, 20, 30, 30]
    assert table["protocol"].tolist() == ["knn_k1", "knn_k20"] * 3
    assert table["model"].tolist()[::2] == ["step_0000010", "step_0000020", "final"]
    assert (out / "metrics_over_training.png").stat().st_size > 0
    assert all((out / name / "report.md").is_file() for name in ("step_0000010", "step_0000020", "final"))
    assert (table.groupby("protocol")["balanced_accuracy"].nunique() == 1).all()  # one backbone in all three files


def test_a_busy_output_folder_or_duplicate_rows_are_refused_before_any_work(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(eval_hier, "extract_features", no_extraction)
    with output_folder_lock(tmp_path):
        with pytest.raises(ConfigError, match=f"in use by another evaluation \\(pid {os.getpid()}"):
            run(demo, tmp_path)
    frame = read_manifests([demo["manifest"]])
    pd.concat([frame, frame.iloc[[3]]]).to_csv(tmp_path / "duplicated.csv", index=False)
    args = ["--model", str(demo["with_head"]), "--data", str(tmp_path / "duplicated.csv")]
    with pytest.raises(DataError, match=r"1 image\(s\) appear more than once.*duplicated.csv line 5"):
        eval_hier.main([*args, "--output-dir", str(tmp_path / "out")])


def test_a_damaged_feature_cache_is_extracted_again_and_reported(demo, tmp_path):
    assert run(demo, tmp_path, "--protocols", "knn") == 0
    (cache,) = (tmp_path / "features").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:-50])
    assert run(demo, tmp_path, "--protocols", "knn") == 0
    (record,) = json.loads((tmp_path / "metrics.json").read_text())["run"]["feature_caches"]
    assert record["reused"] is False and record["problem"].startswith("damaged")
    assert "extracted again" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_umap_embedding_where_umap_learn_is_installed(demo, tmp_path):
    pytest.importorskip("umap")
    assert run(demo, tmp_path, "--protocols", "knn", "--embedding", "umap") == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["run"]["embedding"] == "UMAP" and "feature embedding (UMAP)" in (tmp_path / "report.md").read_text()
