"""Batch assembly: DINOv2's multi-crop batch with iBOT masks, and the supervised batch."""

import random
from collections.abc import Callable, Sequence

import torch

from dinov2.errors import DataError


def _readable(samples_list: Sequence[tuple | None]) -> list[tuple]:
    """Samples without the None entries of images skipped as unreadable (see ``skip_unreadable_log``)."""
    samples = [sample for sample in samples_list if sample is not None]
    if not samples:
        raise DataError("every image of the batch was unreadable (see the skip_unreadable_log file)")
    return samples


def collate_data_and_cast(
    samples_list: Sequence[tuple[dict, object]],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int,
    mask_generator: Callable[[int], object],
) -> dict[str, torch.Tensor]:
    """Stack the crops of ``(multi-crop dict, target)`` samples and draw iBOT masks for the global crops.

    Global crops are stacked crop-major (all first crops, then all second crops): B = 2 x batch.
    Of the B global crops, n = int(B x mask_probability) are masked; the ratio range is cut into n
    equal bins [r_i, r_i+1] and crop i masks about N x U(r_i, r_i+1) of its N = ``n_tokens``
    patches; the other crops get empty masks, and the list is shuffled. ``masks_weight`` gives each masked
    patch 1 / (masked patches of its crop), so that every masked crop weighs the same in the iBOT loss.
    None entries (unreadable images skipped by the dataset) are dropped.
    """
    samples_list = _readable(samples_list)
    n_global_crops = len(samples_list[0][0]["global_crops"])
    n_local_crops = len(samples_list[0][0]["local_crops"])
    collated_global_crops = torch.stack(
        [sample[0]["global_crops"][i] for i in range(n_global_crops) for sample in samples_list]
    )
    if n_local_crops > 0:
        collated_local_crops = torch.stack(
            [sample[0]["local_crops"][i] for i in range(n_local_crops) for sample in samples_list]
        )
    else:
        collated_local_crops = collated_global_crops.new_zeros((0,) + collated_global_crops.shape[1:])

    n_crops = len(collated_global_crops)
    n_samples_masked = int(n_crops * mask_probability)
    ratio_bins = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1).tolist()
    masks_list: list[torch.Tensor] = []
    for i in range(n_samples_masked):
        ratio = random.uniform(ratio_bins[i], ratio_bins[i + 1])
        masks_list.append(torch.from_numpy(mask_generator(int(n_tokens * ratio))))
    for _ in range(n_samples_masked, n_crops):
        masks_list.append(torch.from_numpy(mask_generator(0)))
    random.shuffle(masks_list)

    collated_masks = torch.stack(masks_list).flatten(1)
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return {
        "collated_global_crops": collated_global_crops.to(dtype),
        "collated_local_crops": collated_local_crops.to(dtype),
        "collated_masks": collated_masks,
        "masks_weight": masks_weight,
        "n_masked_patches": collated_masks.sum().reshape(1),
    }


def collate_supervised(samples_list: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(image, node_index), ...]`` -> (images (B, 3, H, W), node indices LongTensor (B,)); None entries dropped."""
    samples_list = _readable(samples_list)
    images = torch.stack([image for image, _ in samples_list])
    labels = torch.tensor([int(label) for _, label in samples_list], dtype=torch.long)
    return images, labels
