"""DataLoader construction with deterministic worker seeding."""

import random
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's generators from the worker's torch seed (set by DataLoader)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_data_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    sampler: Iterable[int],
    collate_fn: Optional[Callable] = None,
    pin_memory: Optional[bool] = None,
    drop_last: bool = True,
    seed: int = 0,
    persistent_workers: Optional[bool] = None,
) -> DataLoader:
    """A DataLoader over ``sampler`` (e.g. :class:`~dinov2.data.samplers.InfiniteSampler`).

    Worker w of a loader built with ``seed`` draws its augmentations from seed-derived generators,
    so a run repeats exactly for a given seed, number of workers and start position. Memory is
    pinned when CUDA is available unless ``pin_memory`` says otherwise; workers persist across
    iterations when there are any.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=_seed_worker,
        generator=generator,
    )
