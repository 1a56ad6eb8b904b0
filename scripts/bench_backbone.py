"""Throughput of a DINOv2 backbone on this machine, fp32 and bf16 autocast side by side.

Prints images/s for forward (no grad) and forward+backward, the matmul GFLOP/s of the machine in
fp32 and bf16 measured in the same run, and the model FLOP utilisation (MFU): achieved model
FLOP/s over the matmul rate of the same precision. Model FLOPs are counted analytically
(2 per multiply-add; backward = 2x forward):
patch embed ``2 N (C p^2) D``; per block ``2 T (3D^2 + D^2 + 2 D H_ffn') + 4 T^2 D``
(qkv, proj, FFN with ``H_ffn'`` = total FFN matmul width, attention scores and values),
with ``T = 1 + R + N`` tokens.

    python scripts/bench_backbone.py                 # ViT-S/14, batch 8 at 224
    python scripts/bench_backbone.py --arch vit_test --iters 3
"""

import argparse
import json
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

from dinov2.models import build_backbone
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.utils.cli import run_cli


def model_flops(model: DinoVisionTransformer, image_size: int) -> float:
    """Forward FLOPs for one image (see the module docstring)."""
    dim, patch = model.embed_dim, model.patch_size
    patches = (image_size // patch) ** 2
    tokens = 1 + model.num_register_tokens + patches
    flops = 2 * patches * (model.config["in_chans"] * patch * patch) * dim
    for block in model.blocks:
        ffn_macs = sum(m.weight.numel() for m in block.mlp.modules() if isinstance(m, torch.nn.Linear))
        flops += 2 * tokens * (4 * dim * dim + ffn_macs) + 4 * tokens * tokens * dim
    return float(flops)


def median_seconds(steps: Sequence[Callable[[], None]], iters: int, warmup: int) -> list:
    """Median wall time of each step; the steps alternate so that they share the machine's load."""
    for _ in range(warmup):
        for step in steps:
            step()
    times: list = [[] for _ in steps]
    for _ in range(iters):
        for step, spent in zip(steps, times):
            start = time.perf_counter()
            step()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def matmul_gflops(size: int = 2048, iters: int = 5) -> dict:
    """Measured ``torch.mm`` rate of a ``size`` square product in fp32 and bf16."""
    operands = {name: (torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype))
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}  # fmt: skip
    steps = [lambda a=a, b=b: torch.mm(a, b) for a, b in operands.values()]
    seconds = median_seconds(steps, iters, warmup=2)
    return {name: 2 * size**3 / s / 1e9 for name, s in zip(operands, seconds)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small", help="backbone arch (default: vit_small, i.e. ViT-S/14)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--image-size", type=int, default=224, help="square input size in pixels (default: 224)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per setting; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (default: 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_backbone(args.arch, img_size=args.image_size)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    flops_per_image = model_flops(model, args.image_size)
    peak = matmul_gflops()
    print(f"{args.arch} batch {args.batch_size} at {args.image_size}px, {torch.get_num_threads()} threads, "
          f"{flops_per_image / 1e9:.2f} GFLOP/image forward")  # fmt: skip
    print(f"matmul GFLOP/s: fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f}")

    def forward() -> None:
        with torch.no_grad():
            model(images)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        out = model.forward_features(images)
        (out["x_norm_clstoken"].float().sum() + out["x_norm_patchtokens"].float().mean()).backward()

    def in_precision(step: Callable[[], None], precision: str) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                step()

        return run

    rows = []
    for pass_name, step, flop_factor in (("fwd", forward, 1), ("fwd+bwd", forward_backward, 3)):
        model.train(pass_name == "fwd+bwd")
        precisions = ("fp32", "bf16")
        seconds = median_seconds([in_precision(step, p) for p in precisions], args.iters, args.warmup)
        for precision, spent in zip(precisions, seconds):
            images_per_s = args.batch_size / spent
            mfu = images_per_s * flops_per_image * flop_factor / (peak[precision] * 1e9)
            rows.append(dict(arch=args.arch, pass_=pass_name, precision=precision, images_per_s=images_per_s, mfu=mfu))
    print(f"{'pass':<8} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16/fp32':>10} {'MFU fp32':>9} {'MFU bf16':>9}")
    for fp32, bf16 in zip(rows[0::2], rows[1::2]):
        print(f"{fp32['pass_']:<8} {fp32['images_per_s']:>11.1f} {bf16['images_per_s']:>11.1f} "
              f"{bf16['images_per_s'] / fp32['images_per_s']:>10.2f} {fp32['mfu']:>9.1%} {bf16['mfu']:>9.1%}")  # fmt: skip
    for row in rows:
        print(json.dumps({("pass" if k == "pass_" else k): v for k, v in row.items()}))
    return 0


if __name__ == "__main__":
    run_cli(main)
