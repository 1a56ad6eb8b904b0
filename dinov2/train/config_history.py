"""A run's config across resumes: what may change when a run is resumed, and the record of each start.

Resuming into an output folder compares the run's config with the one saved in the checkpoint:

* the data set and the model (:data:`DATA_AND_MODEL`) may not change: another experiment belongs in
  another output folder (or ``--no-resume`` starts over);
* where and how the run executes (:data:`OPERATIONAL`: workers, device, precision, logging and
  checkpoint periods, ``train.max_iters``; the per-GPU batch sizes while the global batch stays the
  same) may change freely;
* everything else (schedule length, learning rate, loss weights, crops, seed, ...) changes the
  experiment: refused unless the user asks for it (``--resume-with-changes``).

Each start writes ``OUT/config.yaml`` (the config in force) and adds
``OUT/config_history/<n>_step<start step>.yaml``, headed by the changes against the previous start.
"""

import os
import time
from pathlib import Path

from omegaconf import OmegaConf

from dinov2.errors import ConfigError
from dinov2.utils.config import dotted_keys
from dinov2.utils.io import atomic_write

DATA_AND_MODEL = (
    "train.dataset_path_unsup",
    "train.dataset_path_sup",
    "train.split",
    "supervised.hierarchy",
    "student.arch",
    "student.embed_dim",
    "student.depth",
    "student.num_heads",
    "student.patch_size",
    "student.ffn_layer",
    "student.qkv_bias",
    "student.proj_bias",
    "student.ffn_bias",
    "student.num_register_tokens",
    "student.pretrained_weights",
    "dino.head_n_prototypes",
    "dino.head_bottleneck_dim",
    "dino.head_nlayers",
    "dino.head_hidden_dim",
    "ibot.separate_head",
    "ibot.head_n_prototypes",
    "ibot.head_bottleneck_dim",
    "ibot.head_nlayers",
    "ibot.head_hidden_dim",
    "supervised.projection_dim",
    "supervised.projection_hidden_dim",
)
OPERATIONAL = (
    "train.num_workers",
    "train.device",
    "train.progress_bar",
    "train.log_period",
    "train.saveckp_freq",
    "train.checkpoint_every_iters",
    "train.keep_checkpoints",
    "train.eval_period_iterations",
    "train.keep_exports",
    "train.eval_manifest",
    "train.logger",
    "train.max_iters",
    "compute_precision.dtype",
    "compute_precision.reduce_dtype",
    "compute_precision.fsdp",
    "compute_precision.reshard_after_forward",
)
_MANIFEST_KEYS = ("train.dataset_path_unsup", "train.dataset_path_sup")
_BATCH_KEYS = ("train.batch_size_per_gpu", "supervised.batch_size_per_gpu")


def _comparable(flat: dict, world_size: int) -> dict:
    """Manifest paths resolved; per-GPU batch sizes as global batches (per GPU x world size)."""
    flat = dict(flat)
    for key in _MANIFEST_KEYS:
        paths = flat.get(key) or []
        flat[key] = sorted(os.path.realpath(p) for p in ([paths] if isinstance(paths, str) else paths))
    per_gpu = flat.get("train.batch_size_per_gpu")
    supervised = flat.get("supervised.batch_size_per_gpu") or per_gpu
    for key, value in zip(_BATCH_KEYS, (per_gpu, supervised)):
        flat[key] = value * world_size if isinstance(value, int) else value
    return flat


def config_changes(saved: dict, current: dict, saved_world_size: int = 1, world_size: int = 1) -> dict:
    """``{key: (saved value, current value)}`` for every setting that differs, as written and in
    effect: manifest paths compared as resolved files, per-GPU batch sizes as global batches."""
    old, new = dotted_keys(saved), dotted_keys(current)
    old_effect, new_effect = _comparable(old, saved_world_size), _comparable(new, world_size)
    return {
        key: (old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and old_effect.get(key) != new_effect.get(key)
    }


def describe(changes: dict) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


def check_resume(changes: dict, checkpoint: Path, allow_changes: bool) -> dict:
    """Refuse (ConfigError) a changed data set or model, and other experiment changes unless
    ``allow_changes``; returns the changes that are accepted."""
    refused = {key: change for key, change in changes.items() if key in DATA_AND_MODEL}
    if refused:
        raise ConfigError(
            f"{checkpoint.parent} holds a run of another data set or model: {describe(refused)} "
            f"(checkpoint {checkpoint.name} vs this config). Use another --output-dir, or --no-resume to "
            "delete its checkpoints and start over"
        )
    experiment = {key: change for key, change in changes.items() if key not in OPERATIONAL}
    if experiment and not allow_changes:
        raise ConfigError(
            f"resuming {checkpoint} with a changed config: {describe(experiment)}. Pass "
            "--resume-with-changes to continue this run with them (recorded in config_history/), "
            "or use another --output-dir"
        )
    return changes


def record_config(output_dir: Path, config: dict, start_step: int) -> Path:
    """Write ``config.yaml`` and add this start to ``config_history/`` (see the module docstring)."""
    output_dir = Path(output_dir)
    history = output_dir / "config_history"
    previous = sorted(history.glob("*_step*.yaml")) if history.is_dir() else []
    header = [f"# run start {len(previous) + 1} at step {start_step}, {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    if previous:
        changes = config_changes(OmegaConf.to_container(OmegaConf.load(previous[-1])), config)
        header.append(f"# changes against {previous[-1].name}: {describe(changes) or 'none'}")
    text = OmegaConf.to_yaml(OmegaConf.create(config))
    path = history / f"{len(previous) + 1:03d}_step{start_step:07d}.yaml"
    for target, content in ((path, "\n".join(header) + "\n" + text), (output_dir / "config.yaml", text)):
        with atomic_write(target, "w") as handle:
            handle.write(content)
    return path
