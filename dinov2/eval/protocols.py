"""Evaluation protocols on frozen features: k-NN, logistic regression and the model's own supervised head.

Classifiers are trained on the label nodes present in the training rows (leaf or internal), so
their predictions are nodes too; the head predicts leaves. See :mod:`dinov2.eval.metrics` for
how a prediction is scored against a label at any depth.
"""

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from dinov2.errors import ConfigError, DataError

KNN_KS = (1, 20)
KNN_TEMPERATURE = 0.07
PROTOCOL_GROUPS = {"knn": tuple(f"knn_k{k}" for k in KNN_KS), "logreg": ("logreg",), "head": ("head",)}

Fold = tuple[np.ndarray, np.ndarray]


def expand_protocols(names: Sequence[str]) -> list[str]:
    """``["knn", "logreg"]`` -> ``["knn_k1", "knn_k20", "logreg"]``; ConfigError for an unknown name."""
    expanded: list[str] = []
    for name in names:
        if name not in PROTOCOL_GROUPS:
            raise ConfigError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOL_GROUPS)}")
        expanded += [p for p in PROTOCOL_GROUPS[name] if p not in expanded]
    return expanded


def knn_predict(
    train_features, train_labels, test_features, k: int, temperature: float = KNN_TEMPERATURE, chunk_size: int = 2048
) -> np.ndarray:
    """Cosine k-NN with DINOv2's weighted vote.

    Features are L2-normalised; each of the k most similar training samples (cosine similarity s)
    votes for its label with weight ``exp(s / temperature)``; the label with the largest summed
    weight wins (ties: the smaller node index). k = 1 is plain nearest neighbour.
    """
    return knn_predict_ks(train_features, train_labels, test_features, (k,), temperature, chunk_size)[k]


def knn_predict_ks(
    train_features, train_labels, test_features, ks, temperature: float = KNN_TEMPERATURE, chunk_size: int = 2048
) -> dict[int, np.ndarray]:
    """:func:`knn_predict` for several k at once: one similarity matrix and one ``topk(max k)`` per chunk
    of test rows, each k voting with the first k of those (sorted) neighbours."""
    classes, train_classes = np.unique(np.asarray(train_labels), return_inverse=True)
    train = torch.nn.functional.normalize(torch.as_tensor(np.asarray(train_features), dtype=torch.float32), dim=1)
    test = torch.nn.functional.normalize(torch.as_tensor(np.asarray(test_features), dtype=torch.float32), dim=1)
    train_classes = torch.as_tensor(train_classes)
    ks = sorted(set(ks))
    predicted: dict[int, list] = {k: [] for k in ks}
    for start in range(0, test.shape[0], chunk_size):
        similarity, neighbours = (test[start : start + chunk_size] @ train.T).topk(min(ks[-1], train.shape[0]), dim=1)
        weights, neighbour_classes = (similarity / temperature).exp(), train_classes[neighbours]
        for k in ks:
            votes = torch.zeros(similarity.shape[0], len(classes))
            votes.scatter_add_(1, neighbour_classes[:, :k], weights[:, :k])
            predicted[k].append(votes.argmax(dim=1))
    return {
        k: classes[torch.cat(parts).numpy()].astype(np.int64) if parts else np.empty(0, dtype=np.int64)
        for k, parts in predicted.items()
    }


def logreg_predict(train_features, train_labels, test_features, max_iter: int = 1000) -> np.ndarray:
    """Multinomial logistic regression (L-BFGS) as DinoBloom evaluates: raw (unscaled) features,
    L2 coefficient λ = 100 / (feature_dim × n_classes), i.e. scikit-learn's ``C = 1/λ``.

    A training fold with a single class predicts that class. Non-convergence after ``max_iter``
    iterations is tolerated silently (DinoBloom's setting). BLAS runs on one thread here: the
    products (samples x features x classes) are too small for threads to pay, and on a busy
    machine OpenBLAS's spinning threads made a 5-fold fit of 5,000 x 384 features take 17 s instead
    of 0.5 s (scripts/bench_eval.py).
    """
    train_labels = np.asarray(train_labels)
    classes = np.unique(train_labels)
    if classes.size == 1:
        return np.full(len(test_features), classes[0], dtype=np.int64)
    l2 = 100.0 / (np.asarray(train_features).shape[1] * classes.size)
    model = LogisticRegression(C=1.0 / l2, solver="lbfgs", max_iter=max_iter)
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(train_features, train_labels)
        return model.predict(test_features).astype(np.int64)


def head_predict(logits) -> np.ndarray:
    """The supervised head's answer: the leaf with the largest logit (leaf index = node index)."""
    return np.asarray(logits).argmax(axis=1).astype(np.int64)


def predict_all(protocols: Sequence[str], features, labels, train_index, test_index, logits=None) -> dict:
    """``{protocol: predicted nodes of the test rows}``; the k-NN protocols share one neighbour search."""
    unknown = [p for p in protocols if p not in ("head", "logreg") and not p.startswith("knn_k")]
    if unknown:
        raise ConfigError(f"unknown protocol {unknown[0]!r}")
    if "head" in protocols and logits is None:
        raise ConfigError("protocol 'head' needs a model file with a supervised head")
    ks = [int(p[len("knn_k") :]) for p in protocols if p.startswith("knn_k")]
    neighbours = knn_predict_ks(features[train_index], labels[train_index], features[test_index], ks) if ks else {}
    results = {}
    for protocol in protocols:
        if protocol == "head":
            results[protocol] = head_predict(logits[test_index])
        elif protocol == "logreg":
            results[protocol] = logreg_predict(features[train_index], labels[train_index], features[test_index])
        else:
            results[protocol] = neighbours[int(protocol[len("knn_k") :])]
    return results


def stratified_folds(labels, n_folds: int, seed: int = 0) -> list[Fold]:
    """Stratified k-fold over label nodes (shuffled, fixed seed): ``[(train_index, test_index), ...]``.

    A label with fewer samples than folds is absent from some test folds (the metrics handle it).
    """
    labels = np.asarray(labels)
    if n_folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {n_folds}")
    largest = np.unique(labels, return_counts=True)[1].max() if labels.size else 0
    if largest < n_folds:
        raise DataError(f"{n_folds} folds need at least one label with {n_folds} samples; the largest has {largest}")
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only n members"
        return [(train, test) for train, test in splitter.split(np.zeros(labels.size), labels)]


def manifest_split_fold(splits: Sequence[str]) -> list[Fold]:
    """One fold from the manifest's ``split`` column: train on "train" rows, test on "test" rows."""
    splits = np.asarray([str(s) for s in splits])
    train, test = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
    if train.size == 0 or test.size == 0:
        found = ", ".join(sorted(set(splits.tolist()))) or "nothing"
        raise DataError(
            f"--split needs rows with split 'train' and rows with split 'test' in the manifest; found {found}"
        )
    return [(train, test)]


def run_protocols(
    protocols: Sequence[str], features, labels, folds: Sequence[Fold], logits: np.ndarray | None = None, progress=None
) -> dict[str, list[np.ndarray]]:
    """``{protocol: [predicted nodes of fold f's test rows, ...]}`` for every protocol and fold."""
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    results: dict[str, list[np.ndarray]] = {p: [] for p in protocols}
    for train, test in folds:
        for protocol, predicted in predict_all(protocols, features, labels, train, test, logits).items():
            results[protocol].append(predicted)
        if progress is not None:
            progress.update(len(protocols))
    return results
