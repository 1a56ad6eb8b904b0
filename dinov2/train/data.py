"""The two training streams: unlabelled multi-crop batches and labelled supervised batches.

Exact resume: each rank's sampler starts at the number of samples it has consumed
(``step x batch size``), and every sample's augmentation is drawn from generators seeded by
``(train.seed, stream, global position of the sample)``, where the global position counts
samples of all ranks (rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of each epoch); the
batch's iBOT masks from ``(train.seed, stream, position of its first sample)``. A resumed run,
or the same data split over more ranks, sees the same crops for the same position, whatever
the number of DataLoader workers.

Worker processes: ``train.num_workers`` is one budget per rank, shared by both loaders in
proportion to the pixels of the crops each one makes per step (the supervised loader gets at
least one worker when the budget allows). ``auto`` = the CPU cores this process may use, minus
one for the training loop (:func:`worker_budget`): a node with 4 tasks x ``--cpus-per-task=8``
runs 4 x 7 workers, not 4 x 2 x ``num_workers``.
"""

import logging
import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from dinov2.data.augmentations import DataAugmentationDINO, make_supervised_transform
from dinov2.data.collate import collate_data_and_cast, collate_supervised
from dinov2.data.datasets.dataloader_sup import SupervisedDataset, UnsupervisedDataset
from dinov2.data.loaders import make_data_loader
from dinov2.data.manifest import read_manifests
from dinov2.data.masking import MaskingGenerator
from dinov2.data.samplers import ClassBalancedSampler, InfiniteSampler
from dinov2.errors import ConfigError, DataError
from dinov2.train.ssl_meta_arch import supervised_term_on

UNSUPERVISED_STREAM, SUPERVISED_STREAM = 0, 1
logger = logging.getLogger("dinov2")


def available_cpus(environ=os.environ, affinity: int | None = None) -> tuple[int, str]:
    """``(cores, where the number comes from)`` for this process: its CPU affinity (SLURM's binding,
    a cgroup cpuset), capped by ``SLURM_CPUS_PER_TASK`` (SLURM without binding shows the whole node),
    divided among torchrun's ``LOCAL_WORLD_SIZE`` processes, which share one allotment."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus, source = affinity, f"{affinity} CPUs in this process's affinity"
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and 0 < int(slurm) < cpus:
        cpus, source = int(slurm), f"SLURM_CPUS_PER_TASK={slurm}"
    sharing = int(environ.get("LOCAL_WORLD_SIZE", 1)) if "TORCHELASTIC_RUN_ID" in environ else 1
    if sharing > 1:
        cpus, source = cpus // sharing, f"{source} shared by {sharing} torchrun processes"
    return max(1, cpus), source


def worker_budget(setting, environ=os.environ, affinity: int | None = None) -> tuple[int, str]:
    """``(worker processes for this rank, why)`` for ``train.num_workers`` (``auto`` or a count)."""
    if setting == "auto":
        cpus, source = available_cpus(environ, affinity)
        return cpus - 1, f"auto: {source}, minus 1 for the training loop"
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ConfigError(f"train.num_workers must be auto or a number >= 0 (per rank), got {setting!r}")
    return setting, "train.num_workers"


def split_workers(budget: int, weights: list) -> list:
    """``budget`` workers split in proportion to ``weights`` (largest remainders first); every loader
    gets at least one while the budget allows."""
    if budget < len(weights):
        return [1 if i < budget else 0 for i in range(len(weights))]
    shares = [budget * w / sum(weights) for w in weights]
    counts = [max(1, int(share)) for share in shares]
    by_remainder = sorted(range(len(weights)), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    for i in by_remainder[: budget - sum(counts)]:
        counts[i] += 1
    while sum(counts) > budget:  # the minimum of one took workers from the largest share
        counts[counts.index(max(counts))] -= 1
    return counts


class PositionedSampler:
    """Yields ``(global position, dataset index)`` for one rank's :class:`InfiniteSampler`-like stream."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple]:
        s = self.sampler
        for local, index in enumerate(iter(s), start=s.start):
            epoch, offset = divmod(local, s.per_rank)
            yield epoch * s.world_size * s.per_rank + offset * s.world_size + s.rank, index


class _SeededRNG:
    """Seeds python / numpy / torch (CPU) from ``key`` on entry and restores the caller's states on exit."""

    def __init__(self, key):
        self.seed = int(np.random.SeedSequence(key).generate_state(1)[0])

    def __enter__(self):
        self.states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.default_generator.manual_seed(self.seed)  # CPU only: torch.manual_seed also seeds CUDA (slow)

    def __exit__(self, *exc):
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.set_rng_state(self.states[2])


_WORKER_SIGNALS_IGNORED = False


def _ignore_preemption_signals() -> None:
    """In a DataLoader worker: SLURM signals every process of a job step on pre-emption; the
    workers must survive so that the main process can finish its step and write a checkpoint."""
    global _WORKER_SIGNALS_IGNORED
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _WORKER_SIGNALS_IGNORED = True


class PositionSeededDataset(Dataset):
    """``dataset[(position, index)] -> (position, dataset[index])`` with the augmentation's RNGs
    seeded from ``(seed, stream, position)``."""

    def __init__(self, dataset, seed: int, stream: int):
        self.dataset = dataset
        self.seed = seed
        self.stream = stream

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        if get_worker_info() is not None and not _WORKER_SIGNALS_IGNORED:
            _ignore_preemption_signals()
        position, index = item
        with _SeededRNG([self.seed, self.stream, position]):
            return position, self.dataset[index]


