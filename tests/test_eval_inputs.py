"""What evaluation refuses or repairs: duplicate images, a busy output folder, a damaged feature cache;
how labelled rows are split and counted; which models a training folder holds."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dinov2.config.custom_hier import get_tree
from dinov2.data.manifest import find_duplicate_images
from dinov2.errors import CheckpointError, ConfigError, DataError
from dinov2.eval import features, labelled_data, output_lock, plots, training_run


def write_image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return str(path)


def test_duplicates_by_path_and_by_content(tmp_path):
    a = write_image(tmp_path / "a.png", (10, 20, 30))
    b = write_image(tmp_path / "b.png", (40, 50, 60))  # same size as a, other content: no duplicate
    copy = write_image(tmp_path / "sub" / "copy_of_a.png", (10, 20, 30))
    (tmp_path / "link.png").symlink_to(tmp_path / "b.png")
    paths = [a, b, str(tmp_path / "sub" / ".." / "b.png"), copy, str(tmp_path / "link.png"), str(tmp_path / "gone.png")]
    assert find_duplicate_images(paths) == [[0, 3], [1, 2, 4]]
    assert find_duplicate_images([a, b, str(tmp_path / "gone.png")]) == []
    assert find_duplicate_images([str(tmp_path / "gone.png")] * 2) == [[0, 1]]  # unreadable: by path alone


def test_evaluation_refuses_duplicates_naming_rows_and_manifests(tmp_path):
    a = write_image(tmp_path / "a.png", (10, 20, 30))
    copy = write_image(tmp_path / "copy.png", (10, 20, 30))
    other = write_image(tmp_path / "other.png", (1, 2, 3))
    tree = get_tree("v1")
    train = pd.DataFrame({"path": [a, other], "label": "basophil", "dataset": "demo_fine", "split": "train"})
    test = pd.DataFrame({"path": [copy], "label": "basophil", "dataset": "demo_fine", "split": "test"})
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    sets = [
        labelled_data.resolve_set(labelled_data.read_source(str(tmp_path / name), None), tree, flat=False)
        for name in ("train.csv", "test.csv")
    ]
    with pytest.raises(DataError, match=r"1 image\(s\) appear more than once") as error:
        labelled_data.refuse_duplicates(sets)
    assert "train.csv line 2" in str(error.value) and "test.csv line 2" in str(error.value)
    labelled_data.refuse_duplicates(sets[:1])  # no duplicate within the training manifest alone


def test_left_out_rows_are_counted_with_their_reason(tmp_path):
    image = write_image(tmp_path / "x.png", (0, 0, 0))
    frame = pd.DataFrame(
        {
            "path": [image] * 5,
            "label": ["BAS", "ART", "ART", "", "NIF"],
            "dataset": "bone_marrow",
            "split": ["train", "test", "test", "val", "test"],
        }
    )
    frame.to_csv(tmp_path / "bm.csv", index=False)
    labelled = labelled_data.resolve_set(labelled_data.read_source(str(tmp_path / "bm.csv"), None), get_tree(), False)
    assert len(labelled.frame) == 1 and labelled.frame["line"].tolist() == [2]
    assert labelled.left_out == [
        {"reason": "no label (empty label column)", "count": 1},
        {"reason": "label mapped to no node in DATASETS: ART (2), NIF (1)", "count": 3},
    ]


def test_flat_tree_uses_the_raw_labels_and_plans_train_on_a_test_on_b(tmp_path):
    image = write_image(tmp_path / "x.png", (0, 0, 0))
    a = pd.DataFrame({"path": [image] * 3, "label": ["cat", "dog", "cat"], "dataset": "d1", "split": "train"})
    b = pd.DataFrame({"path": [image] * 2, "label": ["dog", "bird"], "dataset": "d2", "split": "test"})
    frames = [a.assign(source="a.csv", line=[2, 3, 4]), b.assign(source="b.csv", line=[2, 3])]
    tree = labelled_data.flat_tree(frames)
    assert tree.leaves == ("bird", "cat", "dog") and tree.max_depth == 1
    train, test = (labelled_data.resolve_set(frame, tree, flat=True) for frame in frames)
    plan = labelled_data.plan_evaluation([test], [train], split=False, n_folds=5, seed=0)
    assert plan.fixed_test_set and plan.design == "trained on a.csv; tested on b.csv"
    ((train_rows, test_rows),) = plan.folds
    assert train_rows.tolist() == [0, 1, 2] and test_rows.tolist() == [3, 4]
    assert [tree.nodes[i] for i in plan.labels] == ["cat", "dog", "cat", "dog", "bird"]
    with pytest.raises(DataError, match="raw labels as class names"):
        labelled_data.flat_tree([a.assign(label=" padded")])


def test_a_damaged_cache_is_detected_and_extracted_again(tmp_path):
    calls = []

    def extract():
        calls.append(1)
        return np.arange(12, dtype=np.float32).reshape(3, 4), None

    path = features.feature_cache_path(tmp_path, "my manifest.csv", "ab" * 32)
    assert path.name == "my_manifest.csv-abababababababab.npz"
    first = features.cached_features(path, "ab" * 32, extract)
    assert not first.reused and first.problem is None and len(calls) == 1
    second = features.cached_features(path, "ab" * 32, extract)
    assert second.reused and np.array_equal(second.features, first.features) and len(calls) == 1
    assert features.verify_feature_cache(path, "cd" * 32) == "written for other inputs"

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    assert "SHA-256" in features.verify_feature_cache(path, "ab" * 32)
    repaired = features.cached_features(path, "ab" * 32, extract)
    assert not repaired.reused and repaired.problem.startswith("damaged") and len(calls) == 2
    assert features.cached_features(path, "ab" * 32, extract).reused

    path.write_bytes(path.read_bytes()[:100])  # truncated: was a BadZipFile on every rerun
    assert "bytes" in features.verify_feature_cache(path, "ab" * 32)
    assert features.cached_features(path, "ab" * 32, extract).problem.startswith("damaged")
    path.with_name(path.name + ".json").unlink()
    assert "record is missing" in features.verify_feature_cache(path, "ab" * 32)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


HOLD_LOCK = """
import sys, time
from dinov2.eval.output_lock import output_folder_lock
with output_folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_into_a_busy_output_folder_fails_at_once_naming_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        with pytest.raises(ConfigError, match=f"in use by another evaluation \\(pid {holder.pid} on host"):
            with output_lock.output_folder_lock(tmp_path):
                pass
        assert time.perf_counter() - start < 5
        holder.send_signal(signal.SIGKILL)  # a killed run leaves no stale lock
        holder.wait()
        with output_lock.output_folder_lock(tmp_path):
            record = json.loads((tmp_path / output_lock.LOCK_NAME).read_text())
            assert record["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


def test_an_output_folder_where_a_file_stands_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--output-dir .*file/out cannot be used"):
        with output_lock.output_folder_lock(tmp_path / "file" / "out"):
            pass


def test_run_models_lists_exported_models_by_step(tmp_path):
    with pytest.raises(CheckpointError, match="without exported models"):
        training_run.run_models(tmp_path)
    for name in ("eval/step_0000200/model.pth", "eval/step_0000050/model.pth", "model.pth", "checkpoint_0000300.pth"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "eval" / "step_0000100").mkdir()  # pruned or half-written: no model.pth
    (tmp_path / "eval" / "notes").mkdir()
    found = training_run.run_models(tmp_path)
    assert [(step, name) for step, name, _ in found] == [(50, "step_0000050"), (200, "step_0000200"), (300, "final")]
    (tmp_path / "checkpoint_0000300.pth").unlink()
    assert training_run.run_models(tmp_path)[-1][:2] == (None, "final")


def test_embedding_names_its_method_and_falls_back_to_pca(monkeypatch):
    points = np.random.default_rng(0).normal(size=(40, 6))
    monkeypatch.setattr(plots.importlib.util, "find_spec", lambda name: None)  # umap-learn not installed
    embedded, method = plots.embed_2d(points, "auto")
    assert method == "PCA" and embedded.shape == (40, 2)
    with pytest.raises(ConfigError, match="umap-learn"):
        plots.embed_2d(points, "umap")
    with pytest.raises(ConfigError, match="unknown embedding"):
        plots.embed_2d(points, "tsne")


def test_prefetched_keeps_the_order_and_raises_the_producers_error_in_place():
    assert list(features.prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise DataError("image file x.png cannot be decoded")

    consumed = []
    with pytest.raises(DataError, match="x.png"):
        for item in features.prefetched(failing()):
            consumed.append(item)
    assert consumed == [1, 2]
    early = features.prefetched(iter(range(1000)))
    assert next(early) == 0
    early.close()  # the consumer stops: the producer thread ends too
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]
