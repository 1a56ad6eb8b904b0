"""One-GPU check of the cluster path: run it first on any GPU machine; it writes JSON lines.

    python scripts/gpu_check.py --out gpu_check.jsonl            # a CUDA machine, ~5 minutes
    python scripts/gpu_check.py --cpu-smoke --work-dir /tmp/gc   # the same code paths in miniature (make test)

Sections, each one JSON line (``"section"``, ``"ok"``, its numbers; a section that fails records its
error and the next one runs):

* ``environment``: Python, torch, CUDA, cuDNN, NCCL, the GPU, bf16 support, measured bf16 / fp16
  matmul peaks, the vendor's dense bf16 peak, what xformers does (``student.attention: auto``), packages;
* ``parity``: CPU vs CUDA, fp32 (TF32 off): every loss term (DINO global + local with Sinkhorn, iBOT,
  KoLeo, HCE) through the real ``SSLMetaArch`` with the paper's heads on a ViT-S, and a ViT-L/14
  forward (and its bf16-autocast forward against the fp32 CPU one, by cosine);
* ``step``: the paper's ViT-L/14 step (2 x 224 + 1 x 98 crops, batch B + B supervised, Sinkhorn,
  HCE, clipping, fused AdamW, EMA) in bf16 and in fp16 with a loss scaler, for B in 64 / 96 / 128:
  ms/step, images/s, MFU against the measured and the vendor peak, peak GPU memory;
* ``train`` (2 lines): the real trainer, ``torchrun --nproc_per_node=1 -m dinov2.train.train`` with
  ``hier_vitl14.yaml`` (no start weights) on generated cells, FSDP2 over NCCL with one process: 30
  iterations, a checkpoint and an export at 20, then a resumed run to 40;
* ``eval``: ``python -m dinov2.eval.eval_hier --device cuda`` on the exported model, the extraction
  rate (files -> features, and the backbone alone), and the CPU (fp32) vs GPU (bf16) feature cosine.

Floors (issue 15): the step at >= 40 % of the vendor's dense bf16 peak, extraction >= 1,500 images/s
for ViT-L/14 at 224, GPU memory at batch 64 under 80 GB; each is reported as ``floor_ok``.

On a machine without network, install what torch lacks from wheels made beforehand
(``make gpu-wheels``, README): ``pip install --no-index --find-links wheels -r requirements.txt``.
"""

