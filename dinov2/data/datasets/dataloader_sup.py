"""Datasets over manifests: supervised (image, tree node index) and unsupervised (multi-crop views)."""

import os
import threading
from collections.abc import Callable

import pandas as pd
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dinov2.data.manifest import resolve_manifest_labels
from dinov2.errors import DataError

_LOG_LOCK = threading.Lock()


def load_image(path: str) -> Image.Image:
    """Decode an image file to an RGB PIL image; DataError naming the file when missing or unreadable."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise DataError(f"image file {path} does not exist") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"image file {path} cannot be decoded: {error}") from error


class _ManifestImages(Dataset):
    """Rows of a manifest, decoded on access. With ``skip_unreadable_log`` an unreadable image
    yields None (dropped by the collate functions) and its path is appended to that log;
    otherwise it raises DataError. No other sample ever takes its place."""

    def __init__(self, manifest: pd.DataFrame, transform: Callable | None, skip_unreadable_log=None):
        self.manifest = manifest.reset_index(drop=True)
        self.paths = self.manifest["path"].tolist()
        self.transform = transform
        self.skip_unreadable_log = None if skip_unreadable_log is None else os.fspath(skip_unreadable_log)

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, index: int) -> Image.Image | None:
        try:
            return load_image(self.paths[index])
        except DataError as error:
            if self.skip_unreadable_log is None:
                raise
            with _LOG_LOCK, open(self.skip_unreadable_log, "a", encoding="utf-8") as log:
                log.write(f"{self.paths[index]}\t{error}\n")
            return None

    def _transformed(self, index: int):
        image = self._image(index)
        if image is None:
            return None
        return image if self.transform is None else self.transform(image)


class SupervisedDataset(_ManifestImages):
    """``dataset[i] -> (transformed image, node index into tree.nodes)``.

    Raw labels are mapped through ``DATASETS`` of :mod:`dinov2.config.custom_hier`; rows that are
    unlabelled or whose label maps to None are left out. ``labels`` holds the node index per item.
    """

    def __init__(self, manifest_df: pd.DataFrame, tree, transform: Callable | None = None, skip_unreadable_log=None):
        node_indices = resolve_manifest_labels(manifest_df, tree)
        keep = node_indices >= 0
        super().__init__(manifest_df[keep], transform, skip_unreadable_log)
        self.tree = tree
        self.labels = node_indices[keep]

    def __getitem__(self, index: int):
        image = self._transformed(index)
        return None if image is None else (image, int(self.labels[index]))


class UnsupervisedDataset(_ManifestImages):
    """``dataset[i] -> (transform(image), None)``, e.g. DINOv2's multi-crop dict; labels are not read."""

    def __init__(self, manifest_df: pd.DataFrame, transform: Callable | None = None, skip_unreadable_log=None):
        super().__init__(manifest_df, transform, skip_unreadable_log)

    def __getitem__(self, index: int):
        views = self._transformed(index)
        return None if views is None else (views, None)
