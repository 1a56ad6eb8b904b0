"""Shared pieces of the trainer tests (a tiny config and demo data), plus config-system tests."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dinov2.errors import ConfigError
from dinov2.utils.config import load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(manifest, **extra) -> list:
    """A few-second CPU run: 2-block ViT on 32 px crops, small heads, batch 4."""
    values = {
        "student.arch": "vit_test",
        "student.patch_size": 8,
        "student.drop_path_rate": 0.0,
        "dino.head_n_prototypes": 64,
        "dino.head_hidden_dim": 32,
        "dino.head_bottleneck_dim": 16,
        "ibot.head_n_prototypes": 64,
        "ibot.head_hidden_dim": 32,
        "ibot.head_bottleneck_dim": 16,
        "ibot.separate_head": True,
        "dino.koleo_loss_weight": 0.1,
        "crops.global_crops_size": 32,
        "crops.local_crops_size": 16,
        "crops.local_crops_number": 2,
        "train.dataset_path_unsup": f"[{manifest}]",
        "train.batch_size_per_gpu": 4,
        "train.num_workers": 0,
        "train.OFFICIAL_EPOCH_LENGTH": 4,
        "train.centering": "sinkhorn_knopp",
        "train.log_period": 1,
        "train.progress_bar": False,
        "train.eval_period_iterations": 0,
        "optim.epochs": 3,
        "optim.warmup_epochs": 1,
        "optim.base_lr": 0.05,
        "teacher.warmup_teacher_temp_epochs": 1,
        "teacher.momentum_teacher": 0.9,
        "compute_precision.dtype": "fp32",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def make_demo_data(folder: Path) -> Path:
    from dinov2.data.demo import generate_demo_dataset

    return generate_demo_dataset(folder, n_per_class=3, size=40, seed=0)


def read_metrics(output_dir: Path) -> list:
    return [json.loads(line) for line in (Path(output_dir) / "training_metrics.jsonl").read_text().splitlines()]


def run_train(output_dir: Path, overrides: list, extra_args=(), timeout=300, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dinov2.train.train", "--output-dir", str(output_dir), *extra_args, *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, **popen)


# ---------------------------------------------------------------- config system


def test_config_layers_defaults_run_yaml_and_overrides():
    cfg = load_config(str(REPO / "configs/train/demo.yaml"), ["optim.base_lr=0.01", "crops.local_crops_number=3"])
    assert cfg.optim.base_lr == 0.01  # override beats the run YAML
    assert cfg.crops.local_crops_number == 3
    assert cfg.student.embed_dim == 64  # from the run YAML
    assert cfg.optim.adamw_beta2 == 0.999  # from the defaults


def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="optim.base_lrr"):
        load_config(None, ["optim.base_lrr=0.1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.base_lr"])


def test_paper_config_matches_paper_settings():
    cfg = load_config(str(REPO / "configs/train/hier_vitl14.yaml"))
    assert (cfg.student.arch, cfg.student.patch_size, cfg.student.drop_path_rate) == ("vit_large", 14, 0.4)
    assert cfg.student.pretrained_weights == "dinobloom_l"
    assert (cfg.crops.global_crops_size, cfg.crops.local_crops_number, cfg.crops.local_crops_size) == (224, 1, 98)
    assert list(cfg.crops.global_crops_scale) == [0.32, 1.0] and list(cfg.crops.local_crops_scale) == [0.05, 0.32]
    assert (cfg.dino.head_n_prototypes, cfg.dino.head_bottleneck_dim, cfg.dino.head_hidden_dim) == (65536, 384, 2048)
    assert cfg.dino.koleo_loss_weight == 0 and cfg.ibot.separate_head and cfg.ibot.mask_sample_probability == 0.5
    assert cfg.train.centering == "sinkhorn_knopp"
    assert (cfg.teacher.momentum_teacher, cfg.teacher.warmup_teacher_temp, cfg.teacher.teacher_temp) == (
        0.994,
        0.04,
        0.07,
    )
    assert (cfg.optim.base_lr, cfg.optim.scaling_rule, cfg.optim.warmup_epochs) == (2e-4, "sqrt_wrt_1024", 20)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.patch_embed_lr_mult) == (0.04, 0.2, 0.2)
    assert (cfg.optim.epochs, cfg.train.OFFICIAL_EPOCH_LENGTH, cfg.train.batch_size_per_gpu) == (200, 500, 64)
    assert (cfg.supervised.loss, cfg.supervised.alpha, cfg.supervised.hierarchy) == ("hce", 0.5, "v1")
    assert cfg.compute_precision.dtype == "fp16" and cfg.train.eval_period_iterations == 1000
    assert math.isclose(cfg.optim.min_lr, 1e-6)