import argparse
import contextlib
import copy
import importlib.metadata
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dinov2.config.custom_hier import get_tree
from dinov2.data.manifest import read_manifests
from dinov2.data.synthetic_cells import generate_demo_dataset
from dinov2.data.transforms import make_eval_transform
from dinov2.eval.features import extract_features
from dinov2.layers.attention import XFORMERS_IMPORT_ERROR, set_attention, xformers_problem
from dinov2.models import build_backbone
from dinov2.models.model_file import load_model_file
from dinov2.train.data import multi_crop_collate, to_device
from dinov2.train.train import build_grad_scaler, build_model, build_optimizer, step_flops, train_step
from dinov2.utils.config import load_config
from dinov2.utils.flops import measure_matmul_flops
from dinov2.utils.precision import Precision

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = "hier_vitl14"
FLOORS = {"mfu_vendor": 0.40, "extraction_images_per_s": 1500.0, "memory_gb_at_64": 80.0}
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; first match of the name wins.
VENDOR_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
)
SMALL_HEAD = {"n_prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16}
PACKAGES = ("torchvision", "xformers", "numpy", "omegaconf", "submitit", "pandas", "scikit-learn", "scipy", "pillow")


@dataclass
class Plan:
    """What the check runs: the full sizes on a GPU, miniatures in ``--cpu-smoke``."""

    device: torch.device
    smoke: bool
    model_overrides: list = field(default_factory=list)  # on top of hier_vitl14.yaml, for every section
    parity_arch: str = "vit_small"
    vit_arch: str = "vit_large"
    image_size: int = 224
    batches: tuple = (64, 96, 128)
    precisions: tuple = ("bf16", "fp16")
    warmup_steps: int = 3
    timed_steps: int = 10
    parity_batch: int = 4
    train_iters: tuple = (30, 20, 40)  # first run, checkpoint + export at, resumed run to
    data_per_class: int = 24
    data_size: int = 96
    eval_batch: int = 128
    cosine_images: int = 16


def make_plan(args) -> Plan:
    if not args.cpu_smoke:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-smoke for the CPU miniature")
        return Plan(torch.device("cuda", torch.cuda.current_device()), smoke=False)
    tiny = "student.arch=vit_test student.patch_size=8 crops.global_crops_size=32 crops.local_crops_size=16".split()
    tiny += [f"{head}.head_{key}={value}" for head in ("dino", "ibot") for key, value in SMALL_HEAD.items()]
    return Plan(
        torch.device("cpu"),
        smoke=True,
        model_overrides=[*tiny, "train.batch_size_per_gpu=4"],
        parity_arch="vit_test",
        vit_arch="vit_test",
        image_size=32,
        batches=(4,),
        precisions=("fp32",),
        warmup_steps=1,
        timed_steps=2,
        parity_batch=2,
        train_iters=(6, 4, 8),
        data_per_class=2,
        data_size=40,
        eval_batch=8,
        cosine_images=4,
    )


# ---------------------------------------------------------------------------------------------
# The training-step API. Everything that calls SSLMetaArch directly is in these three functions
# (update them, and nothing else, when that API changes; the trainer's own functions used here are
# build_model, build_optimizer, build_grad_scaler, step_flops and train_step from dinov2.train.train).


def build_meta_arch(cfg, device: torch.device):
    """The trainer's model (``SSLMetaArch``), created on ``device`` as the trainer does (random start)."""
    tree, precision = get_tree(cfg.supervised.hierarchy), Precision("fp32", "unsharded: unused")
    model, _ = build_model(cfg, tree, device, 1, precision, load_pretrained=False)
    return model


def loss_terms(model, batch: dict, supervised: tuple) -> dict:
    """``{term: value}`` of one step's forward (float, detached)."""
    _, terms = model.forward_losses(batch, supervised, teacher_temp=0.07)
    return {name: float(value) for name, value in terms.items()}


def training_step(model, optimizer, scaler, precision: Precision, batch: dict, supervised: tuple) -> torch.Tensor:
    """One full step of the trainer (its ``train_step``): losses and their finiteness check, backward
    (scaled in fp16), gradient clipping, fused AdamW, EMA."""
    hyper = dict(step=0, lr=1e-5, wd=0.04, momentum=0.994, teacher_temp=0.07, clip_grad=3.0, frozen=False)
    loss, _, _ = train_step(
        model, optimizer, scaler, precision, batch["collated_global_crops"].device, batch, supervised, hyper
    )
    return loss.detach()


# ---------------------------------------------------------------------------------------------


class Report:
    """JSON lines to stdout and to ``path``."""

    def __init__(self, path: Path | None):
        self.path = path
        self.failed = []
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def emit(self, record: dict) -> None:
        line = json.dumps(record, default=str)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as handle:
                handle.write(line + "\n")

    def section(self, name: str, function, *args) -> None:
        """Run a section; an exception becomes a record with ``ok: false`` and the traceback's tail."""
        start = time.perf_counter()
        try:
            for record in function(*args):
                record = {"section": name, **record}
                record.setdefault("ok", True)
                record["seconds"] = round(time.perf_counter() - start, 1)
                if not record["ok"]:
                    self.failed.append(name)
                self.emit(record)
        except Exception as error:
            self.failed.append(name)
            lines = traceback.format_exc().strip().splitlines()
            self.emit(
                {
                    "section": name,
                    "ok": False,
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": lines[-25:],
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config(plan: Plan, *overrides: str):
    return load_config(PAPER_CONFIG, ["student.pretrained_weights=null", *plan.model_overrides, *overrides])


def synthetic_batch(cfg, batch_size: int, seed: int) -> tuple:
    """A collated multi-crop batch and a supervised batch (on the CPU) in the trainer's format."""
    generator = torch.Generator().manual_seed(seed)
    random.seed(seed)  # the iBOT masks
    g, loc, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    samples = [
        (
            {
                "global_crops": [torch.randn(3, g, g, generator=generator) for _ in range(2)],
                "local_crops": [torch.randn(3, loc, loc, generator=generator) for _ in range(n_local)],
            },
            None,
        )
        for _ in range(batch_size)
    ]
    batch = multi_crop_collate(cfg)(samples)
    leaves = len(get_tree(cfg.supervised.hierarchy).leaves)
    supervised = (torch.randn(batch_size, 3, g, g, generator=generator), torch.randint(0, leaves, (batch_size,)))
    return batch, supervised


def vendor_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in VENDOR_BF16_TFLOPS if key in name), None)


def gigabytes(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


# ---------------------------------------------------------------------------------------------
# sections


def environment(plan: Plan):
    device = plan.device
    record = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "packages": {},
    }
    for name in PACKAGES:
        try:
            record["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            record["packages"][name] = None
    size = 1024 if plan.smoke else 8192
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        record.update(
            gpu=torch.cuda.get_device_name(device),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            gpu_memory_gb=gigabytes(properties.total_memory),
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, np.atleast_1d(torch.cuda.nccl.version()))),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        for dtype in (torch.bfloat16, torch.float16):
            problem = xformers_problem(device, dtype)
            record[f"xformers_{str(dtype).removeprefix('torch.')}"] = problem or "works"
    else:
        record["xformers"] = XFORMERS_IMPORT_ERROR or "importable (CUDA only)"
    # the CPU miniature measures fp32 only: bf16 runs ~70x slower than fp32 on CPUs without bf16 units
    dtypes = (
        (("bf16", torch.bfloat16), ("fp16", torch.float16)) if device.type == "cuda" else (("fp32", torch.float32),)
    )
    for name, dtype in dtypes:
        record[f"matmul_{name}_tflops"] = round(measure_matmul_flops(device, dtype, size=size, repeats=10) / 1e12, 3)
    peak = vendor_peak(device)
    record["vendor_bf16_dense_tflops"] = peak / 1e12 if peak else None
    yield record


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions without TF32, for parity."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1)


def parity(plan: Plan):
    """CPU vs ``plan.device``: the loss terms (every term on) and a ViT forward."""
    device = plan.device
    overrides = [f"student.arch={plan.parity_arch}", "student.drop_path_rate=0.0"]
    overrides += ["dino.koleo_loss_weight=0.1", "dino.local_loss=true", "student.attention=sdpa"]
    cfg = config(plan, *overrides)
    torch.manual_seed(0)
    reference = build_meta_arch(cfg, torch.device("cpu"))
    model = copy.deepcopy(reference).to(device)
    batch, supervised = synthetic_batch(cfg, plan.parity_batch, seed=1)
    with exact_fp32(), torch.no_grad():
        expected = loss_terms(reference, batch, supervised)
        got = loss_terms(model, to_device(batch, device), to_device(supervised, device))
    relative = {name: abs(got[name] - value) / max(abs(value), 1e-6) for name, value in expected.items()}
    yield {
        "what": "loss terms, fp32",
        "arch": cfg.student.arch,
        "centering": cfg.train.centering,
        "reference_cpu": expected,
        "on_device": got,
        "relative_difference": relative,
        "ok": set(got) == set(expected) and max(relative.values()) < 2e-3,
    }
    del reference, model

    torch.manual_seed(0)
    # LayerScale 0.1 rather than the training start's 1e-5, so that every block changes the tokens
    backbone = build_backbone(plan.vit_arch, img_size=plan.image_size, patch_size=14 if not plan.smoke else 8)
    backbone = set_attention(backbone, "auto")
    for name, param in backbone.named_parameters():
        if name.endswith(".gamma"):
            param.data.fill_(0.1)
    backbone.eval()
    images = torch.randn(4, 3, plan.image_size, plan.image_size, generator=torch.Generator().manual_seed(2))
    on_device = copy.deepcopy(backbone).to(device)
    with exact_fp32(), torch.inference_mode():
        cpu_out = backbone.forward_features(images)
        out = on_device.forward_features(images.to(device))
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        half = on_device.forward_features(images.to(device))
    record = {"what": f"{plan.vit_arch} forward, {plan.image_size} px"}
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        record[f"{key}_max_abs_difference_fp32"] = float((out[key].cpu() - cpu_out[key]).abs().max())
        record[f"{key}_min_cosine_fp32"] = float(cosine_rows(out[key].cpu(), cpu_out[key]).min())
        record[f"{key}_min_cosine_bf16_vs_cpu_fp32"] = float(cosine_rows(half[key].cpu(), cpu_out[key]).min())
    record["ok"] = record["x_norm_clstoken_min_cosine_fp32"] > 0.9999 and (
        record["x_norm_clstoken_min_cosine_bf16_vs_cpu_fp32"] > 0.99
    )
    yield record


def paper_step(plan: Plan):
    """The paper's step at each batch size and precision."""
    device = plan.device
    cfg = config(plan)
    torch.manual_seed(0)
    model = build_meta_arch(cfg, device)
    assert all(p.device.type == device.type for p in model.parameters()), "parameters left on another device"
    optimizer = build_optimizer(model, cfg)
    measured = {}
    vendor = vendor_peak(device)
    for batch_size in plan.batches:
        batch, supervised = synthetic_batch(cfg, batch_size, seed=batch_size)
        n_masked = int(batch["n_masked_patches"].sum())
        batch, supervised = to_device(batch, device), to_device(supervised, device)
        flops = step_flops(model, cfg, batch_size, batch_size, n_masked)
        for precision in plan.precisions:
            run_precision = Precision(precision, "gpu_check")
            dtype = run_precision.dtype
            if dtype not in measured:
                measured[dtype] = measure_matmul_flops(device, dtype, size=1024 if plan.smoke else 8192, repeats=10)
            scaler = build_grad_scaler(run_precision, device)
            record = {"precision": precision, "batch": batch_size, "supervised_batch": batch_size}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                for _ in range(plan.warmup_steps):
                    loss = training_step(model, optimizer, scaler, run_precision, batch, supervised)
                synchronize(device)
                times = []
                for _ in range(plan.timed_steps):
                    start = time.perf_counter()
                    loss = training_step(model, optimizer, scaler, run_precision, batch, supervised)
                    synchronize(device)
                    times.append(time.perf_counter() - start)
            except torch.OutOfMemoryError as error:
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                record.update(ok=False, out_of_memory=str(error).splitlines()[0])
                yield record
                continue
            seconds = statistics.median(times)
            record.update(
                loss_device=str(loss.device),
                loss=float(loss),
                ms_per_step=round(1000 * seconds, 1),
                images_per_s=round(batch_size / seconds, 1),
                tflop_per_step=round(flops / 1e12, 3),
                matmul_peak_tflops=round(measured[dtype] / 1e12, 1),
                mfu_measured_peak=round(flops / seconds / measured[dtype], 3),
                mfu_vendor_peak=round(flops / seconds / vendor, 3) if vendor else None,
                ok=math.isfinite(float(loss)) and loss.device.type == device.type,
            )
            if scaler.is_enabled():
                record["loss_scale"] = scaler.get_scale()  # each halving was a skipped (cheaper) step
            if device.type == "cuda":
                record["peak_memory_allocated_gb"] = gigabytes(torch.cuda.max_memory_allocated(device))
                record["peak_memory_reserved_gb"] = gigabytes(torch.cuda.max_memory_reserved(device))
                if batch_size == 64:
                    record["floor_ok_memory"] = record["peak_memory_reserved_gb"] < FLOORS["memory_gb_at_64"]
                if vendor and precision == "bf16":
                    record["floor_ok_mfu"] = record["mfu_vendor_peak"] >= FLOORS["mfu_vendor"]
            yield record
        del batch, supervised


def _run(command: list, log: Path, timeout: float) -> tuple:
    """Run ``command`` from the repository with its output in ``log``; ``(return code, seconds, log tail)``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with open(log, "w") as handle:
        try:
            code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            code = code.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    return code, round(time.perf_counter() - start, 1), tail


def _metrics(output_dir: Path) -> list:
    path = output_dir / "training_metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trainer(plan: Plan, work: Path, logs: Path):
    """The real trainer under torchrun with one process and FSDP2, then a resumed run."""
    manifest = work / "data" / "manifest.csv"
    if not manifest.exists():
        generate_demo_dataset(work / "data", n_per_class=plan.data_per_class, size=plan.data_size, seed=0)
    output = work / "train"
    first, save_at, resumed = plan.train_iters
    overrides = [*plan.model_overrides, "student.pretrained_weights=null", f"train.dataset_path_unsup=[{manifest}]"]
    overrides += [f"train.checkpoint_every_iters={save_at}", f"train.eval_period_iterations={save_at}"]
    overrides += ["train.keep_checkpoints=2", f"train.log_period={save_at // 2}", "train.progress_bar=false"]
    overrides += ["compute_precision.fsdp=true", f"train.device={plan.device.type}"]
    if plan.smoke:
        overrides += ["compute_precision.dtype=fp32"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    command = [*launcher, "-m", "dinov2.train.train", "--config-file", PAPER_CONFIG, "--output-dir", str(output)]
    for run, iterations in (("first", first), ("resumed", resumed)):
        extra = ["--no-resume"] if run == "first" else []
        run_command = [*command, *extra, *overrides, f"train.max_iters={iterations}"]
        code, seconds, tail = _run(run_command, logs / f"train_{run}.log", timeout=600)
        metrics = [m for m in _metrics(output) if m["step"] <= iterations]
        timed = [m for m in metrics if m["step"] > save_at // 2] or metrics  # the first window has the warm-up
        checkpoints = sorted(p.name for p in output.glob("checkpoint_*.pth"))
        record = {
            "run": run,
            "exit_code": code,
            "wall_s": seconds,
            "steps_logged": [m["step"] for m in metrics],
            "checkpoints": checkpoints,
            "exports": sorted(str(p.relative_to(output / "eval")) for p in (output / "eval").rglob("*.pth")),
            "model_file": (output / "model.pth").exists(),
        }
        if timed:
            record.update(
                s_per_step=round(statistics.median(m["time_per_step"] for m in timed), 3),
                images_per_s=round(statistics.median(m["images_per_s"] for m in timed), 1),
                mfu_measured_peak=round(statistics.median(m["mfu"] for m in timed), 3),
                last_loss=metrics[-1]["loss"],
            )
        text = (output / "log.txt").read_text(errors="replace") if (output / "log.txt").exists() else ""
        ok = code == 0 and record["model_file"] and metrics and metrics[-1]["step"] == iterations
        ok = ok and all(math.isfinite(m["loss"]) for m in metrics)
        if run == "first":
            ok = ok and f"checkpoint_{save_at:07d}.pth" in checkpoints and record["exports"]
            ok = ok and "FSDP2" in text
        else:
            record["resumed_from_step"] = first if f"at step {first}" in text else None
            ok = ok and record["resumed_from_step"] == first and f"checkpoint_{resumed:07d}.pth" in checkpoints
        record["ok"] = bool(ok)
        if not ok:
            record["log_tail"] = tail
        yield record


def evaluation(plan: Plan, work: Path, logs: Path):
    """eval_hier on the device, the extraction rate, and CPU vs device features of the exported model."""
    device = plan.device
    model_path = work / "train" / "model.pth"
    manifest = work / "data" / "manifest.csv"
    out = work / f"eval_{device.type}"
    command = [sys.executable, "-m", "dinov2.eval.eval_hier", "--model", str(model_path), "--data", str(manifest)]
    command += ["--output-dir", str(out), "--device", device.type, "--folds", "2"]
    code, seconds, tail = _run(command, logs / "eval_hier.log", 600)
    record = {"what": "eval_hier CLI", "exit_code": code, "wall_s": seconds, "ok": code == 0}
    if (out / "metrics.json").exists():
        summary = json.loads((out / "metrics.json").read_text())
        record["n_samples"] = summary.get("run", {}).get("n_samples")
    if code != 0:
        record["log_tail"] = tail
    yield record

    model = load_model_file(model_path)
    transform = make_eval_transform(model.image_size, model.mean, model.std)
    paths = read_manifests([manifest])["path"].astype(str).tolist()
    timed_paths = paths * (1 if plan.smoke else max(1, math.ceil(4000 / len(paths))))  # seconds, not a blink
    workers = max(0, min(8, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2) - 1))
    rates = {}
    # the half-precision path (as extraction's autocast on this device) timed, and compared with fp32 below
    name = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    half = Precision(name, "gpu_check: the half-precision path against fp32")
    for attempt, attempt_paths in (("warm-up", paths), ("timed", timed_paths)):
        synchronize(device)
        start = time.perf_counter()
        features, _ = extract_features(
            model.backbone,
            attempt_paths,
            transform,
            batch_size=plan.eval_batch,
            num_workers=workers,
            device=device,
            precision=half,
        )
        synchronize(device)
        rates[attempt] = len(attempt_paths) / (time.perf_counter() - start)
    backbone = model.backbone.to(device).eval()
    images = torch.randn(plan.eval_batch, 3, model.image_size, model.image_size, device=device)
    with torch.inference_mode(), half.autocast(device):
        for _ in range(2):
            backbone.forward_clstoken(images)
        synchronize(device)
        start = time.perf_counter()
        repeats = 3 if plan.smoke else 20
        for _ in range(repeats):
            backbone.forward_clstoken(images)
        synchronize(device)
    backbone_rate = repeats * plan.eval_batch / (time.perf_counter() - start)
    subset = paths[: plan.cosine_images]
    on_device, _ = extract_features(model.backbone, subset, transform, batch_size=8, device=device, precision=half)
    on_cpu, _ = extract_features(model.backbone, subset, transform, batch_size=8, device=torch.device("cpu"))
    cosine = np.sum(on_device * on_cpu, 1) / (np.linalg.norm(on_device, axis=1) * np.linalg.norm(on_cpu, axis=1))
    record = {
        "what": "extraction",
        "arch": model.arch.get("arch"),
        "image_size": model.image_size,
        "images": len(timed_paths),
        "batch": plan.eval_batch,
        "workers": workers,
        "files_images_per_s": round(rates["timed"], 1),
        "backbone_images_per_s": round(backbone_rate, 1),
        "feature_dim": int(features.shape[1]),
        "cosine_device_bf16_vs_cpu_fp32_min": float(cosine.min()),
        "cosine_device_bf16_vs_cpu_fp32_mean": float(cosine.mean()),
        "ok": bool(np.isfinite(features).all() and cosine.min() > 0.99),
    }
    if not plan.smoke:
        record["floor_ok_extraction"] = backbone_rate >= FLOORS["extraction_images_per_s"]
    yield record


SECTIONS = ("environment", "parity", "step", "train", "eval")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/gpu_check.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sections: " + ", ".join(SECTIONS) + " (see the module docstring).",
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny models, few steps, gloo, on the CPU: the code paths only"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON lines to this file")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("gpu_check_work"),
        help="generated images, checkpoints (several GB on a GPU) and eval output (default ./gpu_check_work)",
    )
    parser.add_argument(
        "--logs", type=Path, default=None, help="folder for the trainer's and eval's logs (default: --work-dir)"
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)} (default all)"
    )
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    plan = make_plan(args)
    work = args.work_dir.resolve()
    logs = (args.logs or work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")  # as the trainer
    report = Report(args.out)
    runs = {
        "environment": (environment, plan),
        "parity": (parity, plan),
        "step": (paper_step, plan),
        "train": (trainer, plan, work, logs),
        "eval": (evaluation, plan, work, logs),
    }
    for name in sections:
        function, *section_args = runs[name]
        report.section(name, function, *section_args)
    report.emit({"section": "summary", "ok": not report.failed, "failed": report.failed})
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
