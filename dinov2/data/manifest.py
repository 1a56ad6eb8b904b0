"""Manifests: one CSV format for every data set.

Columns ``path,label,dataset,split`` (more columns, e.g. ``patient``, are kept). ``path`` is an
image file, relative to the manifest's folder unless absolute; ``label`` is the data set's raw
label (empty = unlabelled, usable by the self-supervised part only); ``dataset`` names the entry of
``DATASETS`` in :mod:`dinov2.config.custom_hier` that maps raw labels to tree nodes; ``split`` is
one of train, val, test.
"""

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dinov2.config.custom_hier import resolve_labels
from dinov2.errors import DataError
from dinov2.utils.io import atomic_write

MANIFEST_COLUMNS = ("path", "label", "dataset", "split")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

PathLike = str | os.PathLike


def read_manifest_rows(path: PathLike) -> pd.DataFrame:
    """One manifest's rows with absolute image paths; checks only that the file and columns exist.

    Row values are strings as written (no split or label check): see :func:`row_problems`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"manifest {path} is not a readable CSV file: {error}") from error
    missing = [column for column in MANIFEST_COLUMNS if column not in frame.columns]
    if missing:
        raise DataError(
            f"manifest {path} lacks column(s) {', '.join(missing)}; a manifest needs {','.join(MANIFEST_COLUMNS)}"
        )
    folder = path.resolve().parent
    frame["path"] = [p if p == "" or os.path.isabs(p) else os.path.normpath(folder / p) for p in frame["path"]]
    return frame


def row_problems(frame: pd.DataFrame) -> list[str]:
    """Per row: "" when the path, dataset and split values are valid, else what is wrong."""
    problems = []
    for path, dataset, split in zip(frame["path"], frame["dataset"], frame["split"]):
        if path.strip() == "":
            problems.append("empty path")
        elif dataset.strip() == "":
            problems.append("empty dataset")
        elif split not in SPLITS:
            problems.append(f"split {split!r} is not one of {', '.join(SPLITS)}")
        else:
            problems.append("")
    return problems


def _read_one(path: Path) -> pd.DataFrame:
    frame = read_manifest_rows(path)
    bad = [(row, problem) for row, problem in enumerate(row_problems(frame)) if problem]
    if bad:
        row, problem = bad[0]
        more = f" ({len(bad)} bad rows in all; python -m dinov2.data.check_manifest lists them)" if len(bad) > 1 else ""
        raise DataError(f"manifest {path} row {row + 2}: {problem}{more}")
    return frame


def read_manifests(paths: PathLike | Iterable[PathLike]) -> pd.DataFrame:
    """Read and validate one or several manifests; concatenated, with absolute image paths.

    Raises DataError naming the file (and the CSV line, header = line 1) for a missing file, a
    missing column, an empty path or dataset, or a split outside train/val/test.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    frames = [_read_one(Path(path)) for path in paths]
    if not frames:
        raise DataError("no manifest given")
    frame = pd.concat(frames, ignore_index=True)
    ordered = list(MANIFEST_COLUMNS) + [column for column in frame.columns if column not in MANIFEST_COLUMNS]
    return frame[ordered].fillna("")


def write_manifest(frame: pd.DataFrame, path: PathLike) -> Path:
    """Write ``frame`` as a manifest; image paths under the manifest's folder are stored relative to it."""
    path = Path(path)
    folder = path.resolve().parent
    frame = frame.copy()

    def portable(image_path: str) -> str:
        absolute = Path(os.path.abspath(image_path))
        try:
            return absolute.relative_to(folder).as_posix()
        except ValueError:
            return str(absolute)

    frame["path"] = [portable(p) for p in frame["path"]]
    ordered = list(MANIFEST_COLUMNS) + [column for column in frame.columns if column not in MANIFEST_COLUMNS]
    with atomic_write(path, "w") as handle:
        frame[ordered].to_csv(handle, index=False)
    return path


def stratified_splits(strata: Sequence[str], val_fraction: float, test_fraction: float, seed: int = 0) -> list[str]:
    """A train/val/test split per item, stratified by ``strata`` (e.g. the raw label), reproducible.

    Within a stratum of n items (shuffled by a generator seeded with (seed, stratum rank in sorted
    order)), round(n x test_fraction) go to test and round(n x val_fraction) to val, keeping at least
    one item in train; the rest are train.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise DataError(f"val and test fractions must be >= 0 with a sum < 1, got {val_fraction} and {test_fraction}")
    strata = np.asarray([str(stratum) for stratum in strata])
    splits = np.full(len(strata), "train", dtype=object)
    for rank, stratum in enumerate(sorted(set(strata.tolist()))):
        members = np.flatnonzero(strata == stratum)
        members = members[np.random.default_rng([seed, rank]).permutation(len(members))]
        n_test = min(int(round(len(members) * test_fraction)), max(0, len(members) - 1))
        n_val = min(int(round(len(members) * val_fraction)), max(0, len(members) - 1 - n_test))
        splits[members[:n_test]] = "test"
        splits[members[n_test : n_test + n_val]] = "val"
    return splits.tolist()


def resolve_manifest_labels(frame: pd.DataFrame, tree) -> np.ndarray:
    """Node index of every row (int64, -1 = unlabelled or ignored by its data set).

    Raises LabelError listing the unknown raw labels of a data set with their counts.
    """
    labels = np.full(len(frame), -1, dtype=np.int64)
    labelled = (frame["label"] != "").to_numpy()
    for dataset, rows in frame[labelled].groupby("dataset", sort=False).groups.items():
        positions = frame.index.get_indexer(rows)
        labels[positions] = resolve_labels(tree, dataset, frame.loc[rows, "label"].tolist())
    return labels


def find_duplicate_images(paths: Sequence[PathLike]) -> list[list[int]]:
    """Groups of positions in ``paths`` that name the same image: the same file (equal after resolving
    links and ``..``) or files with identical content (equal size, then equal SHA-256; only files whose
    size occurs more than once are read). Each group holds at least two positions in ascending order;
    groups are ordered by their first position. Files that cannot be read count by path alone (the
    image loader names them)."""
    files = [os.path.realpath(path) for path in paths]
    sizes = {}
    for file in set(files):
        try:
            sizes[file] = os.stat(file).st_size
        except OSError:
            continue
    files_per_size = Counter(sizes.values())
    identity = {}
    for file in set(files):
        identity[file] = file
        if file in sizes and files_per_size[sizes[file]] > 1:
            try:
                identity[file] = f"sha256:{file_sha256(file)}"
            except OSError:
                continue
    groups: dict[str, list[int]] = {}
    for position, file in enumerate(files):
        groups.setdefault(identity[file], []).append(position)
    return [positions for positions in groups.values() if len(positions) > 1]


def file_sha256(path: PathLike) -> str:
    """SHA-256 hex digest of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
