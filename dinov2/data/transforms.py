"""Normalisation constants and the deterministic evaluation transform.

The constants are ImageNet's, as used by DINOv2 and DinoBloom; they are stored in every
exported model file so that evaluation and prediction normalise exactly as training did.
"""

from collections.abc import Sequence

from torchvision import transforms

NORMALIZATION_MEAN = (0.485, 0.456, 0.406)
NORMALIZATION_STD = (0.229, 0.224, 0.225)


def make_normalize(mean: Sequence[float] = NORMALIZATION_MEAN, std: Sequence[float] = NORMALIZATION_STD):
    """PIL image -> float tensor (C, H, W) normalised per channel."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)])


def make_eval_transform(
    image_size: int = 224,
    mean: Sequence[float] = NORMALIZATION_MEAN,
    std: Sequence[float] = NORMALIZATION_STD,
):
    """Resize the shorter side to ``image_size`` (bicubic), centre-crop a square, normalise."""
    return transforms.Compose(
        [
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            make_normalize(mean, std),
        ]
    )