class PositionSeededCollate:
    """Collates ``(position, sample)`` items with RNGs (iBOT masks) seeded from the first position."""

    def __init__(self, collate, seed: int, stream: int):
        self.collate = collate
        self.seed = seed
        self.stream = stream

    def __call__(self, items):
        with _SeededRNG([self.seed, self.stream, 2**20, items[0][0]]):
            return self.collate([sample for _, sample in items])


@dataclass
class Loaders:
    unsupervised: Iterator
    supervised: Iterator | None
    supervised_batch_size: int
    workers: tuple = (0, 0)  # worker processes of the unsupervised and the supervised loader


def training_rows(paths, split, what: str):
    """The rows of the manifests ``paths`` (config key ``what``) with ``split``; a warning names rows
    that repeat an image path (such an image is drawn more often per epoch; ``eval_hier`` refuses
    duplicates, also by content, which would cost a read of every image here)."""
    paths = list(paths) if not isinstance(paths, str) else [paths]
    if not paths:
        raise ConfigError(f"{what} is empty: give one or more manifest CSVs (e.g. {what}=[data/manifest.csv])")
    frame = read_manifests(paths)
    if split is not None:
        frame = frame[frame["split"] == split].reset_index(drop=True)
        if frame.empty:
            raise DataError(f"no rows with split == {split!r} in {paths} (set train.split=null to use every row)")
    repeated = frame["path"].map(os.path.normpath).duplicated(keep=False)
    if repeated.any():
        examples = sorted(set(frame["path"][repeated]))
        logger.warning(
            "%s: %d rows name %d image(s) that other rows name too (e.g. %s): each is drawn that many times "
            "as often per epoch; remove the repeated rows unless that is meant",
            what,
            int(repeated.sum()),
            len(examples),
            ", ".join(examples[:3]),
        )
    return frame


def multi_crop_collate(cfg):
    """``collate(samples) -> batch``: multi-crop samples into the trainer's batch dict, with iBOT masks
    drawn (from Python's ``random``) as ``cfg.ibot`` says."""
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    return partial(
        collate_data_and_cast,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        dtype=torch.float32,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid),
    )


def build_loaders(cfg, tree, start_step: int, rank: int, world_size: int) -> Loaders:
    """Infinite iterators over both streams, positioned after ``start_step`` steps."""
    batch_size = cfg.train.batch_size_per_gpu
    crops = cfg.crops
    use_supervised = supervised_term_on(cfg)
    sup_batch_size = (cfg.supervised.batch_size_per_gpu or batch_size) if use_supervised else 0
    sup_size = cfg.supervised.image_size or crops.global_crops_size
    budget, reason = worker_budget(cfg.train.num_workers)
    pixels = [batch_size * (2 * crops.global_crops_size**2 + crops.local_crops_number * crops.local_crops_size**2)]
    workers = split_workers(budget, pixels + ([sup_batch_size * sup_size**2] if use_supervised else [])) + [0]
    logger.info(
        "data loading: %d worker process(es) per rank (%s): %d multi-crop, %d supervised",
        budget,
        reason,
        workers[0],
        workers[1],
    )
    unsup_frame = training_rows(cfg.train.dataset_path_unsup, cfg.train.split, "train.dataset_path_unsup")
    augmentation = DataAugmentationDINO(
        crops.global_crops_scale,
        crops.local_crops_scale,
        crops.local_crops_number,
        global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
    )
    unsup = UnsupervisedDataset(unsup_frame, augmentation)
    collate = multi_crop_collate(cfg)
    sampler = InfiniteSampler(
        len(unsup), shuffle=True, seed=cfg.train.seed, start=start_step * batch_size, rank=rank, world_size=world_size
    )
    unsup_loader = make_data_loader(
        PositionSeededDataset(unsup, cfg.train.seed, UNSUPERVISED_STREAM),
        batch_size,
        workers[0],
        PositionedSampler(sampler),
        collate_fn=PositionSeededCollate(collate, cfg.train.seed, UNSUPERVISED_STREAM),
        seed=cfg.train.seed + rank,
    )

    if not use_supervised:
        return Loaders(iter(unsup_loader), None, 0, (workers[0], 0))
    sup_paths = cfg.train.dataset_path_sup or cfg.train.dataset_path_unsup
    sup_frame = training_rows(sup_paths, cfg.train.split, "train.dataset_path_sup")
    sup = SupervisedDataset(
        sup_frame,
        tree,
        make_supervised_transform(sup_size),
        source=f"the supervised manifest(s) {', '.join(map(str, sup_paths))} (split {cfg.train.split})",
    )
    start = start_step * sup_batch_size
    if cfg.supervised.sampler == "class_balanced":
        sup_sampler = ClassBalancedSampler(
            sup.labels, seed=cfg.train.seed + 1, start=start, rank=rank, world_size=world_size
        )
    elif cfg.supervised.sampler == "shuffle":
        sup_sampler = InfiniteSampler(
            len(sup), shuffle=True, seed=cfg.train.seed + 1, start=start, rank=rank, world_size=world_size
        )
    else:
        raise ConfigError(f"supervised.sampler must be shuffle or class_balanced, got {cfg.supervised.sampler!r}")
    sup_loader = make_data_loader(
        PositionSeededDataset(sup, cfg.train.seed, SUPERVISED_STREAM),
        sup_batch_size,
        workers[1],
        PositionedSampler(sup_sampler),
        collate_fn=PositionSeededCollate(collate_supervised, cfg.train.seed, SUPERVISED_STREAM),
        seed=cfg.train.seed + 1000 + rank,
    )
    return Loaders(iter(unsup_loader), iter(sup_loader), sup_batch_size, (workers[0], workers[1]))


def to_device(batch, device: torch.device):
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch
