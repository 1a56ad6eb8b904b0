"""Bootstrap intervals and the paired bootstrap on constructed predictions with known spread."""

import math

import numpy as np
import pytest

from dinov2.config.custom_hier import get_tree
from dinov2.errors import ConfigError, LabelError
from dinov2.eval import bootstrap, metrics


@pytest.fixture(scope="module")
def tree():
    return get_tree("v1")


def labelled_predictions(tree, n_images: int, accuracy: float, seed: int = 0):
    """Labels over five leaves; a prediction is right with probability ``accuracy``, else another leaf."""
    rng = np.random.default_rng(seed)
    leaves = np.array([tree.index(n) for n in ("basophil", "eosinophil", "monocyte", "platelet", "myelocyte")])
    y_true = rng.choice(leaves, size=n_images)
    wrong = np.where(y_true == leaves[0], leaves[1], leaves[0])
    return y_true, np.where(rng.random(n_images) < accuracy, y_true, wrong)


def test_resample_counts_are_seeded_draws_of_n_images_in_chunks(monkeypatch):
    monkeypatch.setattr(bootstrap, "CHUNK_ENTRIES", 70)  # 7 resamples of 10 images per chunk
    chunks = list(bootstrap.resample_counts(10, n=20, seed=3))
    assert [c.shape for c in chunks] == [(7, 10), (7, 10), (6, 10)]
    counts = np.concatenate(chunks)
    assert (counts.sum(axis=1) == 10).all() and counts.min() >= 0
    assert np.array_equal(counts, np.concatenate(list(bootstrap.resample_counts(10, n=20, seed=3))))
    assert not np.array_equal(counts, np.concatenate(list(bootstrap.resample_counts(10, n=20, seed=4))))
    # about 1 - 1/e of the images are drawn in a resample
    assert (counts > 0).mean() == pytest.approx(1 - math.exp(-1), abs=0.1)
    with pytest.raises(ConfigError, match="at least 1 resample"):
        next(bootstrap.resample_counts(10, n=0))


def test_the_accuracy_interval_has_the_binomial_width(tree):
    y_true, y_pred = labelled_predictions(tree, 2000, accuracy=0.8)
    result = bootstrap.bootstrap_intervals(y_true, y_pred, {"accuracy": metrics.accuracy}, tree, n=1000, seed=0)
    value, low, high = (result["accuracy"][k] for k in ("value", "low", "high"))
    assert value == pytest.approx(metrics.accuracy(y_true, y_pred, tree))
    assert low < value < high
    expected_width = 2 * 1.96 * math.sqrt(value * (1 - value) / y_true.size)
    assert high - low == pytest.approx(expected_width, rel=0.15)
    again = bootstrap.bootstrap_intervals(y_true, y_pred, {"accuracy": metrics.accuracy}, tree, n=1000, seed=0)
    assert again == result


def test_every_metric_gets_an_interval_and_undefined_resamples_are_left_out(tree):
    y_true, y_pred = labelled_predictions(tree, 300, accuracy=0.7)
    y_true[:2] = tree.index("neutrophil")  # a rare coarse class: absent from ~13 % of the resamples
    functions = metrics.metric_functions(tree, rare=[tree.index("neutrophil")])
    result = bootstrap.bootstrap_intervals(y_true, y_pred, functions, tree, n=200, seed=1)
    assert list(result) == list(functions)
    for name, interval in result.items():
        assert interval["low"] <= interval["high"], name
    assert not math.isnan(result["rare_balanced_accuracy"]["low"])


def test_paired_bootstrap_of_a_model_against_itself_and_against_a_better_one(tree):
    y_true, worse = labelled_predictions(tree, 1000, accuracy=0.7, seed=0)
    better = worse.copy()
    fixed = np.flatnonzero(worse != y_true)[:100]  # 100 more right answers, nothing else changed
    better[fixed] = y_true[fixed]
    functions = {"accuracy": metrics.accuracy, "balanced_accuracy": metrics.balanced_accuracy}
    same = bootstrap.paired_bootstrap(y_true, worse, worse, functions, tree, n=300)
    assert same["accuracy"]["difference"] == 0 and same["accuracy"]["low"] == same["accuracy"]["high"] == 0
    result = bootstrap.paired_bootstrap(y_true, better, worse, functions, tree, n=300)["accuracy"]
    assert result["difference"] == pytest.approx(0.1) and result["a"] - result["b"] == pytest.approx(0.1)
    assert 0 < result["low"] < 0.1 < result["high"] and result["n_resamples"] == 300
    # paired: the difference is far tighter than each model's own interval
    alone = bootstrap.bootstrap_intervals(y_true, better, functions, tree, n=300)["accuracy"]
    assert result["high"] - result["low"] < 0.7 * (alone["high"] - alone["low"])
    with pytest.raises(LabelError, match="same test images"):
        bootstrap.paired_bootstrap(y_true, better[:-1], worse, functions, tree)
