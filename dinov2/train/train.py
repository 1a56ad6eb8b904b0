"""Train a dino_hier model: DINO + iBOT + KoLeo self-supervision with a hierarchical supervised head.

    python -m dinov2.train.train --config-file dinov2/configs/train/demo.yaml --output-dir OUT [key=value ...]
    torchrun --nproc_per_node=N -m dinov2.train.train ...      # FSDP2, NCCL on GPU / gloo on CPU

Reads like nanoGPT's train.py: config, distributed set-up, model, optimizer, data, loop. The
objective lives in ``ssl_meta_arch.py``, checkpoints in ``checkpointing.py``. The run resumes
from the newest ``OUT/checkpoint_*.pth`` unless ``--no-resume``; SIGTERM / SIGUSR1 write a
checkpoint at the next step boundary and exit with code 75 (requeue me).
"""

import argparse
import contextlib
import dataclasses
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dinov2 import distributed
from dinov2.config.custom_hier import get_tree
from dinov2.errors import CheckpointError, ConfigError, TrainingError
from dinov2.fsdp import shard_model
from dinov2.layers.attention import set_attention
from dinov2.models.download_check import check_download_possible
from dinov2.models.weights import resolve
from dinov2.train.checkpointing import (
    checkpoint_precision,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    skip_damaged,
)
from dinov2.train.config_history import describe, record_config
from dinov2.train.data import build_loaders, to_device
from dinov2.train.export import export_checkpoint
from dinov2.train.periodic_export import export_for_evaluation
from dinov2.train.prototype_init import init_prototypes_from_start
from dinov2.train.ssl_meta_arch import N_GLOBAL_CROPS, SSLMetaArch
from dinov2.utils.cli import run_cli
from dinov2.utils.config import load_config
from dinov2.utils.cpu_memory import retain_freed_memory
from dinov2.utils.flops import head_forward_flops, matmul_peak, vit_forward_flops
from dinov2.utils.io import output_folder
from dinov2.utils.loggers import TrainingCurves
from dinov2.utils.logging import StepLogger, setup_logging
from dinov2.utils.param_groups import apply_schedules, build_param_groups
from dinov2.utils.precision import SETTINGS as PRECISION_SETTINGS
from dinov2.utils.precision import Precision, choose_precision, parse_dtype
from dinov2.utils.schedules import build_schedules, scaled_lr

PREEMPTED_EXIT_CODE = 75


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m dinov2.train.train", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config-file",
        default=None,
        help="run YAML merged over the defaults (dinov2/configs/ssl_default_config.yaml): "
        "a path or a packaged name (demo, hier_vitl14)",
    )
    parser.add_argument(
        "--output-dir", required=True, type=Path, help="folder for checkpoints, logs, metrics and model.pth"
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="delete existing checkpoints in OUTPUT_DIR and start over"
    )
    parser.add_argument(
        "--resume-with-changes",
        action="store_true",
        help="resume although the config changes the experiment (schedule length, learning rate, ...); "
        "the changes are recorded in OUTPUT_DIR/config_history/. A changed data set or model is always refused",
    )
    parser.add_argument(
        "opts", nargs="*", metavar="key=value", help="config overrides, e.g. train.batch_size_per_gpu=32"
    )
    return parser.parse_args(argv)


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM pre-emption); the loop checks it at step boundaries."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.raised = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        self.raised = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_flops(model, cfg, batch_size: int, sup_batch_size: int, n_masked: int) -> float:
    """Model FLOPs of one step on one rank: teacher forward + 3x student forward (fwd + bwd), the
    labelled batch in both; the last blocks output the CLS tokens and the ``n_masked`` patch tokens only."""
    backbone, head = model.student.backbone, model.student.dino_head
    ibot_head = model.student.ibot_head if model.separate_ibot_head else head
    n_global = N_GLOBAL_CROPS * batch_size
    global_crops = vit_forward_flops(
        backbone, cfg.crops.global_crops_size, n_global, last_block_rows=n_global + n_masked
    )
    heads = head_forward_flops(head, n_global) + head_forward_flops(ibot_head, n_masked)
    teacher = student = global_crops + heads
    if model.dino_local_term:
        n_local = cfg.crops.local_crops_number * batch_size
        student += vit_forward_flops(backbone, cfg.crops.local_crops_size, n_local, last_block_rows=n_local)
        student += head_forward_flops(head, n_local)
    if sup_batch_size:  # the student's CLS tokens for its loss, the teacher's for the exported head
        size = cfg.supervised.image_size or cfg.crops.global_crops_size
        supervised = vit_forward_flops(backbone, size, sup_batch_size, last_block_rows=sup_batch_size)
        student += supervised
        teacher += supervised
    return teacher + 3 * student


