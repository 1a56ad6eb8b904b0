"""DINOv2 multi-crop augmentation and the lighter supervised augmentation, tuned for CPU throughput.

The distribution is DINOv2's (``dinov2/data/augmentations.py`` upstream), every crop drawn
independently:

* crop: RandomResizedCrop (area fraction ~ U(scale), log aspect ratio ~ U(log 3/4, log 4/3),
  bicubic, antialiased), horizontal flip p=0.5;
* colour: with p=0.8 ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) in a
  random order of the four operations, factors b, c ~ U(0.6, 1.4), s ~ U(0.8, 1.2),
  h ~ U(-0.1, 0.1); then grayscale with p=0.2;
* blur: 9-tap Gaussian, sigma ~ U(0.1, 2.0), reflect padding, with p = 1.0 (first global crop),
  0.1 (second global crop), 0.5 (each local crop); solarize (x >= 128/255 -> 1 - x) with p=0.2
  on the second global crop only;
* ImageNet normalisation (:mod:`dinov2.data.transforms`).

Upstream DINOv2 wraps its blur in ``RandomApply(p=1 - p)``, so the code that trained the released
DINOv2/DinoBloom weights blurred with p = (0.0, 0.9, 0.5) instead of the documented
(1.0, 0.1, 0.5) (facebookresearch/dinov2 PR #411). ``blur_probabilities`` selects either.

Speed: decoding and colour operations stay in PIL/uint8 (colour jitter uses PIL's HSV for hue as
torchvision does on PIL images), crop and resize happen in one antialiased uint8 interpolation,
and the blur, solarization and normalisation run on the stacked crops of one size at once.
Randomness comes from Python's ``random`` module, which DataLoader workers seed per worker.
"""

import math
import random
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinov2.data.transforms import NORMALIZATION_MEAN, NORMALIZATION_STD

DINOV2_BLUR_PROBABILITIES = (1.0, 0.1, 0.5)
DINOV2_RELEASED_BLUR_PROBABILITIES = (0.0, 0.9, 0.5)
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA_RANGE = (0.1, 2.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_box(width: int, height: int, scale: Sequence[float], ratio=ASPECT_RATIO_RANGE):
    """torchvision's RandomResizedCrop parameters -> (left, top, crop_width, crop_height).

    Up to 10 draws of area fraction ~ U(scale) and log aspect ~ U(log ratio); the first that fits
    is placed uniformly. Otherwise the whole image, centre-cropped to the nearest allowed ratio.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * random.uniform(scale[0], scale[1])
        aspect = math.exp(random.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = random.randint(0, height - crop_height)
            left = random.randint(0, width - crop_width)
            return left, top, crop_width, crop_height
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_width, crop_height = int(round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def image_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (1, 3, H, W) in channels-last memory (no copy of the pixels)."""
    array = np.asarray(image)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def resized_crop(pixels: torch.Tensor, box: Tuple[int, int, int, int], size: int, flip: bool) -> np.ndarray:
    """Crop ``box`` from (1, 3, H, W) uint8 pixels, resize to size x size (bicubic, antialiased), flip.

    Returns an (size, size, 3) uint8 array.
    """
    left, top, crop_width, crop_height = box
    crop = pixels[:, :, top : top + crop_height, left : left + crop_width]
    resized = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
    array = resized[0].permute(1, 2, 0)
    if flip:
        array = array.flip(1)
    return np.ascontiguousarray(array.numpy())


def _apply_lut(image: Image.Image, lut: np.ndarray) -> Image.Image:
    """Map every channel of an 8-bit image through a 256-entry uint8 table."""
    return Image.fromarray(np.take(lut, np.asarray(image)), image.mode)


def _blend_lut(degenerate: float, factor: float) -> np.ndarray:
    """Table of x -> degenerate + factor * (x - degenerate), clipped and truncated as PIL's blend does."""
    levels = np.arange(256, dtype=np.float32)
    values = np.float32(degenerate) + np.float32(factor) * (levels - np.float32(degenerate))
    return np.clip(values, 0, 255).astype(np.uint8)


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
    """x -> clip(factor * x): a blend with black."""
    return _apply_lut(image, _blend_lut(0.0, factor))


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
    """x -> clip(mean + factor * (x - mean)), mean = rounded mean gray level: a blend with it."""
    histogram = np.asarray(image.convert("L").histogram(), dtype=np.float64)
    mean = int(histogram @ np.arange(256) / max(1.0, histogram.sum()) + 0.5)
    return _apply_lut(image, _blend_lut(float(mean), factor))


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
    """x -> clip(gray(x) + factor * (x - gray(x))): a blend with the grayscale image."""
    return Image.blend(image.convert("L").convert("RGB"), image, factor)


def adjust_hue(image: Image.Image, factor: float) -> Image.Image:
    """Rotate the hue by ``factor`` turns (|factor| <= 0.5) in PIL's 8-bit HSV, as torchvision does."""
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] += np.uint8(int(factor * 255) % 256)
    return Image.fromarray(hsv, "HSV").convert("RGB")


