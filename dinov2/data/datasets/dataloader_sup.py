"""Datasets over manifests: supervised (image, tree node index) and unsupervised (multi-crop views)."""

import os
import threading
from collections.abc import Callable

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dinov2.data.manifest import resolve_manifest_labels
from dinov2.errors import DataError

_LOG_LOCK = threading.Lock()


# 8-bit modes that Pillow converts to RGB faithfully (alpha and palette transparency are dropped)
EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
# one channel of more than 8 bits: 16-bit unsigned, 32-bit signed integer, 32-bit float
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def stretch_to_8_bits(image: Image.Image, path: str) -> Image.Image:
    """A one-channel image of more than 8 bits as 8-bit grayscale: its own range [lo, hi] (darkest
    and brightest pixel) maps linearly to [0, 255], ``round(255 (v - lo) / (hi - lo))``; a constant
    image becomes black. Pillow's own conversion clips every value above 255 to white."""
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise DataError(f"image file {path} ({image.mode}) has NaN or infinite pixel values")
    low, high = values.min(), values.max()
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def load_image(path: str) -> Image.Image:
    """Decode an image file to an 8-bit RGB PIL image.

    8-bit images (:data:`EIGHT_BIT_MODES`) convert as Pillow does; grayscale of 16 or 32 bits or
    float (:data:`HIGH_DEPTH_MODES`) is stretched to 8 bits (:func:`stretch_to_8_bits`); 16-bit
    colour is decoded by Pillow to the upper 8 bits of each channel. Any other mode, a stack of
    several frames and an image over Pillow's decompression-bomb limit raise DataError naming the
    file, as do a missing or undecodable file.
    """
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                raise DataError(
                    f"image file {path} holds {image.n_frames} frames (a stack); the loader reads single images: "
                    "save one image per file"
                )
            if image.mode in HIGH_DEPTH_MODES:
                return stretch_to_8_bits(image, path).convert("RGB")
            if image.mode not in EIGHT_BIT_MODES:
                raise DataError(
                    f"image file {path} has Pillow mode {image.mode!r}, which the loader does not read; "
                    "save it as 8-bit RGB or grayscale, or as 16-bit grayscale"
                )
            if "transparency" in image.info:  # palette transparency: through RGBA, as Pillow advises
                image = image.convert("RGBA")
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise DataError(f"image file {path} does not exist") from error
    except Image.DecompressionBombError as error:
        raise DataError(
            f"image file {path} is refused by Pillow's decompression-bomb guard: {error} A cell image is far "
            "smaller: check the file, or downscale it"
        ) from error
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
    No row left is a DataError naming ``source`` (the manifests) and why each row was left out.
    """

    def __init__(
        self,
        manifest_df: pd.DataFrame,
        tree,
        transform: Callable | None = None,
        skip_unreadable_log=None,
        source: str = "the manifest",
    ):
        node_indices = resolve_manifest_labels(manifest_df, tree)
        keep = node_indices >= 0
        if not keep.any():
            unlabelled = int((manifest_df["label"] == "").sum())
            ignored = sorted(set(manifest_df["dataset"][(node_indices < 0) & (manifest_df["label"] != "")]))
            raise DataError(
                f"{source} has no row for the supervised loss: of {len(manifest_df)} row(s), {unlabelled} are "
                f"unlabelled (empty label) and {len(manifest_df) - unlabelled} have labels that DATASETS maps to "
                f"None{' (' + ', '.join(ignored) + ')' if ignored else ''}. Label some rows, point "
                "train.dataset_path_sup at labelled manifests, or set supervised.loss_weight=0 to train "
                "self-supervised only"
            )
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
