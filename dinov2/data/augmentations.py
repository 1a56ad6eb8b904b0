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

Speed (``scripts/bench_augment.py``, ``scripts/bench_tricks.py``): crop and resize happen in one
antialiased uint8 interpolation; colour operations run on uint8 in PIL as torchvision's do on PIL
images (ImageEnhance), hue through PIL's 8-bit HSV with a table for the way back to RGB;
normalisation, blur (a 9-tap separable kernel as fused multiply-adds) and solarization run in
float on the stacked crops of one size at once.
Randomness comes from Python's ``random`` module, which DataLoader seeds in every worker.
"""

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from dinov2.data.transforms import NORMALIZATION_MEAN, NORMALIZATION_STD

DINOV2_BLUR_PROBABILITIES = (1.0, 0.1, 0.5)
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
    """PIL image -> RGB uint8 tensor (1, 3, H, W) in channels-last memory."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(1, height, width, 3)
    return pixels.permute(0, 3, 1, 2)


def resized_crop(pixels: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> Image.Image:
    """Crop ``box`` from (1, 3, H, W) uint8 pixels, resize to size x size (bicubic, antialiased), flip."""
    left, top, crop_width, crop_height = box
    crop = pixels[:, :, top : top + crop_height, left : left + crop_width]
    resized = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
    image = Image.fromarray(np.ascontiguousarray(resized[0].permute(1, 2, 0).numpy()), "RGB")
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def _hsv_to_rgb_factors() -> np.ndarray:
    """Table (65536, 3) float32: RGB = round(V x table[H * 256 + S]) reproduces PIL's HSV -> RGB.

    With sector i = floor(6H/255), fraction f = 6H/255 - i and s = S/255, each channel is V times
    one of 1, p = 1 - s, q = 1 - s f, t = 1 - s (1 - f), by sector (i mod 6):
    (1, t, p), (q, 1, p), (p, 1, t), (p, q, 1), (t, p, 1), (1, p, q).
    """
    hue = np.arange(256, dtype=np.float32)[:, None]
    saturation = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
    sector = np.floor(hue * np.float32(6.0 / 255.0))
    fraction = hue * np.float32(6.0 / 255.0) - sector
    one = np.ones((256, 256), dtype=np.float32)
    p = one - saturation
    q = one - saturation * fraction
    t = one - saturation * (1 - fraction)
    channels_by_sector = [(one, t, p), (q, one, p), (p, one, t), (p, q, one), (t, p, one), (one, p, q)]
    sector = np.broadcast_to(sector.astype(np.int64) % 6, (256, 256))
    table = np.empty((256, 256, 3), dtype=np.float32)
    for index, channels in enumerate(channels_by_sector):
        for channel, values in enumerate(channels):
            table[..., channel] = np.where(sector == index, values, table[..., channel])
    table[:, 0, :] = 1.0  # S = 0: gray, R = G = B = V
    return table.reshape(65536, 3)


_HSV_TO_RGB = _hsv_to_rgb_factors()


def adjust_hue(image: Image.Image, factor: float) -> Image.Image:
    """Rotate the hue by ``factor`` turns (|factor| <= 0.5) in PIL's 8-bit HSV, as torchvision does on
    PIL images: H += int(255 factor) (mod 256), then back to RGB by the table ``_HSV_TO_RGB``:
    identical to PIL's conversion, which does the per-pixel arithmetic that the table holds (a speed
    trick: ``scripts/bench_tricks.py``, README "Speed tricks")."""
    hsv = np.asarray(image.convert("HSV"))
    hue = hsv[..., 0] + np.uint8(int(factor * 255) % 256)
    rgb = np.take(_HSV_TO_RGB, (hue.astype(np.uint16) << 8) | hsv[..., 1], axis=0)
    rgb *= hsv[..., 2:3].astype(np.float32)
    return Image.fromarray(np.rint(rgb, out=rgb).astype(np.uint8), "RGB")


def random_color_jitter(
    image: Image.Image, brightness: float, contrast: float, saturation: float, hue: float
) -> Image.Image:
    """torchvision ColorJitter on a PIL image: the four operations in a random order, each factor f
    drawn uniformly. Brightness x -> f x, contrast x -> m + f (x - m) (m: the rounded mean gray
    level), saturation x -> g + f (x - g) (g: the pixel's gray level), each clipped to uint8
    (PIL's ImageEnhance, as torchvision); hue: :func:`adjust_hue`."""
    for operation in random.sample(range(4), 4):
        if operation == 0 and brightness > 0:
            image = ImageEnhance.Brightness(image).enhance(random.uniform(1 - brightness, 1 + brightness))
        elif operation == 1 and contrast > 0:
            image = ImageEnhance.Contrast(image).enhance(random.uniform(1 - contrast, 1 + contrast))
        elif operation == 2 and saturation > 0:
            image = ImageEnhance.Color(image).enhance(random.uniform(1 - saturation, 1 + saturation))
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
    of shifted views, a row pass and a column pass of one fused multiply-add per tap, for all images
    at once, where torchvision convolves each image with the 9 x 9 kernel (81 taps instead of 18; a
    speed trick: ``scripts/bench_tricks.py``, README "Speed tricks").
    """
    radius = kernel_size // 2
    kernels = gaussian_kernels(sigmas, kernel_size)
    if len(images) == 1:  # scalar weights: add_(alpha=w) is faster than a broadcast multiply
        taps = kernels[0].tolist()
    else:
        taps = list(kernels[:, :, None, None, None].unbind(1))  # K tensors (N, 1, 1, 1)

    def accumulate(total: torch.Tensor, view: torch.Tensor, weight) -> None:
        if isinstance(weight, float):
            total.add_(view, alpha=weight)
        else:
            total.addcmul_(view, weight)

    height, width = images.shape[-2:]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = padded[..., radius : radius + width] * taps[radius]
    for tap in range(kernel_size):
        if tap != radius:
            accumulate(rows, padded[..., tap : tap + width], taps[tap])
    blurred = rows[..., radius : radius + height, :] * taps[radius]
    for tap in range(kernel_size):
        if tap != radius:
            accumulate(blurred, rows[..., tap : tap + height, :], taps[tap])
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

    def __call__(self, crops: torch.Tensor, blur: Sequence[bool], solarize: Sequence[bool]) -> list[torch.Tensor]:
        """``crops``: uint8 (N, H, W, 3); ``blur``/``solarize``: one flag per crop. One tensor per crop."""
        images = torch.empty((crops.shape[0], 3) + tuple(crops.shape[1:3]), dtype=torch.float32)
        images.copy_(crops.permute(0, 3, 1, 2))
        images.mul_(self.scale).add_(self.bias)
        blurred = [index for index, flag in enumerate(blur) if flag]
        outputs = list(images.unbind(0))
        if blurred:
            sigmas = torch.tensor([random.uniform(*BLUR_SIGMA_RANGE) for _ in blurred], dtype=torch.float32)
            selected = images if len(blurred) == len(images) else images[blurred]
            for index, image in zip(blurred, gaussian_blur(selected, sigmas).unbind(0)):
                outputs[index] = image
        for index in (index for index, flag in enumerate(solarize) if flag):
            image = outputs[index]
            outputs[index] = torch.where(image >= self.solarize_threshold[0], self.solarize_sum[0] - image, image)
        return outputs


def _stacked_pixels(canvas: Image.Image, count: int) -> torch.Tensor:
    """The crops pasted one below the other on ``canvas`` as a uint8 tensor (count, size, size, 3)."""
    width = canvas.size[0]
    return torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(count, width, width, 3)


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

    def _crops(self, pixels: torch.Tensor, count: int, size: int, scale: tuple[float, float]) -> torch.Tensor:
        """``count`` independently drawn crops, colour-jittered and maybe grayscaled: (count, size, size, 3) uint8."""
        height, width = pixels.shape[-2:]
        canvas = Image.new("RGB", (size, size * count))
        for index in range(count):
            box = random_resized_crop_box(width, height, scale)
            crop = resized_crop(pixels, box, size, flip=random.random() < 0.5)
            if random.random() < 0.8:
                crop = random_color_jitter(crop, 0.4, 0.4, 0.2, 0.1)
            if random.random() < 0.2:
                crop = crop.convert("L").convert("RGB")
            canvas.paste(crop, (0, size * index))
        return _stacked_pixels(canvas, count)

    def __call__(self, image: Image.Image) -> dict:
        pixels = image_to_uint8_tensor(image)
        p_blur_first, p_blur_second, p_blur_local = self.blur_probabilities
        global_crops = self._crops(pixels, 2, self.global_crops_size, self.global_crops_scale)
        global_blur = [random.random() < p_blur_first, random.random() < p_blur_second]
        global_solarize = [False, random.random() < 0.2]
        global_tensors = self.finish(global_crops, global_blur, global_solarize)
        local_tensors: list[torch.Tensor] = []
        if self.local_crops_number > 0:
            local_crops = self._crops(pixels, self.local_crops_number, self.local_crops_size, self.local_crops_scale)
            local_blur = [random.random() < p_blur_local for _ in range(self.local_crops_number)]
            local_tensors = self.finish(local_crops, local_blur, [False] * self.local_crops_number)
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
        pixels = image_to_uint8_tensor(image)
        height, width = pixels.shape[-2:]
        box = random_resized_crop_box(width, height, self.scale)
        crop = resized_crop(pixels, box, self.size, flip=random.random() < 0.5)
        if random.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        if random.random() < 0.5:
            crop = random_color_jitter(crop, 0.2, 0.2, 0.1, 0.02)
        return self.finish(_stacked_pixels(crop, 1), [False], [False])[0]


def make_supervised_transform(
    size: int = 224, mean=NORMALIZATION_MEAN, std=NORMALIZATION_STD
) -> SupervisedAugmentation:
    """The supervised training transform: PIL image -> normalised (3, size, size) float tensor."""
    return SupervisedAugmentation(size=size, mean=mean, std=std)
