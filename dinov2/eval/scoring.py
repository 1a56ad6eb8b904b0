"""Scores of every protocol: per fold, per data set (the manifest's ``dataset`` column) and overall;
mean ± std over cross-validation folds, or a bootstrap interval on a fixed test set."""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dinov2.eval.bootstrap import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, bootstrap_intervals
from dinov2.eval.labelled_data import EvaluationPlan
from dinov2.eval.metrics import is_correct, metric_functions
from dinov2.eval.report import summarize_folds, worst_confusions


@dataclass(frozen=True)
class BootstrapSettings:
    """Resamples, seed and confidence of the intervals on a fixed test set (resamples 0: none)."""

    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    confidence: float = DEFAULT_CONFIDENCE


def _score(y_true, fold_predictions, folds_of_rows, tree, functions, plan_fixed, bootstrap) -> dict:
    """``{"folds", "mean", "std", ["interval"]}`` for the rows selected in each fold."""
    fold_metrics = []
    for y, predicted in zip(folds_of_rows, fold_predictions):
        fold_metrics.append({name: fn(y_true[y], predicted, tree) for name, fn in functions.items()})
    result = {"folds": fold_metrics, **summarize_folds(fold_metrics)}
    if plan_fixed and bootstrap.resamples > 0 and len(folds_of_rows[0]) > 0:
        result["interval"] = bootstrap_intervals(
            y_true[folds_of_rows[0]],
            fold_predictions[0],
            functions,
            tree,
            n=bootstrap.resamples,
            seed=bootstrap.seed,
            confidence=bootstrap.confidence,
        )
    return result


def score_protocols(
    predictions: dict[str, list[np.ndarray]],
    plan: EvaluationPlan,
    tree,
    rare,
    hierarchical: bool,
    bootstrap: BootstrapSettings,
) -> tuple[dict, pd.DataFrame]:
    """``({protocol: {"folds", "mean", "std", ["interval"], "datasets": {name: ...}, "worst_confusions"}},
    predictions table)``; ``"interval"`` (bootstrap over test images) on a fixed test set only.
    ``"datasets"`` holds the same scores for the test rows of each value of the dataset column."""
    functions = metric_functions(tree, rare, hierarchical)
    labels = plan.labels
    datasets = plan.frame["dataset"].to_numpy()
    names = sorted(set(datasets[plan.test_rows].tolist()))
    results, tables = {}, []
    for protocol, fold_predictions in predictions.items():
        tests = [test for _, test in plan.folds]
        result = _score(labels, fold_predictions, tests, tree, functions, plan.fixed_test_set, bootstrap)
        result["datasets"] = {}
        for name in names:
            chosen = [datasets[test] == name for test in tests]
            result["datasets"][name] = _score(
                labels,
                [predicted[keep] for predicted, keep in zip(fold_predictions, chosen)],
                [test[keep] for test, keep in zip(tests, chosen)],
                tree,
                functions,
                plan.fixed_test_set,
                bootstrap,
            )
        pooled_true = np.concatenate([labels[test] for test in tests])
        result["worst_confusions"] = worst_confusions(pooled_true, np.concatenate(fold_predictions), tree)
        results[protocol] = result
        for fold, (test, predicted) in enumerate(zip(tests, fold_predictions)):
            rows = plan.frame.iloc[test]
            tables.append(
                pd.DataFrame(
                    {
                        "path": rows["path"].to_numpy(),
                        "label": rows["label"].to_numpy(),
                        "dataset": rows["dataset"].to_numpy(),
                        "label_node": [tree.nodes[t] for t in labels[test]],
                        "predicted_node": [tree.nodes[p] for p in predicted],
                        "correct": is_correct(labels[test], predicted, tree),
                        "fold": fold,
                        "protocol": protocol,
                    }
                )
            )
    return results, pd.concat(tables, ignore_index=True)
