"""Throughput of the DINOv2 backbone on the CPU: fp32 and bf16 autocast, ours and DINOv2-style, side by side.

bf16 is timed where precision ``auto`` would use it (this CPU runs it clearly faster than fp32) or
when asked (``--precision fp32,bf16``): on CPUs without bf16 units it is ~70x slower than fp32.

For forward (no grad) and forward+backward it prints images/s of

* ``ours``: :class:`dinov2.models.vision_transformer.DinoVisionTransformer` as shipped;
* ``dinov2``: the same weights with DINOv2's attention as it runs without xformers
  (``softmax(q k^T * scale) v`` written out in every precision) - everything else in DINOv2's ViT
  (Linear, LayerNorm, GELU, LayerScale) is the same computation, so this is DINOv2's own speed
  measured under the same load,

the matmul GFLOP/s of the machine in fp32 and bf16 measured in the same run, and the model FLOP
utilisation (MFU: achieved model FLOP/s over the matmul rate of the same precision). All settings
are timed in alternation, so a busy machine slows them alike and the ratios stay meaningful.
Model FLOPs are counted analytically (2 per multiply-add; backward = 2x forward): patch embed
``2 N (C p^2) D``; per block ``2 T (4 D^2 + F) + 4 T^2 D`` (qkv + proj, the FFN's ``F``
multiply-adds per token, attention scores and values) with ``T = 1 + R + N`` tokens.

    python scripts/bench_backbone.py                 # ViT-S/14, batch 8 at 224
    python scripts/bench_backbone.py --arch vit_test --iters 3
"""

import argparse
import copy
import json
import statistics
import time
import types
from collections.abc import Callable, Sequence

import torch

from dinov2.errors import ConfigError
from dinov2.layers import Attention
from dinov2.models import build_backbone
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.utils.cli import run_cli
from dinov2.utils.precision import DTYPES, choose_precision


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


def dinov2_attention(self: Attention, x: torch.Tensor, attn_bias=None) -> torch.Tensor:
    """DINOv2's attention without xformers, for the baseline."""
    batch, tokens, dim = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
    weights = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


def dinov2_style(model: DinoVisionTransformer) -> DinoVisionTransformer:
    baseline = copy.deepcopy(model)
    for block in baseline.blocks:
        block.attn.forward = types.MethodType(dinov2_attention, block.attn)
    return baseline


def median_seconds(steps: Sequence[Callable[[], None]], iters: int, warmup: int) -> list[float]:
    """Median wall time of each step; the steps alternate so that they share the machine's load."""
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(iters):
        for step, spent in zip(steps, times):
            start = time.perf_counter()
            step()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def matmul_gflops(precisions: Sequence[str], size: int = 2048, iters: int = 5) -> dict[str, float]:
    """Measured ``torch.mm`` rate of a ``size`` square product in each precision."""
    operands = {
        name: (torch.randn(size, size, dtype=DTYPES[name]), torch.randn(size, size, dtype=DTYPES[name]))
        for name in precisions
    }
    steps = [lambda a=a, b=b: torch.mm(a, b) for a, b in operands.values()]
    seconds = median_seconds(steps, iters, warmup=2)
    return {name: 2 * size**3 / s / 1e9 for name, s in zip(operands, seconds)}


def make_step(model: DinoVisionTransformer, images: torch.Tensor, backward: bool, precision: str) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if not backward:
                with torch.no_grad():
                    model.forward_features(images)  # every token, as DINOv2's forward computes
                return
            model.zero_grad(set_to_none=True)
            out = model.forward_features(images)
            loss = out["x_norm_clstoken"].float().sum() + out["x_norm_patchtokens"].float().mean()
        loss.backward()

    return step


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small", help="backbone arch (default: vit_small, i.e. ViT-S/14)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--image-size", type=int, default=224, help="square input size in pixels (default: 224)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per setting; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per setting before timing (default: 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: leave as is)")
    parser.add_argument(
        "--precision",
        default="auto",
        help="precisions to time, comma-separated (fp32,bf16); auto (default): fp32, and bf16 where precision "
        "auto would choose it on this CPU",
    )
    args = parser.parse_args(argv)
    if args.precision == "auto":
        chosen = choose_precision("auto", torch.device("cpu"))
        precisions = ["fp32"] + (["bf16"] if chosen.name == "bf16" else [])
        print(f"precision auto: {chosen}")
    else:
        precisions = args.precision.split(",")
        if not set(precisions) <= {"fp32", "bf16"}:
            raise ConfigError(f"--precision takes auto or a list of fp32 and bf16, got {args.precision!r}")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours = build_backbone(args.arch, img_size=args.image_size)
    models = {"ours": ours, "dinov2": dinov2_style(ours)}
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    flops_per_image = model_flops(ours, args.image_size)
    print(
        f"{args.arch} batch {args.batch_size} at {args.image_size}px, {torch.get_num_threads()} threads, "
        f"{flops_per_image / 1e9:.2f} GFLOP/image forward"
    )
    peak = matmul_gflops(precisions)

    rows = []
    for pass_name, backward in (("fwd", False), ("fwd+bwd", True)):
        settings = [(name, precision) for precision in precisions for name in models]
        for model in models.values():
            model.train(backward)
        steps = [make_step(models[name], images, backward, precision) for name, precision in settings]
        for (name, precision), spent in zip(settings, median_seconds(steps, args.iters, args.warmup)):
            images_per_s = args.batch_size / spent
            mfu = images_per_s * flops_per_image * (3 if backward else 1) / (peak[precision] * 1e9)
            rows.append(
                {
                    "arch": args.arch,
                    "model": name,
                    "pass": pass_name,
                    "precision": precision,
                    "images_per_s": round(images_per_s, 2),
                    "mfu": round(mfu, 3),
                }
            )
    print("matmul GFLOP/s measured in this run: " + ", ".join(f"{p} {peak[p]:.0f}" for p in precisions))
    by_key = {(r["model"], r["pass"], r["precision"]): r for r in rows}
    print(f"{'pass':<8} {'precision':<9} {'ours img/s':>10} {'dinov2 img/s':>12} {'ours/dinov2':>11} {'MFU ours':>9}")
    for pass_name in ("fwd", "fwd+bwd"):
        for precision in precisions:
            mine, theirs = by_key["ours", pass_name, precision], by_key["dinov2", pass_name, precision]
            print(
                f"{pass_name:<8} {precision:<9} {mine['images_per_s']:>10.1f} {theirs['images_per_s']:>12.1f} "
                f"{mine['images_per_s'] / theirs['images_per_s']:>11.2f} {mine['mfu']:>9.1%}"
            )
    for pass_name in ("fwd", "fwd+bwd") if len(precisions) == 2 else ():
        fp32, bf16 = by_key["ours", pass_name, "fp32"], by_key["ours", pass_name, "bf16"]
        print(f"ours {pass_name}: bf16 autocast / fp32 = {bf16['images_per_s'] / fp32['images_per_s']:.2f}")
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    run_cli(main)
