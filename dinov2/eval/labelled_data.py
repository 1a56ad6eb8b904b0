"""The images an evaluation scores: manifests or class folders resolved to tree nodes, split into
training and test rows, with every labelled image that is left out counted and its reason named.

Three designs (:func:`plan_evaluation`): stratified k-fold cross-validation over the ``--data``
rows; the manifest's own ``split`` column (``--split``: train rows fit, test rows are scored, other
rows are left out and counted); or ``--train-data`` A ``--data`` B (everything in A fits,
everything in B is scored: the out-of-domain design).
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dinov2.config.custom_hier import IGNORED
from dinov2.data.make_manifest import scan_dataset
from dinov2.data.manifest import find_duplicate_images, read_manifests, resolve_manifest_labels, stratified_splits
from dinov2.errors import ConfigError, DataError, TreeError
from dinov2.eval.protocols import Fold, manifest_split_fold, stratified_folds
from dinov2.hierarchy import Tree

FOLDER_TEST_FRACTION = 0.2
MAX_LISTED = 8


@dataclass
class LabelledSet:
    """The labelled rows of one ``--data`` or ``--train-data`` source, with their tree nodes.

    ``frame`` keeps the manifest columns plus ``source`` (as given) and ``line`` (the CSV line,
    header = 1; 0 for a folder). ``left_out`` lists ``{"reason", "count"}`` for the source's rows
    that are not scored.
    """

    source: str
    name: str
    frame: pd.DataFrame
    labels: np.ndarray
    left_out: list[dict] = field(default_factory=list)


def read_source(data: str, dataset: str | None) -> pd.DataFrame:
    """A manifest CSV, or a folder read by :func:`dinov2.data.make_manifest.scan_dataset` (split: a stratified
    80/20 train/test); ``dataset`` overrides the dataset column. Adds ``source`` and ``line``."""
    path = Path(data)
    if path.is_dir():
        if dataset is None:
            raise ConfigError(f"{data} is a folder: pass its dataset name (e.g. --dataset acevedo) to map its labels")
        manifest, _ = scan_dataset(dataset, path)
        manifest["split"] = stratified_splits(manifest["label"].tolist(), 0.0, FOLDER_TEST_FRACTION)
        lines = np.zeros(len(manifest), dtype=np.int64)
    elif path.is_file():
        manifest = read_manifests([path])
        lines = np.arange(len(manifest)) + 2
    else:
        raise DataError(f"{data}: no such manifest file or image folder")
    if dataset is not None:
        manifest = manifest.assign(dataset=dataset)
    if manifest.empty:
        raise DataError(f"{data} holds no images")
    return manifest.reset_index(drop=True).assign(source=data, line=lines)


def flat_tree(frames: list[pd.DataFrame]) -> Tree:
    """``--hierarchy none``: the distinct non-empty raw labels of ``frames`` as leaves of a one-level tree."""
    labels = sorted({label for frame in frames for label in frame["label"] if label != ""})
    if not labels:
        raise DataError("--hierarchy none: no image has a label")
    try:
        return Tree.from_nested({label: None for label in labels})
    except TreeError as error:
        raise DataError(f"--hierarchy none uses the raw labels as class names, and one cannot be: {error}") from None


def resolve_set(frame: pd.DataFrame, tree: Tree, flat: bool) -> LabelledSet:
    """The rows of one source that carry a label mapping to a node of ``tree`` (``flat``: the raw label
    itself is the node); the others are counted in ``left_out``."""
    labelled = (frame["label"] != "").to_numpy()
    if flat:
        labels = np.array([tree.index(label) if label else IGNORED for label in frame["label"]], dtype=np.int64)
    else:
        labels = resolve_manifest_labels(frame, tree)
    kept = labels != IGNORED
    left_out = []
    if (~labelled).any():
        left_out.append({"reason": "no label (empty label column)", "count": int((~labelled).sum())})
    ignored = labelled & ~kept
    if ignored.any():
        counts = frame.loc[ignored, "label"].value_counts()
        listed = ", ".join(f"{label} ({count})" for label, count in counts.items())
        left_out.append({"reason": f"label mapped to no node in DATASETS: {listed}", "count": int(ignored.sum())})
    source = str(frame["source"].iloc[0])
    name = Path(source).stem if Path(source).is_file() else Path(source).name
    return LabelledSet(source, name, frame[kept].reset_index(drop=True), labels[kept], left_out)


def refuse_duplicates(sets: list[LabelledSet]) -> None:
    """DataError listing the groups of rows (across all ``sets``) that hold the same image: the same file
    or the same content. A duplicate would be scored twice, or leak from the training into the test rows."""
    frame = pd.concat([s.frame for s in sets], ignore_index=True)
    groups = find_duplicate_images(frame["path"].tolist())
    if not groups:
        return

    def where(position: int) -> str:
        row = frame.iloc[position]
        return f"{row['path']} ({row['source']}" + (f" line {row['line']})" if row["line"] else ")")

    listed = "; ".join(" = ".join(where(p) for p in group) for group in groups[:MAX_LISTED])
    more = f"; and {len(groups) - MAX_LISTED} more groups" if len(groups) > MAX_LISTED else ""
    raise DataError(
        f"{len(groups)} image(s) appear more than once (same file or same content) among the rows to evaluate, "
        f"which would count them twice or leak them from training into test rows: {listed}{more}. "
        "Remove the duplicate rows from the manifests."
    )


@dataclass
class EvaluationPlan:
    """All rows whose features are used (training and test, in feature order), their labels, the folds
    (index pairs into them), what the design is, and which labelled rows are left out and why."""

    sets: list[LabelledSet]
    frame: pd.DataFrame
    labels: np.ndarray
    folds: list[Fold]
    design: str
    fixed_test_set: bool
    left_out: list[dict]

    @property
    def test_rows(self) -> np.ndarray:
        return np.unique(np.concatenate([test for _, test in self.folds]))


def plan_evaluation(
    test_sets: list[LabelledSet], train_sets: list[LabelledSet], split: bool, n_folds: int, seed: int
) -> EvaluationPlan:
    """Cross-validation over ``test_sets``, their manifest split (``split``), or fit on ``train_sets``."""
    sets = train_sets + test_sets
    for labelled_set in sets:
        if labelled_set.labels.size == 0:
            raise DataError(
                f"no image of {labelled_set.source} has a label that maps to a node (all unlabelled or ignored)"
            )
    frame = pd.concat([s.frame for s in sets], ignore_index=True)
    labels = np.concatenate([s.labels for s in sets])
    left_out = [{"source": s.source, **entry} for s in sets for entry in s.left_out]
    if train_sets:
        n_train = sum(len(s.frame) for s in train_sets)
        folds = [(np.arange(n_train), np.arange(n_train, len(frame)))]
        design = (
            f"trained on {', '.join(s.source for s in train_sets)}; tested on {', '.join(s.source for s in test_sets)}"
        )
        return EvaluationPlan(sets, frame, labels, folds, design, True, left_out)
    if split:
        folds = manifest_split_fold(frame["split"].tolist())
        unused = ~frame["split"].isin(["train", "test"]).to_numpy()
        for source, count in frame.loc[unused, "source"].value_counts(sort=False).items():
            left_out.append(
                {"source": source, "reason": "split is neither train nor test (--split)", "count": int(count)}
            )
        return EvaluationPlan(sets, frame, labels, folds, "train/test split of the manifest", True, left_out)
    folds = stratified_folds(labels, n_folds, seed)
    return EvaluationPlan(
        sets, frame, labels, folds, f"stratified {n_folds}-fold cross-validation (seed {seed})", False, left_out
    )