def random_color_jitter(
    image: Image.Image, brightness: float, contrast: float, saturation: float, hue: float
) -> Image.Image:
    """torchvision ColorJitter: the four operations in a random order, each factor drawn uniformly."""
    for operation in random.sample(range(4), 4):
        if operation == 0 and brightness > 0:
            image = adjust_brightness(image, random.uniform(1 - brightness, 1 + brightness))
        elif operation == 1 and contrast > 0:
            image = adjust_contrast(image, random.uniform(1 - contrast, 1 + contrast))
        elif operation == 2 and saturation > 0:
            image = adjust_saturation(image, random.uniform(1 - saturation, 1 + saturation))
        elif operation == 3 and hue > 0:
            image = adjust_hue(image, random.uniform(-hue, hue))
    return image


def gaussian_kernels(sigmas: torch.Tensor, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, one row per sigma: k_i ∝ exp(-(i - r)^2 / (2 sigma^2)), r = size // 2."""
    offsets = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
    kernels = torch.exp(-0.5 * (offsets[None, :] / sigmas[:, None]) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) float images, one sigma per image, reflect padding.

    Same result as torchvision's ``gaussian_blur(kernel_size, sigma)``; computed as a weighted sum
    of shifted views (one fused multiply-add pass per tap), several times faster on the CPU than
    a depthwise convolution.
    """
    radius = kernel_size // 2
    weights = gaussian_kernels(sigmas, kernel_size)[:, :, None, None, None]  # (N, K, 1, 1, 1)
    height, width = images.shape[-2:]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = padded[..., radius : radius + width] * weights[:, radius]
    for tap in range(kernel_size):
        if tap != radius:
            rows.addcmul_(padded[..., tap : tap + width], weights[:, tap])
    blurred = rows[..., radius : radius + height, :] * weights[:, radius]
    for tap in range(kernel_size):
        if tap != radius:
            blurred.addcmul_(rows[..., tap : tap + height, :], weights[:, tap])
    return blurred


class CropFinisher:
    """Stacked uint8 crops (N, H, W, 3) -> normalised float tensors (N, 3, H, W), blurred and solarized.

    Normalisation y = (x / 255 - mean) / std is applied first, in one pass; blur (a convolution
    with a kernel summing to 1) commutes with it, and solarization x -> 1 - x for x >= 128/255
    becomes y -> (1 - 2 mean) / std - y for y >= (128/255 - mean) / std.
    """

    def __init__(self, mean: Sequence[float] = NORMALIZATION_MEAN, std: Sequence[float] = NORMALIZATION_STD):
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.bias = -mean / std
        self.solarize_threshold = (128.0 / 255.0 - mean) / std
        self.solarize_sum = (1.0 - 2.0 * mean) / std

    def __call__(self, crops: np.ndarray, blur: Sequence[bool], solarize: Sequence[bool]) -> torch.Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2)
        images = torch.empty(pixels.shape, dtype=torch.float32)
        images.copy_(pixels)
        images.mul_(self.scale).add_(self.bias)
        blurred = [index for index, flag in enumerate(blur) if flag]
        if blurred:
            sigmas = torch.tensor([random.uniform(*BLUR_SIGMA_RANGE) for _ in blurred], dtype=torch.float32)
            if len(blurred) == len(images):
                images = gaussian_blur(images, sigmas)
            else:
                images[blurred] = gaussian_blur(images[blurred], sigmas)
        for index in (index for index, flag in enumerate(solarize) if flag):
            image = images[index]
            torch.where(image >= self.solarize_threshold[0], self.solarize_sum[0] - image, image, out=image)
        return images


class DataAugmentationDINO:
    """Multi-crop views of one PIL image: 2 global crops and ``local_crops_number`` local crops.

    Returns ``{"global_crops": [2 x (3, G, G)], "global_crops_teacher": same list,
    "local_crops": [N x (3, L, L)], "offsets": ()}`` like DINOv2.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 98,
        blur_probabilities: Sequence[float] = DINOV2_BLUR_PROBABILITIES,
        mean: Sequence[float] = NORMALIZATION_MEAN,
        std: Sequence[float] = NORMALIZATION_STD,
    ):
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.blur_probabilities = tuple(blur_probabilities)
        self.finish = CropFinisher(mean, std)

    def _crop(self, pixels: torch.Tensor, size: int, scale: Tuple[float, float]) -> np.ndarray:
        height, width = pixels.shape[-2:]
        box = random_resized_crop_box(width, height, scale)
        crop = Image.fromarray(resized_crop(pixels, box, size, flip=random.random() < 0.5))
        if random.random() < 0.8:
            crop = random_color_jitter(crop, 0.4, 0.4, 0.2, 0.1)
        if random.random() < 0.2:
            crop = crop.convert("L").convert("RGB")
        return np.asarray(crop)

    def __call__(self, image: Image.Image) -> dict:
        pixels = image_to_uint8_tensor(image.convert("RGB"))
        p_blur_first, p_blur_second, p_blur_local = self.blur_probabilities
        global_crops = np.stack([self._crop(pixels, self.global_crops_size, self.global_crops_scale) for _ in range(2)])
        global_blur = [random.random() < p_blur_first, random.random() < p_blur_second]
        global_solarize = [False, random.random() < 0.2]
        global_tensors = list(self.finish(global_crops, global_blur, global_solarize).unbind(0))
        local_tensors: List[torch.Tensor] = []
        if self.local_crops_number > 0:
            local_crops = np.stack(
                [
                    self._crop(pixels, self.local_crops_size, self.local_crops_scale)
                    for _ in range(self.local_crops_number)
                ]
            )
            local_blur = [random.random() < p_blur_local for _ in range(self.local_crops_number)]
            local_tensors = list(self.finish(local_crops, local_blur, [False] * self.local_crops_number).unbind(0))
        return {
            "global_crops": global_tensors,
            "global_crops_teacher": global_tensors,
            "local_crops": local_tensors,
            "offsets": (),
        }


