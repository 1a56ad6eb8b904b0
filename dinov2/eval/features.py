"""Frozen features for evaluation: the backbone's CLS token (and the supervised head's logits), extracted
once per (model, images, preprocessing, precision) into one ``.npz`` cache file per manifest.

The cache key is a SHA-256 over the model's identity (path + size + modification time of a local
file, the string of a URL or preset), every image's path + size + modification time in manifest
order, the image size, the normalisation and the precision. The file is named after the manifest
and the key (``<manifest>-<key[:16]>.npz``), so several manifests and models share one cache
folder. Beside it, ``<file>.json`` records the key, the file's size and its SHA-256, written after
the data: a cache whose size or checksum does not match (a damaged or half-copied file) is
reported and extracted again, never read. Every write goes to a unique temporary name in the same
folder and is renamed into place, so concurrent runs never write into each other's files.
"""

import argparse
import contextlib
import hashlib
import json
import os
import re
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dinov2.data.datasets.dataloader_sup import load_image
from dinov2.data.manifest import file_sha256
from dinov2.errors import ConfigError, DataError
from dinov2.utils.cpu_memory import retain_freed_memory
from dinov2.utils.io import atomic_write
from dinov2.utils.precision import SETTINGS, Precision, choose_precision

CACHE_FORMAT = "dino_hier.features.v2"


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
    """``--device``, ``--precision``, ``--batch-size`` and ``--num-workers`` of the command lines that extract
    features."""
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the backbone runs (default auto: the GPU when there is one, else the CPU)",
    )
    parser.add_argument(
        "--precision",
        choices=SETTINGS,
        default="auto",
        help="compute precision of the backbone (default auto: bf16 on a GPU that supports it, else fp16; "
        "on the CPU bf16 only where this CPU runs it clearly faster than fp32, else fp32)",
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
    """:func:`extract_features`' ``device``, ``precision``, ``batch_size`` and ``num_workers`` from
    :func:`add_extraction_arguments`' options, checked (the precision chosen for the device)."""
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
    precision = choose_precision(args.precision, device)
    return {"device": device, "precision": precision, "batch_size": batch_size, "num_workers": num_workers}


def default_num_workers() -> int:
    """Data-loading worker processes for CPU extraction: none up to 4 cores, else one per 4 cores (at
    most 4). The forward already keeps every core busy; on 2 cores a decoding worker process preempts
    a compute thread and costs ~10% (bench_eval: 40 vs 45 img/s). Without workers a thread of this
    process decodes the next batch (~1.5 ms per PBC image) during the forward (:func:`prefetched`)."""
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
    precision: Precision | None = None,
    desc: str = "features",
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """CLS tokens ``x_norm_clstoken`` (float32 ``[N, D]``) and, with a head, its logits (``[N, leaves]``).

    The CLS token comes from ``backbone.forward_clstoken`` (the last block for that token alone)
    on ``device`` in ``precision`` (autocast for bf16/fp16; default fp32); on the CPU with freed
    memory kept for reuse (:mod:`dinov2.utils.cpu_memory`). Without worker processes the next batch
    is decoded by a thread during the forward (:func:`prefetched`). Decoding in turn on the main
    thread made the bf16 forward take ~3x its CPU time on 2 cores (0.31x a plain forward's rate;
    with the thread 1.00x, measured side by side), likely because decoding's small allocations
    then fragment the heap that the forward's large buffers are reused from (glibc gives another
    thread its own arena). The head runs in float32 on the float32 CLS token. Rows follow ``paths``.
    """
    device = device or torch.device("cpu")
    precision = precision or Precision("fp32", "default")
    backbone.eval().to(device)
    if supervised_head is not None:
        supervised_head.to(device)
    if device.type == "cpu":
        retain_freed_memory()
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
        for images, rows in prefetched(loader) if num_workers == 0 else loader:
            with precision.autocast(device):
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


def prefetched(batches: Iterable, depth: int = 1) -> Iterator:
    """The items of ``batches``, produced by a background thread up to ``depth`` ahead, so that decoding the
    next batch (Pillow and torch release the GIL) overlaps the forward of this one. An exception in the
    thread is raised here, in order; a consumer that stops early stops the thread."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in batches:
                if stop.is_set():
                    return
                queue.put((item, None))
        except BaseException as error:  # handed to the consumer, raised there
            queue.put((None, error))
        queue.put((done, None))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = queue.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a pending put
            with contextlib.suppress(Empty):
                queue.get(timeout=0.1)
        thread.join()


def model_identity(source: str) -> str:
    """What identifies a model's weights: ``path|size|mtime_ns`` for a local file, else the source string."""
    path = Path(source)
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return source


def feature_cache_key(
    model: str, paths: Sequence[str], image_size: int, mean, std, precision: str, extra: dict | None = None
) -> str:
    """SHA-256 hex digest identifying one extraction (see the module docstring)."""
    digest = hashlib.sha256()
    header = {
        "format": CACHE_FORMAT,
        "model": model,
        "image_size": int(image_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "precision": precision,
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


def feature_cache_path(cache_dir: Path, name: str, key: str) -> Path:
    """``cache_dir/<name>-<key[:16]>.npz`` with ``name`` (e.g. a manifest's stem) reduced to safe characters."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "features"
    return Path(cache_dir) / f"{safe}-{key[:16]}.npz"


def _sidecar(cache_path: Path) -> Path:
    return cache_path.with_name(cache_path.name + ".json")


def verify_feature_cache(cache_path: Path, key: str) -> str | None:
    """Why ``cache_path`` cannot be used for ``key`` ("missing", "written for other inputs", "damaged: ..."),
    or None when its recorded size and SHA-256 match."""
    cache_path = Path(cache_path)
    if not cache_path.is_file():
        return "missing"
    try:
        record = json.loads(_sidecar(cache_path).read_text())
    except (OSError, ValueError):
        return "damaged: its size and checksum record is missing or unreadable"
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT or record.get("key") != key:
        return "written for other inputs"
    size = cache_path.stat().st_size
    if size != record.get("bytes"):
        return f"damaged: {size} bytes where {record.get('bytes')} were written"
    if file_sha256(cache_path) != record.get("sha256"):
        return "damaged: its SHA-256 differs from the one recorded on write"
    return None


def _read_arrays(cache_path: Path) -> dict[str, np.ndarray | None] | None:
    try:
        with np.load(cache_path, allow_pickle=False) as cache:
            return {"features": cache["features"], "logits": cache["logits"] if "logits" in cache else None}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def save_feature_cache(cache_path: Path, key: str, features: np.ndarray, logits: np.ndarray | None) -> None:
    """Write the arrays, then the record of their size and SHA-256; each to a unique temporary name, renamed."""
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"features": features} if logits is None else {"features": features, "logits": logits}
    with atomic_write(cache_path) as handle:
        np.savez(handle, **arrays)
    record = {"format": CACHE_FORMAT, "key": key, "bytes": cache_path.stat().st_size, "sha256": file_sha256(cache_path)}
    with atomic_write(_sidecar(cache_path), "w") as handle:
        handle.write(json.dumps(record, indent=1))


@dataclass
class CachedFeatures:
    """Features (and logits) of one manifest; ``reused`` tells whether they came from ``path``, and
    ``problem`` why an existing cache file was not used (damaged), else None."""

    features: np.ndarray
    logits: np.ndarray | None
    path: Path
    reused: bool
    problem: str | None = None


def cached_features(
    cache_path: Path, key: str, extract: Callable[[], tuple[np.ndarray, np.ndarray | None]]
) -> CachedFeatures:
    """Read the cache for ``key``, or call ``extract()`` and store its result; a damaged cache is named in
    ``problem`` and replaced."""
    cache_path = Path(cache_path)
    problem = verify_feature_cache(cache_path, key)
    if problem is None:
        arrays = _read_arrays(cache_path)
        if arrays is not None:
            return CachedFeatures(arrays["features"], arrays["logits"], cache_path, True)
        problem = "damaged: not a readable .npz file"
    features, logits = extract()
    save_feature_cache(cache_path, key, features, logits)
    damaged = problem if problem.startswith("damaged") else None
    return CachedFeatures(features, logits, cache_path, False, damaged)
