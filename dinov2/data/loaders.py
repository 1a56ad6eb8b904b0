"""DataLoader construction with deterministic worker seeding."""

from collections.abc import Callable, Iterable

import torch
from torch.utils.data import DataLoader, Dataset


def make_data_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    sampler: Iterable[int],
    collate_fn: Callable | None = None,
    pin_memory: bool | None = None,
    drop_last: bool = True,
    seed: int = 0,
    persistent_workers: bool | None = None,
) -> DataLoader:
    """A DataLoader over ``sampler`` (e.g. :class:`~dinov2.data.samplers.InfiniteSampler`).

    Worker seeding is deterministic: the loader's generator is seeded with ``seed``, and DataLoader
    seeds Python's ``random`` (which the augmentations use), NumPy and torch in worker w from it,
    so a run repeats exactly for a given seed and number of workers. Memory is pinned when CUDA
    is available unless ``pin_memory`` says otherwise; workers persist across iterations when
    there are any.
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
        generator=generator,
    )