class SupervisedAugmentation:
    """Lighter augmentation for the supervised head: resized crop, horizontal and vertical flips,
    mild colour jitter (p=0.5; brightness/contrast 0.2, saturation 0.1, hue 0.02), normalisation."""

    def __init__(
        self,
        size: int = 224,
        scale: Sequence[float] = (0.5, 1.0),
        mean: Sequence[float] = NORMALIZATION_MEAN,
        std: Sequence[float] = NORMALIZATION_STD,
    ):
        self.size = int(size)
        self.scale = tuple(scale)
        self.finish = CropFinisher(mean, std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = image_to_uint8_tensor(image.convert("RGB"))
        height, width = pixels.shape[-2:]
        box = random_resized_crop_box(width, height, self.scale)
        crop = Image.fromarray(resized_crop(pixels, box, self.size, flip=random.random() < 0.5))
        if random.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        if random.random() < 0.5:
            crop = random_color_jitter(crop, 0.2, 0.2, 0.1, 0.02)
        return self.finish(np.asarray(crop)[None], [False], [False])[0]


def make_supervised_transform(size: int = 224, mean=NORMALIZATION_MEAN, std=NORMALIZATION_STD) -> SupervisedAugmentation:
    """The supervised training transform: PIL image -> normalised (3, size, size) float tensor."""
    return SupervisedAugmentation(size=size, mean=mean, std=std)
