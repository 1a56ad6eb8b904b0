"""Benchmark one dino_hier training step against the backbone alone, side by side, on the CPU.

    python scripts/bench_train.py [--arch vit_small --batch 8 --heads default|paper --repeats 6 --warmup 4]

Full step: DINO (global + local terms) + iBOT + KoLeo + HCE on a supervised batch, backward,
gradient clipping, AdamW, teacher EMA. Heads (65,536 prototypes, hidden 2048): ``default`` the
project's default config (DINOv2's: iBOT shares the DINO head, bottleneck 256); ``paper`` the
paper's (a separate iBOT head, bottleneck 384: on a ViT-S a worst case, the heads' cost is that
of the ViT-L's). Backbone only: teacher forward on the global crops and student
forward/backward on the same crops (global, local, supervised), nothing else. Both in the precision
``--precision`` chooses (``auto``: bf16 where this CPU runs it clearly faster than fp32, else fp32),
interleaved, best of ``--repeats`` (the least disturbed by other load on a shared machine). MFU is
measured against the trainer's matmul peak for that precision. Floor: full >= 0.85 x backbone rate."""

import argparse
import random
import statistics
import time

import torch

from dinov2.config.custom_hier import get_tree
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import build_grad_scaler, build_optimizer, step_flops, train_step
from dinov2.utils.config import load_config
from dinov2.utils.cpu_memory import retain_freed_memory
from dinov2.utils.flops import matmul_peak, vit_forward_flops
from dinov2.utils.precision import SETTINGS, choose_precision

FLOOR = 0.85
HEADS = {
    "default": [],
    "paper": ["dino.head_bottleneck_dim=384", "ibot.head_bottleneck_dim=384", "ibot.separate_head=true"],
}


def make_batch(cfg, batch_size: int):
    g, loc, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    samples = [
        (
            {
                "global_crops": [torch.randn(3, g, g) for _ in range(2)],
                "local_crops": [torch.randn(3, loc, loc) for _ in range(n_local)],
            },
            None,
        )
        for _ in range(batch_size)
    ]
    grid = g // cfg.student.patch_size
    batch = collate_data_and_cast(
        samples,
        tuple(cfg.ibot.mask_ratio_min_max),
        cfg.ibot.mask_sample_probability,
        torch.float32,
        grid * grid,
        MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid),
    )
    return batch


