"""Infinite, sharded, resumable samplers and the data loader."""

from collections import Counter
from itertools import islice

import pytest
import torch
from torch.utils.data import Dataset

from dinov2.data.loaders import make_data_loader
from dinov2.data.samplers import ClassBalancedSampler, InfiniteSampler
from dinov2.errors import DataError


def take(sampler, n):
    return list(islice(iter(sampler), n))


def test_ranks_draw_disjoint_shards_of_each_epoch():
    size, world_size = 23, 3
    per_rank = size // world_size
    streams = [take(InfiniteSampler(size, seed=4, rank=r, world_size=world_size), 3 * per_rank) for r in range(3)]
    for epoch in range(3):
        shards = [set(stream[epoch * per_rank : (epoch + 1) * per_rank]) for stream in streams]
        assert all(len(shard) == per_rank for shard in shards)
        assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert streams[0][:per_rank] != streams[0][per_rank : 2 * per_rank]  # a new order each epoch


def test_single_rank_epochs_are_permutations_and_sequential_without_shuffle():
    stream = take(InfiniteSampler(10, seed=1), 30)
    assert all(sorted(stream[i : i + 10]) == list(range(10)) for i in (0, 10, 20))
    assert take(InfiniteSampler(4, shuffle=False), 9) == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert take(InfiniteSampler(10, seed=1), 30) == stream
    assert take(InfiniteSampler(10, seed=2), 30) != stream


@pytest.mark.parametrize("start", [0, 5, 7, 16, 1000])
def test_resumed_stream_is_the_tail_of_the_uninterrupted_one(start):
    uninterrupted = take(InfiniteSampler(15, seed=9, rank=1, world_size=2), start + 20)
    resumed = take(InfiniteSampler(15, seed=9, start=start, rank=1, world_size=2), 20)
    assert resumed == uninterrupted[start:]


def test_bad_sharding_is_refused():
    with pytest.raises(DataError, match="cannot shard a data set of 2 samples over 4 ranks"):
        InfiniteSampler(2, world_size=4)
    with pytest.raises(DataError, match="rank 3 is outside 0..1"):
        InfiniteSampler(10, rank=3, world_size=2)


def test_class_balanced_sampler_equalises_nodes_and_resumes():
    labels = [0] * 90 + [5] * 9 + [7] * 1 + [-1] * 20
    stream = take(ClassBalancedSampler(labels, seed=0), 6000)
    node_counts = Counter(labels[i] for i in stream)
    assert -1 not in node_counts
    assert all(abs(node_counts[node] / 6000 - 1 / 3) < 0.03 for node in (0, 5, 7))
    shards = [take(ClassBalancedSampler(labels, seed=0, rank=r, world_size=2), 120) for r in range(2)]
    assert shards[0] != shards[1]
    resumed = take(ClassBalancedSampler(labels, seed=0, start=130, rank=1, world_size=2), 50)
    assert resumed == take(ClassBalancedSampler(labels, seed=0, rank=1, world_size=2), 180)[130:]
    with pytest.raises(DataError, match="at least one labelled sample"):
        ClassBalancedSampler([-1, -1])


class RandomDraws(Dataset):
    """Returns its index and a draw from torch's and Python's generators (augmentation stand-in)."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        import random

        return torch.tensor([index, torch.rand(()).item() * 1e6, random.random() * 1e6])


def test_loader_batches_from_the_sampler_with_reproducible_worker_randomness():
    def first_batches(seed):
        loader = make_data_loader(
            RandomDraws(), batch_size=5, num_workers=1, sampler=InfiniteSampler(12, seed=3), seed=seed
        )
        return [batch.clone() for batch in islice(iter(loader), 3)]

    batches = first_batches(seed=0)
    assert all(batch.shape == (5, 3) for batch in batches)
    assert torch.cat(batches)[:, 0].long().tolist() == take(InfiniteSampler(12, seed=3), 15)
    again = first_batches(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = first_batches(seed=1)
    assert not torch.equal(batches[0][:, 1:], other[0][:, 1:])
    loader = make_data_loader(RandomDraws(), 4, 0, InfiniteSampler(12), pin_memory=False)
    assert loader.pin_memory is False and loader.drop_last and not loader.persistent_workers
