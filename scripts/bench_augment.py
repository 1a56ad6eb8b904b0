"""Multi-crop augmentation throughput per CPU core: dino_hier's pipeline against straightforward ports.

Each image is read and decoded from its JPEG file, then turned into 2 global crops (224 px) and
8 local crops (98 px) with DINOv2's recipe. Pipelines run interleaved in rounds on one thread
(``torch.set_num_threads(1)``) and are timed in CPU seconds of the process, so that other jobs on
a shared machine disturb the numbers less than wall-clock time would; the best round of each is
reported, with the ratio against the transforms.v2 port.

    python scripts/bench_augment.py [--image PBC.jpg] [--rounds 5] [--images-per-round 40]
"""

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as v1
from torchvision.transforms import v2

from dinov2.data.augmentations import DINOV2_BLUR_PROBABILITIES, DataAugmentationDINO
from dinov2.data.synthetic_cells import render_demo_cell
from dinov2.data.transforms import NORMALIZATION_MEAN, NORMALIZATION_STD
from dinov2.utils.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
PBC_SAMPLE = REPO.parent / "shared/data/pbc_sample"
GLOBAL_SCALE, LOCAL_SCALE, LOCAL_NUMBER, GLOBAL_SIZE, LOCAL_SIZE = (0.32, 1.0), (0.05, 0.32), 8, 224, 98


def multi_crop(geometric_global, geometric_local, color, blurs, solarize, to_tensor):
    """DINOv2's recipe from building blocks of one torchvision API (v1 on PIL, or v2 on tensors)."""
    blur_first, blur_second, blur_local = blurs
    first = v1.Compose([color, blur_first, to_tensor])
    second = v1.Compose([color, blur_second, solarize, to_tensor])
    local = v1.Compose([color, blur_local, to_tensor])

    def augment(image):
        crops = [first(geometric_global(image)), second(geometric_global(image))]
        locals_ = [local(geometric_local(image)) for _ in range(LOCAL_NUMBER)]
        return {"global_crops": crops, "global_crops_teacher": crops, "local_crops": locals_, "offsets": ()}

    return augment


def torchvision_v2_port():
    """DINOv2's recipe written with torchvision.transforms.v2 on uint8 tensors."""
    bicubic = v2.InterpolationMode.BICUBIC
    pil_to_tensor = v2.PILToTensor()
    augment = multi_crop(
        v2.Compose([v2.RandomResizedCrop(GLOBAL_SIZE, GLOBAL_SCALE, interpolation=bicubic), v2.RandomHorizontalFlip()]),
        v2.Compose([v2.RandomResizedCrop(LOCAL_SIZE, LOCAL_SCALE, interpolation=bicubic), v2.RandomHorizontalFlip()]),
        v2.Compose([v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]),
        [v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=p) for p in DINOV2_BLUR_PROBABILITIES],
        v2.RandomSolarize(threshold=128, p=0.2),
        v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(NORMALIZATION_MEAN, NORMALIZATION_STD)]),
    )
    return lambda image: augment(pil_to_tensor(image))


def dinov2_v1_pipeline():
    """DINOv2's own formulation: torchvision.transforms (v1) on PIL images, blur as a tensor convolution."""
    bicubic = v1.InterpolationMode.BICUBIC
    return multi_crop(
        v1.Compose([v1.RandomResizedCrop(GLOBAL_SIZE, GLOBAL_SCALE, interpolation=bicubic), v1.RandomHorizontalFlip()]),
        v1.Compose([v1.RandomResizedCrop(LOCAL_SIZE, LOCAL_SCALE, interpolation=bicubic), v1.RandomHorizontalFlip()]),
        v1.Compose([v1.RandomApply([v1.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v1.RandomGrayscale(p=0.2)]),
        [v1.RandomApply([v1.GaussianBlur(9, sigma=(0.1, 2.0))], p=p) for p in DINOV2_BLUR_PROBABILITIES],
        v1.RandomSolarize(threshold=128, p=0.2),
        v1.Compose([v1.ToTensor(), v1.Normalize(NORMALIZATION_MEAN, NORMALIZATION_STD)]),
    )


def find_image(path):
    """The image to decode: ``path``, else a 360x363 PBC image from ../shared/data, else a generated cell."""
    if path:
        return Path(path)
    for candidate in sorted(PBC_SAMPLE.rglob("*.jpg")):
        if not candidate.name.startswith("."):
            with Image.open(candidate) as image:
                if image.size == (360, 363):
                    return candidate
    generated = Path(tempfile.mkdtemp()) / "demo_cell.jpg"
    render_demo_cell("neutrophil_segmented", size=363, seed=0).resize((360, 363)).save(generated, quality=95)
    print(f"no PBC image under {PBC_SAMPLE}; using a generated cell", file=sys.stderr)
    return generated


def images_per_second(pipeline, image_path, count):
    """Decode and augment ``count`` times; images per CPU second of this process (per core: one thread)."""
    start = time.process_time()
    for _ in range(count):
        with Image.open(image_path) as image:
            pipeline(image.convert("RGB"))
    return count / (time.process_time() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="JPEG to decode (default: a 360x363 image of ../shared/data/pbc_sample)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the best round counts (default 5)")
    parser.add_argument("--images-per-round", type=int, default=40, help="images per pipeline per round (default 40)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    image_path = find_image(args.image)
    with Image.open(image_path) as image:
        print(
            f"image: {image_path} {image.size[0]}x{image.size[1]}; crops 2x{GLOBAL_SIZE} + {LOCAL_NUMBER}x{LOCAL_SIZE}"
        )
    pipelines = {
        "dino_hier": DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, LOCAL_NUMBER, GLOBAL_SIZE, LOCAL_SIZE),
        "torchvision.v2 port": torchvision_v2_port(),
        "DINOv2 (transforms v1, PIL)": dinov2_v1_pipeline(),
    }
    best = {name: 0.0 for name in pipelines}
    for pipeline in pipelines.values():
        images_per_second(pipeline, image_path, 3)  # warm-up
    for _ in range(args.rounds):
        for name, pipeline in pipelines.items():
            best[name] = max(best[name], images_per_second(pipeline, image_path, args.images_per_round))
    reference = best["torchvision.v2 port"]
    for name, rate in best.items():
        print(f"{name:30s} {rate:7.1f} images/s/core   x{rate / reference:4.2f} vs torchvision.v2 port")
    return 0


if __name__ == "__main__":
    run_cli(main)