def step_overrides(arch: str = "vit_small", prototypes: int = 65536) -> list:
    """The timed training step: 224 px global and two 98 px local crops, DINO + iBOT + KoLeo + HCE."""
    return [
        f"student.arch={arch}",
        "student.patch_size=14",
        "student.drop_path_rate=0.1",
        "crops.global_crops_size=224",
        "crops.local_crops_size=98",
        "crops.local_crops_number=2",
        "dino.local_loss=true",
        f"dino.head_n_prototypes={prototypes}",
        f"ibot.head_n_prototypes={prototypes}",
        "dino.koleo_loss_weight=0.1",
        "train.centering=sinkhorn_knopp",
        "supervised.loss=hce",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small", help="backbone (default vit_small, patch 14)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--prototypes", type=int, default=65536, help="DINO / iBOT head prototypes (default 65536)")
    parser.add_argument(
        "--heads",
        choices=sorted(HEADS),
        default="default",
        help="default: the project's (DINOv2's) DINO head, iBOT sharing it, bottleneck 256; "
        "paper: a separate iBOT head, bottleneck 384 (PAPER_SETTINGS)",
    )
    parser.add_argument("--repeats", type=int, default=6, help="timed repetitions of each variant (default 6)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="untimed steps of each variant first (default 4: the CPU heap settles in a few steps)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--freeze-blocks",
        type=int,
        default=0,
        help="also time the full step with the patch embedding and the first K blocks frozen "
        "(student.freeze_blocks=K, fine-tuning; default 0: not timed)",
    )
    parser.add_argument(
        "--precision", choices=SETTINGS, default="auto", help="compute precision (default auto, as the trainer)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)  # the masks: the same masked-patch count in every run
    retain_freed_memory()  # as the trainer does
    overrides = [
        *step_overrides(args.arch, args.prototypes),
        f"train.batch_size_per_gpu={args.batch}",
        *HEADS[args.heads],
    ]
    cfg = load_config(None, overrides)
    tree = get_tree(cfg.supervised.hierarchy)
    model = SSLMetaArch(cfg, tree)
    optimizer = build_optimizer(model, cfg)
    cpu = torch.device("cpu")
    precision = choose_precision(args.precision, cpu)
    scaler = build_grad_scaler(precision, cpu)
    hyper = {"step": 0, "lr": 1e-5, "wd": 0.04, "momentum": 0.994, "teacher_temp": 0.04, "frozen": False}
    hyper["clip_grad"] = 3.0
    batch = make_batch(cfg, args.batch)
    labels = torch.randint(0, len(tree.leaves), (args.batch,))
    supervised = (torch.randn(args.batch, 3, 224, 224), labels)
    student, teacher = model.student.backbone, model.teacher.backbone

    def full_step():
        train_step(model, optimizer, scaler, precision, cpu, batch, supervised, hyper)

    variants = {"full": full_step}
    if args.freeze_blocks:
        frozen_cfg = load_config(None, [*overrides, f"student.freeze_blocks={args.freeze_blocks}"])
        frozen_model = SSLMetaArch(frozen_cfg, tree)
        frozen_optimizer = build_optimizer(frozen_model, frozen_cfg)
        variants["frozen"] = lambda: train_step(
            frozen_model, frozen_optimizer, scaler, precision, cpu, batch, supervised, hyper
        )

    def backbone_step():
        student.zero_grad(set_to_none=True)
        with precision.autocast(cpu):
            with torch.no_grad():  # the teacher's backbone work: global crops and the labelled batch
                teacher([batch["collated_global_crops"], supervised[0]], masks=[None, None], is_training=True)
            outs = student(
                [batch["collated_global_crops"], batch["collated_local_crops"], supervised[0]],
                masks=[batch["collated_masks"], None, None],
                is_training=True,
            )
            loss = sum(o["x_norm_clstoken"].float().mean() + o["x_norm_patchtokens"].float().mean() for o in outs)
        loss.backward()

    variants["backbone"] = backbone_step
    timings = {name: [] for name in variants}
    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    peak, peak_label = matmul_peak(cpu, precision)

    n_masked = int(batch["n_masked_patches"].sum())
    full_flops = step_flops(model, cfg, args.batch, args.batch, n_masked)
    g, loc = 224, 98
    backbone_flops = vit_forward_flops(student, g, 3 * args.batch) + 3 * (
        vit_forward_flops(student, g, 2 * args.batch)
        + vit_forward_flops(student, loc, 2 * args.batch)
        + vit_forward_flops(student, g, args.batch)
    )
    full_t, backbone_t = min(timings["full"]), min(timings["backbone"])
    ratio = backbone_t / full_t
    threads = torch.get_num_threads()
    print(
        f"{args.arch}/14, batch {args.batch}: 2x224 global + 2x98 local + {args.batch}x224 supervised, "
        f"{args.prototypes} prototypes ({args.heads} heads), {n_masked} masked patches, {threads} threads"
    )
    print(f"precision {precision}; matmul peak (same run): {peak_label}")
    for name, seconds, flops in (("full step", full_t, full_flops), ("backbone only", backbone_t, backbone_flops)):
        print(
            f"{name:<15}: {seconds:.3f} s/step  ({args.batch / seconds:.2f} img/s)  {flops / 1e9:.0f} GFLOP  "
            f"MFU {flops / seconds / peak:.1%}"
        )
    print(f"full / backbone-only rate: {ratio:.3f}  (floor {FLOOR}: {'PASS' if ratio >= FLOOR else 'FAIL'})")
    median_ratio = statistics.median(timings["backbone"]) / statistics.median(timings["full"])
    print(f"(the same from the median times: {median_ratio:.3f})")
    if args.freeze_blocks:
        frozen_t = min(timings["frozen"])
        optimised = sum(p.numel() for group in frozen_optimizer.param_groups for p in group["params"])
        everything = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        print(
            f"full step, patch embedding + {args.freeze_blocks} blocks frozen: {frozen_t:.3f} s/step "
            f"(x{full_t / frozen_t:.2f} the full step's rate); optimiser state for {optimised / 1e6:.1f} M "
            f"of {everything / 1e6:.1f} M parameters"
        )
    print("timings (s):", {k: [round(v, 3) for v in vs] for k, vs in timings.items()})


if __name__ == "__main__":
    main()