def build_model(cfg, tree, device, world_size, precision: Precision, load_pretrained: bool = True):
    with device:  # parameters are created (and initialised) on the device: no host copy of the model per rank
        model = SSLMetaArch(cfg, tree, load_pretrained=load_pretrained)
    model = set_attention(model, cfg.student.attention).to(device)  # buffers made from NumPy arrays
    if load_pretrained and cfg.dino.head_init == "kmeans":
        init_prototypes_from_start(model, cfg, precision, device)
    fsdp = cfg.compute_precision.fsdp
    use_fsdp = world_size > 1 if fsdp == "auto" else bool(fsdp)
    if world_size > 1 and not use_fsdp:
        raise ConfigError("several processes need compute_precision.fsdp=true (or auto)")
    if use_fsdp and not distributed.is_enabled():
        raise ConfigError("compute_precision.fsdp=true needs a process group: launch with torchrun or srun")
    if use_fsdp:
        reduce_dtype = parse_dtype(cfg.compute_precision.reduce_dtype)
        reshard = cfg.compute_precision.reshard_after_forward
        # the teacher has no backward to reshard it: keeping its parameters gathered after the
        # forward (SHARD_GRAD_OP) would only hold memory, and the EMA must write the shards
        for part, part_reshard in ((model.student, reshard), (model.teacher, True)):
            for name, module in part.items():
                blocks = list(module.blocks) if name == "backbone" else []
                shard_model(module, blocks, precision.dtype, reduce_dtype, part_reshard)
        for module in model.supervised_modules():
            shard_model(module, [], precision.dtype, reduce_dtype, reshard)
    return model, use_fsdp


def build_optimizer(model, cfg):
    groups = build_param_groups(
        model,
        "student.backbone.",
        model.student.backbone.n_blocks,
        cfg.optim.layerwise_decay,
        cfg.optim.patch_embed_lr_mult,
        cfg.supervised.head_lr_multiplier,
    )
    # fused: one kernel per parameter (on 2 CPU cores ~6x faster than the default for 65k-prototype heads)
    return torch.optim.AdamW(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), fused=True)


def build_grad_scaler(precision: Precision, device):
    """A loss scaler, enabled for fp16 only (elsewhere its calls are no-ops). Under FSDP2 the
    gradients are DTensor shards, and the scaler's overflow check over them all-reduces its flag,
    so every rank skips the same steps (FSDP1's ShardedGradScaler is not needed, and its
    [1]-shaped flag breaks fused AdamW's step)."""
    return torch.amp.GradScaler(device.type, enabled=precision.needs_loss_scaler)


def fetch_start_weights(source: str, env, device) -> None:
    """A URL or preset start is downloaded into the cache by each node's first process while the
    others wait: one download per node instead of one per GPU. A failed download stops every rank
    (instead of leaving the others waiting)."""
    if not source or Path(str(source)).exists():
        return
    check_download_possible(source)  # every rank, before the collective below: an offline node fails at once
    error = None
    if env.local_rank == 0:
        try:
            resolve(source)
        except CheckpointError as caught:
            error = caught
    if distributed.any_rank(error is not None, device):
        raise error or CheckpointError(
            f"student.pretrained_weights={source}: the download failed in another process (see its log)"
        )


