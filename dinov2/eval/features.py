"""Frozen features for evaluation: the backbone's CLS token (and the supervised head's logits), extracted
once per (model, images, preprocessing) into a single ``.npz`` cache file.

The cache key is a SHA-256 over the model's identity (path + size + modification time of a local
file, the string of a URL or preset), every image's path + size + modification time in manifest
order, the image size and the normalisation. A run with the same key reads the cache instead of
extracting again; any change re-extracts and overwrites it.
"""

import argparse
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dinov2.data.datasets.dataloader_sup import load_image
from dinov2.errors import ConfigError, DataError
from dinov2.utils.cpu_memory import retain_freed_memory
from dinov2.utils.io import atomic_write

CACHE_FORMAT = "dino_hier.features.v1"


class ImageFiles(Dataset):
    """``(transformed image, row index)`` for a list of image paths; unreadable images raise DataError."""

    def __init__(self, paths: Sequence[str], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(load_image(self.paths[index])), index


DEFAULT_BATCH_SIZE = 16  # the fastest on the CPU: larger batches spill the caches
DEFAULT_GPU_BATCH_SIZE = 128


def add_extraction_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--batch-size`` and ``--num-workers`` of the command lines that extract features."""
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the backbone runs (default auto: the GPU when there is one, else the CPU)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"images per forward pass (default: {DEFAULT_BATCH_SIZE} on the CPU, the fastest there: "
        f"larger batches spill the caches; {DEFAULT_GPU_BATCH_SIZE} on a GPU)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="data-loading worker processes (default: none up to 4 CPU cores, else one per 4 cores, "
        "at most 4; on a GPU 4)",
    )


def extraction_settings(args: argparse.Namespace) -> dict:
    """:func:`extract_features`' ``device``, ``batch_size`` and ``num_workers`` from
    :func:`add_extraction_arguments`' options, checked."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available; use --device cpu or auto")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    batch_size = (
        args.batch_size if args.batch_size is not None else DEFAULT_GPU_BATCH_SIZE if gpu else DEFAULT_BATCH_SIZE
    )
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if args.num_workers is not None and args.num_workers < 0:
        raise ConfigError(f"--num-workers must be 0 or more, got {args.num_workers}")
    num_workers = args.num_workers if args.num_workers is not None else 4 if gpu else default_num_workers()
    return {"device": device, "batch_size": batch_size, "num_workers": num_workers}


def default_num_workers() -> int:
    """Data-loading worker processes for CPU extraction: none up to 4 cores, else one per 4 cores (at
    most 4). The forward already keeps every core busy; on 2 cores a decoding worker preempts a
    compute thread and costs ~10% (bench_eval: 40 vs 45 img/s), while decoding inline (~1.7 ms per
    PBC image) costs ~1%. Only on many cores does inline decoding become the bottleneck."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 4 else min(4, cores // 4)


@torch.inference_mode()
def extract_features(
    backbone: nn.Module,
    paths: Sequence[str],
    transform: Callable,
    supervised_head: nn.Module | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    bf16: bool = True,
    desc: str = "features",
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """CLS tokens ``x_norm_clstoken`` (float32 ``[N, D]``) and, with a head, its logits (``[N, leaves]``).

    The CLS token comes from ``backbone.forward_clstoken`` (the last block for that token alone)
    on ``device``, under bf16 autocast when ``bf16`` (fp16 on a GPU without bf16); on the CPU
    with freed memory kept for reuse (:mod:`dinov2.utils.cpu_memory`). The head runs in float32
    on the float32 CLS token. Rows follow ``paths``.
    """
    device = device or torch.device("cpu")
    backbone.eval().to(device)
    if supervised_head is not None:
        supervised_head.to(device)
    if device.type == "cpu":
        retain_freed_memory()
    half = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    loader = DataLoader(
        ImageFiles(paths, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=device.type == "cuda",
    )
    features: np.ndarray | None = None
    logits: np.ndarray | None = None
    with tqdm(total=len(paths), desc=desc, unit="img") as progress:
        for images, rows in loader:
            with torch.autocast(device.type, dtype=half, enabled=bf16):
                cls = backbone.forward_clstoken(images.to(device, non_blocking=True))
            cls = cls.float()
            if features is None:
                features = np.empty((len(paths), cls.shape[1]), dtype=np.float32)
            features[rows.numpy()] = cls.cpu().numpy()
            if supervised_head is not None:
                head_logits = supervised_head(cls).float()
                if logits is None:
                    logits = np.empty((len(paths), head_logits.shape[1]), dtype=np.float32)
                logits[rows.numpy()] = head_logits.cpu().numpy()
            progress.update(len(rows))
    if features is None:
        raise DataError("no images to extract features from")
    return features, logits


def model_identity(source: str) -> str:
    """What identifies a model's weights: ``path|size|mtime_ns`` for a local file, else the source string."""
    path = Path(source)
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return source


def feature_cache_key(model: str, paths: Sequence[str], image_size: int, mean, std, extra: dict | None = None) -> str:
    """SHA-256 hex digest identifying one extraction (see the module docstring)."""
    digest = hashlib.sha256()
    header = {
        "format": CACHE_FORMAT,
        "model": model,
        "image_size": int(image_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "extra": extra or {},
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise DataError(f"cannot read image {path}: {error.strerror or error}") from None
        digest.update(f"\n{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def load_feature_cache(cache_path: Path, key: str) -> dict[str, np.ndarray | None] | None:
    """The cached arrays when ``cache_path`` exists and was written for ``key``; None otherwise."""
    cache_path = Path(cache_path)
    if not cache_path.is_file():
        return None
    try:
        with np.load(cache_path, allow_pickle=False) as cache:
            if str(cache["key"]) != key:
                return None
            return {"features": cache["features"], "logits": cache["logits"] if "logits" in cache else None}
    except (OSError, ValueError, KeyError):  # unreadable or foreign file: extract again
        return None


def save_feature_cache(cache_path: Path, key: str, features: np.ndarray, logits: np.ndarray | None) -> None:
    """Write the cache atomically (:func:`dinov2.utils.io.atomic_write`)."""
    cache_path = Path(cache_path)
    arrays = {"key": np.array(key), "features": features}
    if logits is not None:
        arrays["logits"] = logits
    with atomic_write(cache_path) as handle:
        np.savez(handle, **arrays)


def cached_features(cache_path: Path, key: str, extract: Callable[[], tuple[np.ndarray, np.ndarray | None]]):
    """``(features, logits, reused)``: read the cache for ``key`` or call ``extract()`` and store its result."""
    cached = load_feature_cache(cache_path, key)
    if cached is not None:
        return cached["features"], cached["logits"], True
    features, logits = extract()
    save_feature_cache(cache_path, key, features, logits)
    return features, logits, False
