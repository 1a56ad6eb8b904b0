"""``--compare OTHER_EVAL_DIR``: this run against an earlier one on the same test images, by the paired
bootstrap of :func:`dinov2.eval.bootstrap.paired_bootstrap` (how "HCE beats CE" is stated honestly).

Both runs' ``predictions.csv`` are matched by image path, per protocol that both ran. Under
cross-validation every image is predicted once, by the fold that held it out, so the pooled
predictions are compared.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from dinov2.errors import DataError
from dinov2.eval.bootstrap import paired_bootstrap
from dinov2.eval.scoring import BootstrapSettings

PREDICTIONS = "predictions.csv"
MAX_LISTED = 5


def read_predictions(eval_dir: Path) -> pd.DataFrame:
    """The ``predictions.csv`` of an evaluation folder; DataError naming what is missing."""
    path = Path(eval_dir) / PREDICTIONS
    if not path.is_file():
        raise DataError(f"--compare {eval_dir}: no {PREDICTIONS} there (is it an eval_hier output folder?)")
    table = pd.read_csv(path, dtype={"path": str, "label_node": str, "predicted_node": str, "protocol": str})
    missing = {"path", "label_node", "predicted_node", "protocol"} - set(table.columns)
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(sorted(missing))}")
    return table


def _node_indices(names: pd.Series, tree, where: str) -> np.ndarray:
    unknown = sorted(set(names) - set(tree.nodes))
    if unknown:
        raise DataError(
            f"{where} names node(s) {', '.join(unknown[:MAX_LISTED])} that this run's tree lacks; "
            "compare runs evaluated with the same --hierarchy"
        )
    return np.array([tree.index(name) for name in names], dtype=np.int64)


def paired_table(this: pd.DataFrame, other: pd.DataFrame, protocol: str, other_dir) -> pd.DataFrame:
    """Rows of ``protocol`` from both runs matched by path; DataError when they scored other images or labels."""
    mine = this[this["protocol"] == protocol].set_index("path")
    theirs = other[other["protocol"] == protocol].set_index("path")
    for table, name in ((mine, "this run"), (theirs, str(other_dir))):
        if table.index.has_duplicates:
            raise DataError(f"{name} predicts some image more than once for {protocol}; cannot pair the runs")
    only_mine, only_theirs = mine.index.difference(theirs.index), theirs.index.difference(mine.index)
    if len(only_mine) or len(only_theirs):
        raise DataError(
            f"--compare {other_dir}: the runs scored different images for {protocol} ({len(only_mine)} only here, "
            f"e.g. {list(only_mine[:2])}; {len(only_theirs)} only there, e.g. {list(only_theirs[:2])}); a paired "
            "comparison needs the same test images"
        )
    joined = mine.merge(theirs, left_index=True, right_index=True, suffixes=("", "_other"))
    differ = joined[joined["label_node"] != joined["label_node_other"]]
    if len(differ):
        raise DataError(
            f"--compare {other_dir}: {len(differ)} image(s) have other labels there, e.g. {differ.index[0]} "
            f"({differ['label_node'].iloc[0]} here, {differ['label_node_other'].iloc[0]} there)"
        )
    return joined


def compare_runs(predictions: pd.DataFrame, other_dir: Path, tree, functions, bootstrap: BootstrapSettings) -> dict:
    """``{"other", "n_images", "resamples", "seed", "confidence", "protocols": {protocol: {metric: {"a", "b",
    "difference", "low", "high", "n_resamples"}}}}`` with a = this run, b = the other, for the protocols
    both ran (DataError when there are none)."""
    other = read_predictions(other_dir)
    shared = [p for p in dict.fromkeys(predictions["protocol"]) if p in set(other["protocol"])]
    if not shared:
        raise DataError(
            f"--compare {other_dir}: no protocol in common (here: {', '.join(dict.fromkeys(predictions['protocol']))}; "
            f"there: {', '.join(dict.fromkeys(other['protocol']))})"
        )
    result = {
        "other": str(other_dir),
        "resamples": bootstrap.resamples,
        "seed": bootstrap.seed,
        "confidence": bootstrap.confidence,
        "protocols": {},
    }
    for protocol in shared:
        joined = paired_table(predictions, other, protocol, other_dir)
        where = f"--compare {other_dir} ({PREDICTIONS})"
        y_true = _node_indices(joined["label_node"], tree, "this run")
        result["protocols"][protocol] = paired_bootstrap(
            y_true,
            _node_indices(joined["predicted_node"], tree, "this run"),
            _node_indices(joined["predicted_node_other"], tree, where),
            functions,
            tree,
            n=bootstrap.resamples,
            seed=bootstrap.seed,
            confidence=bootstrap.confidence,
        )
        result["n_images"] = len(joined)
    return result