def check_config(cfg) -> None:
    """Fail before building a large model on what can be checked from the config alone."""
    if not cfg.train.dataset_path_unsup:
        raise ConfigError(
            "train.dataset_path_unsup is empty: give one or more manifest CSVs, "
            "e.g. train.dataset_path_unsup=[data/manifest.csv]"
        )
    if cfg.train.centering not in ("centering", "sinkhorn_knopp"):
        raise ConfigError(f"train.centering must be centering or sinkhorn_knopp, got {cfg.train.centering!r}")
    if cfg.train.eval_manifest and not Path(cfg.train.eval_manifest).is_file():
        raise ConfigError(f"train.eval_manifest={cfg.train.eval_manifest}: no such manifest file")
    scaled_lr(cfg.optim.base_lr, 1, cfg.optim.scaling_rule)  # validates the rule name
    parse_dtype(cfg.compute_precision.reduce_dtype)
    setting = cfg.compute_precision.dtype
    if setting not in PRECISION_SETTINGS:
        raise ConfigError(f"compute_precision.dtype must be one of {', '.join(PRECISION_SETTINGS)}, got {setting!r}")


def run_precision(setting: str, device, checkpoint: Path | None) -> Precision:
    """The precision of this run: an explicit setting; with ``auto``, the precision the resumed
    checkpoint was trained in (a resume is exact only in the same precision), else the hardware's
    choice, the same on every rank (fp32 if any rank finds bf16 slow)."""
    if setting == "auto" and checkpoint is not None:
        recorded = checkpoint_precision(checkpoint)
        if recorded is not None:
            return Precision(recorded["name"], f"auto: as in {checkpoint.name}, which this run resumes")
    precision = choose_precision(setting, device)
    if setting == "auto" and distributed.any_rank(precision.name == "fp32", device) and precision.name != "fp32":
        precision = Precision("fp32", "auto: another rank's CPU runs bf16 slowly")
    return precision


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    output_dir = output_folder(args.output_dir)
    preemption = PreemptionFlag()  # before any set-up: a signal while loading still ends in a checkpoint
    env, device = distributed.enable(cfg.train.device, cfg.train.collective_timeout_s)
    if device.type == "cpu":
        retain_freed_memory()
    try:
        result = train(
            cfg, output_dir, env, device, preemption, resume=not args.no_resume, allow_changes=args.resume_with_changes
        )
    finally:
        preemption.restore()
    # only after a run that every rank finished: on an error another rank may have gone already, and
    # tearing down a gloo group with a peer that closed its side aborts the process (run_cli exits at once)
    distributed.destroy()
    return result


def train_step(
    model, optimizer, scaler, precision: Precision, device, batch, supervised_batch, hyper: dict, stop_requested=False
) -> tuple:
    """One optimisation step; ``hyper``: this step's index, lr, wd, momentum, teacher_temp, gradient
    clip, whether the DINO/iBOT heads' last layers are frozen, and the backbone's lr and whether it is
    frozen (head warm-up). Returns ``(loss, terms, stop)``:
    ``stop`` when ``stop_requested`` (a pre-emption signal) is true on any rank. Raises TrainingError
    (on every rank) when a term is not finite on any rank. Both checks share one all-reduce and one
    host read, the step's only ones besides those of the data-dependent shapes (token selection,
    HCE's label check)."""
    model.set_backbone_trainable(not hyper.get("backbone_frozen", False))
    last_layer_lr = 0.0 if hyper["frozen"] else hyper["lr"]
    apply_schedules(optimizer, hyper["lr"], hyper["wd"], last_layer_lr, hyper.get("backbone_lr"))
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast(device):
        loss, terms = model.forward_losses(batch, supervised_batch, hyper["teacher_temp"])
    not_finite = [~torch.isfinite(value.detach()) for value in terms.values()]
    *bad_anywhere, stop = distributed.any_rank_each([*not_finite, stop_requested], device)
    bad = [name for name, flag in zip(terms, bad_anywhere) if flag]
    if bad:
        raise TrainingError(
            f"loss term {', '.join(bad)} is not finite at step {hyper['step']} (on this rank: "
            f"{', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())})"
        )
    scaler.scale(loss).backward()
    if hyper["frozen"]:
        for param in model.last_layer_parameters():
            param.grad = None
    if hyper["clip_grad"]:
        scaler.unscale_(optimizer)
        for module in (*model.student.values(), *model.supervised_modules()):
            torch.nn.utils.clip_grad_norm_(module.parameters(), hyper["clip_grad"])
    scaler.step(optimizer)
    scaler.update()
    model.update_teacher(hyper["momentum"])
    return loss, terms, stop


