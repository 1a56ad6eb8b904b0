"""Infinite, sharded, resumable samplers.

The stream is cut into epochs. In epoch e every rank takes its shard of one global order of the
dataset, ``order_e[rank : world_size * per_rank : world_size]`` with ``per_rank = size // world_size``,
so the shards of one epoch are disjoint (the last ``size % world_size`` positions of each epoch's
order are left out; a new order each epoch moves them around). The order of epoch e depends only
on (seed, e), so position ``start`` of a rank's stream lies in epoch ``start // per_rank`` at offset
``start % per_rank``: resuming costs one epoch's permutation, never a replay of the past.
"""

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from dinov2.errors import DataError


def _per_rank(size: int, world_size: int) -> int:
    if world_size < 1:
        raise DataError(f"world_size must be >= 1, got {world_size}")
    if size < world_size:
        raise DataError(f"cannot shard a data set of {size} samples over {world_size} ranks")
    return size // world_size


class _ShardedEpochs:
    """Shared logic: subclasses give ``epoch_order(epoch)`` of length >= world_size * per_rank."""

    def __init__(self, size: int, seed: int, start: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
        if start < 0:
            raise DataError(f"start must be >= 0 samples, got {start}")
        self.size = int(size)
        self.seed = int(seed)
        self.start = int(start)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.per_rank = _per_rank(self.size, self.world_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def shard(self, epoch: int) -> np.ndarray:
        """Indices this rank draws in ``epoch`` (length ``per_rank``)."""
        return self.epoch_order(epoch)[self.rank : self.world_size * self.per_rank : self.world_size]

    def __iter__(self) -> Iterator[int]:
        first_epoch, offset = divmod(self.start, self.per_rank)
        for epoch in itertools.count(first_epoch):
            yield from self.shard(epoch)[offset:].tolist()
            offset = 0


class InfiniteSampler(_ShardedEpochs):
    """Endless indices into a data set of ``size`` samples for one rank.

    ``shuffle``: a fresh permutation per epoch (else 0..size-1 every epoch). ``start``: number of
    samples this rank has already consumed (for example step x batch size); the stream resumes
    exactly where the uninterrupted one would be.
    """

    def __init__(
        self, size: int, shuffle: bool = True, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1
    ):
        super().__init__(size, seed, start, rank, world_size)
        self.shuffle = shuffle

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            return self._rng(epoch).permutation(self.size)
        return np.arange(self.size)


class ClassBalancedSampler(_ShardedEpochs):
    """Endless indices drawn with replacement so that every tree node present is equally frequent.

    Sample i with node label y_i has probability w_i = 1 / (K n_{y_i}), where n_y counts the samples
    labelled y and K the number of distinct labels. Labels of -1 (ignored) get weight 0. An epoch is
    ``size`` draws shared out between ranks like :class:`InfiniteSampler`, with the same resume rule.
    """

    def __init__(self, labels: Sequence[int], seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1):
        labels = np.asarray(labels, dtype=np.int64)
        super().__init__(len(labels), seed, start, rank, world_size)
        known = labels >= 0
        if not known.any():
            raise DataError("a class-balanced sampler needs at least one labelled sample (all labels are -1)")
        nodes, inverse, counts = np.unique(labels[known], return_inverse=True, return_counts=True)
        weights = np.zeros(len(labels), dtype=np.float64)
        weights[known] = 1.0 / (len(nodes) * counts[inverse])
        self.probabilities = weights / weights.sum()

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self._rng(epoch).choice(self.size, size=self.size, replace=True, p=self.probabilities)
