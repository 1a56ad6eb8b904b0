"""Each speed trick against its plain version, on whole user paths, side by side in one run.

    python scripts/bench_tricks.py [--paths demo vits14 eval augment] [--tricks attention mallopt ...]
                                   [--repeats 12] [--precision auto]

The library always runs its tricks; this script switches one off by patching the plain PyTorch /
Pillow call into its place. For each (trick, path) pair the path's step runs alternately with and
without the trick (which goes first flips every repeat), after warm-up steps of both, in this
process. ``mallopt`` cannot be undone inside a process: its two variants run in alternating child
processes instead (each with its own warm-up). One JSON line per pair: the median seconds per step
each way, ``saving`` = 1 - trick / plain of the medians (> 0: the trick saves time), and the spread
of the per-repeat savings (quartiles, min and max). On a shared machine, trust a saving only where
the quartiles stay on one side of 0.

Paths (what users run):
  demo     one training step of dinov2/configs/train/demo.yaml (tiny ViT, 1024 prototypes, batch 16)
  vits14   one training step of a ViT-S/14 with DINOv2's heads (65,536 prototypes), --batch images
  eval     CLS features of 32 images of 224 px (forward_clstoken), as eval_hier and predict compute them
  augment  DataAugmentationDINO on one decoded image: 2 x 224 + 8 x 98 crops (a loader worker's work)

Training steps are the trainer's own (``dinov2.train.train.train_step``: forward under the run's
precision, the finiteness check, backward, gradient clipping, AdamW, teacher EMA). ``--precision auto`` picks bf16
on a CPU with fast bf16 and fp32 elsewhere, as the trainer does; to emulate a CPU without fast
bf16 on one with it, set ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from bench_train import step_overrides  # scripts/ is on the path when a script runs
from PIL import Image
from torchvision.transforms import functional as tv_functional
from torchvision.transforms.v2 import functional as tv_v2

from dinov2.config.custom_hier import get_tree
from dinov2.data import augmentations
from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.synthetic_cells import generate_demo_dataset, render_demo_cell
from dinov2.layers.attention import Attention
from dinov2.models import build_backbone
from dinov2.train.data import build_loaders
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import build_grad_scaler, build_optimizer, train_step
from dinov2.utils.cli import run_cli
from dinov2.utils.config import CONFIGS_DIR, load_config
from dinov2.utils.cpu_memory import retain_freed_memory
from dinov2.utils.precision import choose_precision

CPU = torch.device("cpu")
PBC_SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/pbc_sample"


# ---------------------------------------------------------------- plain versions
def plain_attend(self, q, k, v, attn_bias):
    """PyTorch SDPA for every dtype on the CPU."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def plain_gaussian_blur(images, sigmas, kernel_size=augmentations.BLUR_KERNEL_SIZE):
    """torchvision's Gaussian blur (a depthwise convolution), one call per image and sigma."""
    size = [kernel_size, kernel_size]
    return torch.stack([tv_v2.gaussian_blur(x, size, [float(s), float(s)]) for x, s in zip(images, sigmas)])


def plain(trick: str):
    """A context in which ``trick`` is replaced by its plain version."""
    patches = {
        "attention": lambda: mock.patch.object(Attention, "_attend", plain_attend),
        "hue_table": lambda: mock.patch.object(augmentations, "adjust_hue", tv_functional.adjust_hue),
        "blur_taps": lambda: mock.patch.object(augmentations, "gaussian_blur", plain_gaussian_blur),
    }
    return patches[trick]()


MODEL_TRICKS = ["attention", "mallopt"]
AUGMENT_TRICKS = ["hue_table", "blur_taps"]
TRICKS_BY_PATH = {"demo": MODEL_TRICKS, "vits14": MODEL_TRICKS, "eval": MODEL_TRICKS, "augment": AUGMENT_TRICKS}


# ---------------------------------------------------------------- paths
def training_path(config_file, overrides: list, precision, workdir: Path) -> Callable:
    """One training step of the given config on a fixed batch of generated demo cells."""
    manifest = workdir / "data" / "manifest.csv"
    if not manifest.exists():
        generate_demo_dataset(workdir / "data", n_per_class=4, size=112)
    cfg = load_config(config_file, [*overrides, f"train.dataset_path_unsup=[{manifest}]", "train.num_workers=0"])
    tree = get_tree(cfg.supervised.hierarchy)
    model = SSLMetaArch(cfg, tree)
    optimizer = build_optimizer(model, cfg)
    loaders = build_loaders(cfg, tree, 0, 0, 1)
    batch, supervised = next(loaders.unsupervised), next(loaders.supervised)
    scaler = build_grad_scaler(precision, CPU)
    hyper = {"step": 0, "lr": 1e-5, "wd": 0.04, "momentum": 0.994, "teacher_temp": 0.04, "frozen": False}
    hyper["clip_grad"] = cfg.optim.clip_grad

    def step():
        train_step(model, optimizer, scaler, precision, CPU, batch, supervised, hyper)

    return step


def eval_step(precision) -> Callable:
    """Inference of a ViT-S/14 on a batch, as the feature extraction of eval_hier and predict."""
    backbone = build_backbone("vit_small", patch_size=14, img_size=224).eval()
    images = torch.randn(32, 3, 224, 224)

    def step():
        with torch.no_grad(), precision.autocast(CPU):
            backbone.forward_clstoken(images)

    return step