def train(
    cfg, output_dir: Path, env, device, preemption: PreemptionFlag, resume: bool = True, allow_changes: bool = False
) -> int:
    # -------------------------------------------------------------- set-up
    check_config(cfg)
    logger = setup_logging(output_dir, env.rank)
    print(f"[rank {env.rank}/{env.world_size}] {env.source} launch on {device}", flush=True)
    torch.set_float32_matmul_precision("high")
    main_process = env.rank == 0
    tree = get_tree(cfg.supervised.hierarchy)
    seed_everything(cfg.train.seed)  # the same initial weights on every rank (FSDP keeps each rank's shard)
    checkpoints = list_checkpoints(output_dir)
    if resume and checkpoints:  # a damaged newest checkpoint: resume from the newest one that reads
        checkpoints = skip_damaged(checkpoints, set_aside=True)
    precision = run_precision(cfg.compute_precision.dtype, device, checkpoints[-1] if resume and checkpoints else None)
    start_from_weights = not (resume and checkpoints)  # a checkpoint would overwrite them
    if start_from_weights:
        fetch_start_weights(cfg.student.pretrained_weights, env, device)
    model, use_fsdp = build_model(cfg, tree, device, env.world_size, precision, load_pretrained=start_from_weights)
    seed_everything(cfg.train.seed + 1 + env.rank)  # then one random stream per rank (drop path)
    optimizer = build_optimizer(model, cfg)
    scaler = build_grad_scaler(precision, device)

    batch_size = cfg.train.batch_size_per_gpu
    global_batch = batch_size * env.world_size
    lr = scaled_lr(cfg.optim.base_lr, global_batch, cfg.optim.scaling_rule)
    schedules = build_schedules(cfg, lr)
    max_iter = cfg.train.max_iters or cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    checkpoint_every = cfg.train.checkpoint_every_iters or cfg.train.saveckp_freq * cfg.train.OFFICIAL_EPOCH_LENGTH
    run_record = {"config": OmegaConf.to_container(cfg, resolve=True), "precision": dataclasses.asdict(precision)}
    logger.info(
        "world size %d (%s), device %s%s; precision %s; global batch %d (%d per rank); "
        "lr %.3g (base %.3g per 1024, %s)",
        env.world_size,
        env.source,
        device,
        ", FSDP2" if use_fsdp else "",
        precision,
        global_batch,
        batch_size,
        lr,
        cfg.optim.base_lr,
        cfg.optim.scaling_rule,
    )
    logger.info(
        "loss terms: DINO global%s, iBOT, %sKoLeo, supervised %s x %.2f over %d leaves; centering %s",
        " + local" if model.dino_local_term else " (local-crop term off)",
        "" if cfg.dino.koleo_loss_weight else "no ",
        cfg.supervised.loss,
        cfg.supervised.loss_weight,
        len(tree.leaves),
        cfg.train.centering,
    )

    # -------------------------------------------------------------- resume
    start_step = 0
    if checkpoints and not resume:
        distributed.barrier()
        if main_process:
            for path in checkpoints:
                path.unlink()
            logger.info("--no-resume: removed %d checkpoint(s) from %s", len(checkpoints), output_dir)
        distributed.barrier()
    elif checkpoints:
        state = load_checkpoint(checkpoints[-1], model, optimizer, scaler, run_record["config"], allow_changes)
        start_step = state["step"]
        logger.info("resuming from %s at step %d", checkpoints[-1], start_step)
        if state["config_changes"]:
            logger.info("config changes against the checkpoint: %s", describe(state["config_changes"]))
    if main_process:
        record_config(output_dir, run_record["config"], start_step)
    metrics = TrainingCurves(cfg.train.logger, output_dir, run_record["config"], enabled=main_process)
    metrics.truncate_after(start_step + 1)

    if start_step >= max_iter:
        logger.info("training already finished (step %d of %d)", start_step, max_iter)
        if main_process:
            export_checkpoint(checkpoints[-1], output_dir / "model.pth")
        return 0

    # measured before the loader workers start decoding, which on a few CPU cores would halve it
    peak_flops, peak_label = matmul_peak(device, precision)
    logger.info("MFU is measured against %s on %s", peak_label, device)
    step_logger = StepLogger(
        logger,
        [metrics],
        cfg.train.log_period,
        max_iter,
        global_batch,
        peak_flops,
        peak_label,
        model.collapsed_dino_values(),
        cfg.dino.head_n_prototypes,
        env.world_size,
    )

    # -------------------------------------------------------------- data
    loaders = build_loaders(cfg, tree, start_step, env.rank, env.world_size)

    # -------------------------------------------------------------- loop
    def save(step: int) -> Path:
        return save_checkpoint(
            output_dir,
            step,
            model,
            optimizer,
            scaler,
            run_record["config"],
            cfg.train.keep_checkpoints,
            extra={"precision": run_record["precision"]},
        )

    export_every = cfg.train.eval_period_iterations
    if export_every and cfg.train.eval_manifest and start_step == 0:  # the start, the curve's first point
        evaluation = export_for_evaluation(model, cfg, output_dir, 0, env.world_size, run_record["precision"])
        if evaluation:
            metrics.write(evaluation)
    show_bar = cfg.train.progress_bar
    show_bar = main_process and (sys.stderr.isatty() if show_bar == "auto" else bool(show_bar))
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(
            tqdm(total=max_iter, initial=start_step, desc="train", unit="it", dynamic_ncols=True, disable=not show_bar)
        )
        if show_bar:
            stack.enter_context(logging_redirect_tqdm(loggers=[logger]))
        stack.callback(metrics.close)
        stop = False  # a pre-emption signal on some rank, learnt during the previous step's check
        for step in range(start_step, max_iter):
            if stop:
                save(step)
                logger.info(
                    "pre-empted at step %d, checkpoint written (%s)",
                    step,
                    preemption.raised or "signal on another rank",
                )
                return PREEMPTED_EXIT_CODE

            batch = next(loaders.unsupervised)
            n_masked = int(batch["n_masked_patches"].sum())
            batch = to_device(batch, device)
            supervised_batch = to_device(next(loaders.supervised), device) if loaders.supervised is not None else None
            hyper = {
                "step": step,
                "lr": schedules["lr"][step],
                "wd": schedules["wd"][step],
                "momentum": schedules["momentum"][step],
                "teacher_temp": schedules["teacher_temp"][step],
                "frozen": step < schedules["freeze_last_layer_iters"],
                "backbone_lr": schedules["backbone_lr"][step],
                "backbone_frozen": step < schedules["freeze_backbone_iters"],
                "clip_grad": cfg.optim.clip_grad,
            }
            try:
                stopping = preemption.raised is not None
                loss, terms, stop = train_step(
                    model, optimizer, scaler, precision, device, batch, supervised_batch, hyper, stopping
                )
            except TrainingError as error:
                kept = list_checkpoints(output_dir)
                raise TrainingError(
                    f"{error}; last good checkpoint: {kept[-1] if kept else 'none'}. "
                    "Lower optim.base_lr or check the data."
                ) from None

            done = step + 1
            bar.update(1)
            flops = step_flops(model, cfg, batch_size, loaders.supervised_batch_size, n_masked)
            schedule = {key: hyper[key] for key in ("lr", "wd", "momentum", "teacher_temp")}
            record = step_logger.step(done, loss, terms, flops, schedule)
            if record is not None:
                bar.set_postfix(loss=f"{record['loss']:.3f}")

            with step_logger.paused():
                if done % checkpoint_every == 0 or done == max_iter:
                    logger.info("checkpoint %s", save(done))
                # periodic exports; with train.eval_manifest also the last step's, the curve's end point
                final = done == max_iter and cfg.train.eval_manifest
                if export_every and (done % export_every == 0 and done < max_iter or final):
                    evaluation = export_for_evaluation(
                        model, cfg, output_dir, done, env.world_size, run_record["precision"]
                    )
                    if evaluation:
                        metrics.write(evaluation)

    if main_process:
        path = export_checkpoint(list_checkpoints(output_dir)[-1], output_dir / "model.pth")
        logger.info("training finished after %d steps; model file %s", max_iter, path)
    distributed.barrier()
    return 0


if __name__ == "__main__":
    run_cli(main)
