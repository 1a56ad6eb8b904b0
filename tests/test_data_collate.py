"""iBOT block masking and the DINOv2 / supervised collate functions."""

import random

import numpy as np
import torch

from dinov2.data.collate import collate_data_and_cast, collate_supervised
from dinov2.data.masking import MaskingGenerator


def test_masking_generator_masks_blocks_up_to_the_requested_count():
    random.seed(0)
    generator = MaskingGenerator((16, 16), max_num_patches=0.5 * 16 * 16)
    assert not generator(0).any()
    counts = []
    for requested in (10, 40, 100):
        for _ in range(20):
            mask = generator(requested)
            assert mask.shape == (16, 16) and mask.dtype == bool
            assert mask.sum() <= requested
            counts.append(mask.sum() / requested)
    assert np.mean(counts) > 0.8  # blocks fill most of the budget


def test_each_block_is_a_rectangle_within_the_budget():
    random.seed(1)
    generator = MaskingGenerator((10, 12), min_num_patches=4, max_num_patches=6)
    for _ in range(50):
        mask = np.zeros((10, 12), dtype=bool)
        added = generator._add_block(mask, 6)
        assert 0 < added <= 6 and mask.sum() == added
        rows, columns = np.nonzero(mask)
        assert mask[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1].all()


def _views(batch, n_local=3, global_size=28, local_size=14):
    return [
        (
            {
                "global_crops": [torch.full((3, global_size, global_size), float(10 * i + c)) for c in range(2)],
                "local_crops": [torch.full((3, local_size, local_size), float(10 * i + c)) for c in range(n_local)],
            },
            None,
        )
        for i in range(batch)
    ]


def test_collate_stacks_crops_crop_major_and_masks_half_of_them():
    random.seed(0)
    n_tokens = 4 * 4
    generator = MaskingGenerator((4, 4), max_num_patches=0.5 * n_tokens)
    batch = collate_data_and_cast(_views(4), (0.1, 0.5), 0.5, torch.bfloat16, n_tokens, generator)
    assert set(batch) == {
        "collated_global_crops",
        "collated_local_crops",
        "collated_masks",
        "masks_weight",
        "n_masked_patches",
    }
    assert batch["collated_global_crops"].shape == (8, 3, 28, 28)
    assert batch["collated_global_crops"].dtype == torch.bfloat16
    assert batch["collated_global_crops"][:, 0, 0, 0].tolist() == [0, 10, 20, 30, 1, 11, 21, 31]
    assert batch["collated_local_crops"].shape == (12, 3, 14, 14)
    masks = batch["collated_masks"]
    assert masks.shape == (8, n_tokens) and masks.dtype == torch.bool
    per_crop = masks.sum(1)
    assert (per_crop > 0).sum() <= 4  # int(8 x 0.5) crops are masked
    assert batch["n_masked_patches"].tolist() == [int(masks.sum())]
    assert int(masks.sum()) <= sum(int(n_tokens * r) for r in (0.2, 0.3, 0.4, 0.5))  # each crop <= its bin's top
    weights = batch["masks_weight"]
    assert weights.shape == (int(masks.sum()),)
    assert torch.isclose(weights.sum(), (per_crop > 0).sum().float())  # every masked crop weighs 1


def test_mask_ratios_cover_the_range_over_many_batches():
    random.seed(3)
    n_tokens = 16 * 16
    generator = MaskingGenerator((16, 16), max_num_patches=0.5 * n_tokens)
    ratios = []
    for _ in range(20):
        masks = collate_data_and_cast(_views(8, n_local=0), (0.1, 0.5), 0.5, torch.float32, n_tokens, generator)[
            "collated_masks"
        ]
        ratios += [r for r in (masks.sum(1).float() / n_tokens).tolist() if r > 0]
    assert len(ratios) >= 0.9 * 20 * 8  # 8 of 16 crops masked per batch
    assert 0.04 < min(ratios) < 0.15 and 0.4 < max(ratios) <= 0.5
    assert 0.22 < np.mean(ratios) < 0.33


def test_collate_supervised():
    images, labels = collate_supervised([(torch.zeros(3, 8, 8), 4), (torch.ones(3, 8, 8), 0)])
    assert images.shape == (2, 3, 8, 8) and labels.dtype == torch.long and labels.tolist() == [4, 0]