def augment_step(workdir: Path) -> Callable:
    """Decode a PBC image (a generated cell of the same size without ../shared/data) and augment it."""
    candidates = [p for p in sorted(PBC_SAMPLE.rglob("*.jpg")) if not p.name.startswith(".")]
    if candidates:
        path = candidates[0]
    else:
        path = workdir / "cell.jpg"
        render_demo_cell("neutrophil_segmented", size=363, seed=0).save(path, quality=95)
    augment = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 8, 224, 98)

    def step():
        with Image.open(path) as image:
            augment(image.convert("RGB"))

    return step


def build_path(name: str, args, precision, workdir: Path) -> Callable:
    if name == "demo":
        return training_path(CONFIGS_DIR / "train" / "demo.yaml", [], precision, workdir)
    if name == "vits14":
        return training_path(None, [*step_overrides(), f"train.batch_size_per_gpu={args.batch}"], precision, workdir)
    if name == "eval":
        return eval_step(precision)
    if name == "augment":
        return augment_step(workdir)
    raise ValueError(name)


# ---------------------------------------------------------------- timing
def timed(step: Callable, clock=time.perf_counter) -> float:
    start = clock()
    step()
    return clock() - start


def compare_in_process(step: Callable, trick: str, repeats: int, warmup: int, clock) -> tuple[list, list]:
    """Seconds per step with the trick and with the plain version, interleaved."""
    for _ in range(warmup):
        step()
        with plain(trick):
            step()
    with_trick, without = [], []
    for repeat in range(repeats):
        for variant in (0, 1) if repeat % 2 == 0 else (1, 0):
            if variant == 0:
                with_trick.append(timed(step, clock))
            else:
                with plain(trick):
                    without.append(timed(step, clock))
    return with_trick, without


def compare_mallopt(path: str, args, repeats: int) -> tuple[list, list]:
    """Median step time of child processes with and without ``retain_freed_memory``, alternating."""
    runs = {True: [], False: []}
    for repeat in range(repeats):
        for retain in (True, False) if repeat % 2 == 0 else (False, True):
            options = {
                "--precision": args.precision,
                "--threads": args.threads,
                "--batch": args.batch,
                "--warmup": args.warmup,
                "--child-steps": args.child_steps,
            }
            command = [sys.executable, __file__, "--child", path, *(str(x) for item in options.items() for x in item)]
            command += [] if retain else ["--no-retain"]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[retain].append(statistics.median(json.loads(out.splitlines()[-1])))
    return runs[True], runs[False]


def summary(path: str, trick: str, precision, with_trick: list, without: list) -> dict:
    savings = sorted(1 - a / b for a, b in zip(with_trick, without, strict=True))
    quartiles = statistics.quantiles(savings, n=4) if len(savings) > 1 else savings * 3
    trick_s, plain_s = statistics.median(with_trick), statistics.median(without)
    return {
        "path": path,
        "trick": trick,
        "precision": precision.name,
        "trick_s": round(trick_s, 5),
        "plain_s": round(plain_s, 5),
        "saving": round(1 - trick_s / plain_s, 3),
        "saving_quartiles": [round(q, 3) for q in quartiles],
        "saving_min_max": [round(savings[0], 3), round(savings[-1], 3)],
        "repeats": len(savings),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--paths",
        nargs="+",
        default=list(TRICKS_BY_PATH),
        choices=list(TRICKS_BY_PATH),
        help="user paths to time (default: all, see above)",
    )
    parser.add_argument(
        "--tricks",
        nargs="+",
        default=None,
        choices=[*MODEL_TRICKS, *AUGMENT_TRICKS],
        help="tricks to compare (default: every trick of each path)",
    )
    parser.add_argument("--repeats", type=int, default=12, help="interleaved pairs of steps per trick (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant first (default 3)")
    parser.add_argument("--batch", type=int, default=8, help="images per vits14 training step (default 8)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: timed in CPU seconds of the process, which other jobs on a shared "
        "machine disturb far less than wall-clock time; 0: torch's default, timed by the wall clock)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="compute precision (default auto, as the trainer: bf16 on a CPU with fast bf16, else fp32)",
    )
    parser.add_argument("--mallopt-repeats", type=int, default=3, help="child processes per variant (default 3)")
    parser.add_argument("--child-steps", type=int, default=6, help="timed steps per child process (default 6)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--no-retain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    torch.manual_seed(0)
    random.seed(0)
    torch.set_float32_matmul_precision("high")  # as the trainer
    precision = choose_precision(args.precision, CPU)
    with tempfile.TemporaryDirectory(prefix="bench_tricks_") as workdir:
        return run(args, precision, clock, Path(workdir))


def run(args, precision, clock, workdir: Path) -> int:
    """The comparisons (or, in a child process, one variant of the mallopt comparison)."""
    if args.child:  # one variant of the mallopt comparison
        if not args.no_retain:
            retain_freed_memory()
        step = build_path(args.child, args, precision, workdir)
        for _ in range(args.warmup):
            step()
        print(json.dumps([timed(step, clock) for _ in range(args.child_steps)]))
        return 0

    print(f"# precision {precision}; {torch.get_num_threads()} threads", flush=True)
    retain_freed_memory()  # as the trainer and the feature extraction do
    for path in args.paths:
        tricks = [t for t in TRICKS_BY_PATH[path] if args.tricks is None or t in args.tricks]
        if not tricks:
            continue
        step = None
        for trick in tricks:
            if trick == "mallopt":
                with_trick, without = compare_mallopt(path, args, args.mallopt_repeats)
            else:
                step = step or build_path(path, args, precision, workdir)
                with_trick, without = compare_in_process(step, trick, args.repeats, args.warmup, clock)
            print(json.dumps(summary(path, trick, precision, with_trick, without)), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
