"""Multi-crop and supervised augmentation: output layout, DINOv2's operations, determinism."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dinov2.data import augmentations
from dinov2.data.augmentations import (
    DataAugmentationDINO,
    adjust_hue,
    gaussian_blur,
    make_supervised_transform,
    random_resized_crop_box,
)


@pytest.fixture(scope="module")
def cell_image():
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 90 * 80 * 3).reshape(90, 80, 3)
    return Image.fromarray((base * 0.6 + rng.integers(0, 100, (90, 80, 3))).astype(np.uint8))


def test_multi_crop_output_matches_dinov2_layout(cell_image):
    augment = DataAugmentationDINO(
        (0.32, 1.0), (0.05, 0.32), local_crops_number=3, global_crops_size=56, local_crops_size=28
    )
    views = augment(cell_image)
    assert set(views) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert [crop.shape for crop in views["global_crops"]] == [(3, 56, 56)] * 2
    assert views["global_crops_teacher"] is views["global_crops"]
    assert [crop.shape for crop in views["local_crops"]] == [(3, 28, 28)] * 3
    assert views["offsets"] == ()
    assert all(crop.dtype == torch.float32 and torch.isfinite(crop).all() for crop in views["local_crops"])
    assert not torch.equal(views["global_crops"][0], views["global_crops"][1])


def test_multi_crop_is_reproducible_from_python_random(cell_image):
    augment = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 32, 16)
    random.seed(5)
    first = augment(cell_image)
    random.seed(5)
    second = augment(cell_image)
    assert all(torch.equal(a, b) for a, b in zip(first["local_crops"], second["local_crops"]))


def test_normalisation_inverts_to_the_crop_pixels():
    flat = Image.new("RGB", (40, 40), (120, 60, 200))
    augment = DataAugmentationDINO((1.0, 1.0), (1.0, 1.0), 0, 40, 16, blur_probabilities=(0, 0, 0))
    random.seed(0)
    crops = [augment(flat)["global_crops"][0] for _ in range(30)]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = [(crop[:, 20, 20] * std + mean) * 255 for crop in crops]
    assert any(torch.allclose(p, torch.tensor([120.0, 60.0, 200.0]), atol=0.5) for p in pixels)  # no jitter drawn


def test_random_resized_crop_box_follows_scale_and_ratio():
    random.seed(0)
    for _ in range(300):
        left, top, width, height = random_resized_crop_box(360, 363, (0.05, 0.32))
        assert 0 <= left and left + width <= 360 and 0 <= top and top + height <= 363
        assert 0.05 * 0.9 <= width * height / (360 * 363) <= 0.32 * 1.1
        assert 3 / 4 * 0.9 <= width / height <= 4 / 3 * 1.1
    assert random_resized_crop_box(100, 10, (0.9, 1.0)) == (43, 0, 13, 10)  # fallback: centre, ratio 4/3


def test_gaussian_blur_equals_torchvision_9_tap_kernel():
    images = torch.rand(3, 3, 20, 24)
    sigmas = torch.tensor([0.1, 0.9, 2.0])
    expected = torch.stack([TF.gaussian_blur(image, [9, 9], [float(s), float(s)]) for image, s in zip(images, sigmas)])
    assert torch.allclose(gaussian_blur(images, sigmas), expected, atol=1e-5)
    assert torch.allclose(gaussian_blur(images[1:2], sigmas[1:2]), expected[1:2], atol=1e-5)  # scalar-weight path


def test_hue_table_equals_torchvision_on_pil_images(cell_image):
    """The HSV -> RGB table (a speed trick) against the plain conversion torchvision runs."""
    for factor in (-0.5, -0.1, 0.0, 0.04, 0.37):
        ours = np.asarray(adjust_hue(cell_image, factor))
        assert np.array_equal(ours, np.asarray(TF.adjust_hue(cell_image, factor)))
    gray = cell_image.convert("L").convert("RGB")  # saturation 0
    assert np.array_equal(np.asarray(adjust_hue(gray, 0.2)), np.asarray(TF.adjust_hue(gray, 0.2)))


def test_supervised_transform_shape(cell_image):
    image = make_supervised_transform(48)(cell_image)
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32


def _edge_energy(crop: torch.Tensor) -> float:
    """Mean absolute horizontal difference over the standard deviation, per channel (blur lowers it,
    brightness, contrast and normalisation do not)."""
    return float(((crop[:, :, 1:] - crop[:, :, :-1]).abs().mean(dim=(1, 2)) / crop.std(dim=(1, 2))).mean())


def test_blur_probabilities_per_crop_kind(monkeypatch):
    monkeypatch.setattr(augmentations, "random_resized_crop_box", lambda width, height, scale: (0, 0, width, height))
    noise = np.random.default_rng(0).integers(90, 166, (32, 32))  # gray: only blur changes its texture
    image = Image.fromarray(np.repeat(noise[..., None], 3, axis=2).astype(np.uint8))
    augment = DataAugmentationDINO((1.0, 1.0), (1.0, 1.0), 4, 32, 32, blur_probabilities=(1.0, 0.0, 0.5))
    random.seed(0)
    sharp = _edge_energy(torch.from_numpy(noise).float()[None])
    blurred = {"first": [], "second": [], "local": []}
    for _ in range(60):
        views = augment(image)
        blurred["first"].append(_edge_energy(views["global_crops"][0]) < 0.95 * sharp)
        blurred["second"].append(_edge_energy(views["global_crops"][1]) < 0.95 * sharp)
        blurred["local"] += [_edge_energy(crop) < 0.95 * sharp for crop in views["local_crops"]]
    assert np.mean(blurred["first"]) > 0.75  # sigma ~ U(0.1, 2): only sigma < ~0.4 leaves edges sharp
    assert np.mean(blurred["second"]) == 0.0
    assert 0.3 < np.mean(blurred["local"]) < 0.6
