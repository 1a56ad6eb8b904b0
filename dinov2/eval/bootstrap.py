"""Confidence intervals for a fixed test set: a seeded bootstrap over test images, and the paired
difference of two models on the same images.

A resample draws ``len(y_true)`` test images with replacement. Its metric value is the metric
with every image weighted by the number of times it was drawn (the ``sample_weight`` of
:mod:`dinov2.eval.metrics`), so B resamples cost a few ``[B, n]`` matrix products instead of B
metric calls. The interval is the percentile interval: the (1 - confidence)/2 and
(1 + confidence)/2 quantiles of the B resampled values; resamples where a metric is undefined
(nan, e.g. no rare class drawn) are left out of its quantiles. F1 maps predictions onto the label
nodes of the full test set in every resample.

The resamples depend on the seed and the number of test images only, so the intervals of several
protocols on one test set use the same resamples, and :func:`paired_bootstrap` scores two models
on identical resamples: the interval of the difference is then narrower than the two intervals
suggest, because both models see the same hard and easy images.
"""

from collections.abc import Iterator, Mapping

import numpy as np

from dinov2.errors import ConfigError, LabelError
from dinov2.eval.metrics import Metric, MetricFunction

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
CHUNK_ENTRIES = 5_000_000  # resamples x images per weight matrix (20 MB in float32)


def resample_counts(n_images: int, n: int = DEFAULT_RESAMPLES, seed: int = 0) -> Iterator[np.ndarray]:
    """``[b, n_images]`` draw counts (float32) for ``n`` resamples, in chunks of at most :data:`CHUNK_ENTRIES`."""
    if n < 1:
        raise ConfigError(f"the bootstrap needs at least 1 resample, got {n}")
    if n_images < 1:
        raise LabelError("the bootstrap needs at least one test image")
    rng = np.random.default_rng(seed)
    per_chunk = max(1, CHUNK_ENTRIES // n_images)
    for start in range(0, n, per_chunk):
        rows = min(per_chunk, n - start)
        drawn = rng.integers(0, n_images, size=(rows, n_images))
        flat = (np.arange(rows)[:, None] * n_images + drawn).ravel()
        yield np.bincount(flat, minlength=rows * n_images).reshape(rows, n_images).astype(np.float32)


def _quantiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"the confidence level must lie in (0, 1), got {confidence}")
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(finite, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def _resampled(y_true, predictions, metric_fns, tree, n: int, seed: int) -> dict[str, list[np.ndarray]]:
    """``{name: [[n] resampled values for each prediction array]}``, all over the same resamples.

    The statistics of every :class:`~dinov2.eval.metrics.Metric` and prediction array are stacked
    into one ``[images, k]`` matrix, so a chunk of resamples costs one matrix product; any other
    callable is called with the chunk's ``sample_weight``.
    """
    plans, blocks, offset = [], [], 0
    for name, fn in metric_fns.items():
        for i, y_pred in enumerate(predictions):
            stats = fn.statistics(y_true, y_pred, tree) if isinstance(fn, Metric) else None
            columns = slice(offset, offset + stats.columns.shape[1]) if stats is not None else None
            offset = columns.stop if stats is not None else offset
            blocks += [stats.columns] if stats is not None else []
            plans.append((name, i, fn, y_pred, stats, columns))
    stacked = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(y_true), 0))
    # integer statistics: float32 sums stay exact below 2^24
    exact = float(np.abs(stacked).max(initial=0)) * len(y_true) < 2**24
    stacked = stacked.astype(np.float32 if exact else np.float64)
    values = {name: [[] for _ in predictions] for name in metric_fns}
    for counts in resample_counts(len(y_true), n, seed):
        sums = (counts.astype(stacked.dtype) @ stacked).astype(np.float64)
        for name, i, fn, y_pred, stats, columns in plans:
            if stats is not None:
                values[name][i].append(stats.combine(sums[:, columns]))
            else:
                values[name][i].append(np.asarray(fn(y_true, y_pred, tree, sample_weight=counts), dtype=np.float64))
    return {name: [np.concatenate(parts) for parts in per_prediction] for name, per_prediction in values.items()}


def bootstrap_intervals(
    y_true,
    y_pred,
    metric_fns: Mapping[str, MetricFunction],
    tree,
    n: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "low", "high"}}``: the metric on the test set and its bootstrap interval.

    ``metric_fns`` maps names to ``fn(y_true, y_pred, tree, sample_weight=None)`` (e.g.
    :func:`dinov2.eval.metrics.metric_functions`).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    resampled = _resampled(y_true, [y_pred], metric_fns, tree, n, seed)
    result = {}
    for name, fn in metric_fns.items():
        low, high = _quantiles(resampled[name][0], confidence)
        result[name] = {"value": float(fn(y_true, y_pred, tree)), "low": low, "high": high}
    return result


def paired_bootstrap(
    y_true,
    pred_a,
    pred_b,
    metric_fns: Mapping[str, MetricFunction],
    tree,
    n: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, dict[str, float]]:
    """``{metric: {"a", "b", "difference", "low", "high", "n_resamples"}}`` for two models' predictions
    of the same test images: ``difference = metric(a) - metric(b)`` on the test set, and the
    percentile interval of that difference over resamples shared by both models. An interval that
    excludes 0 says that A and B differ on this test set at the given confidence."""
    y_true, pred_a, pred_b = np.asarray(y_true), np.asarray(pred_a), np.asarray(pred_b)
    if pred_a.shape != y_true.shape or pred_b.shape != y_true.shape:
        raise LabelError(
            f"paired bootstrap: {y_true.size} labels but {pred_a.size} and {pred_b.size} predictions; "
            "both models must predict the same test images"
        )
    resampled = _resampled(y_true, [pred_a, pred_b], metric_fns, tree, n, seed)
    result = {}
    for name, fn in metric_fns.items():
        a, b = float(fn(y_true, pred_a, tree)), float(fn(y_true, pred_b, tree))
        differences = resampled[name][0] - resampled[name][1]
        low, high = _quantiles(differences, confidence)
        valid = int((~np.isnan(differences)).sum())
        result[name] = {"a": a, "b": b, "difference": a - b, "low": low, "high": high, "n_resamples": valid}
    return result
