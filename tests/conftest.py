"""Shared test helpers (imported as ``from conftest import ...``) and fixtures."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
    from dinov2.data.synthetic_cells import generate_demo_dataset

    return generate_demo_dataset(folder, n_per_class=3, size=40, seed=0)


def read_metrics(output_dir: Path) -> list:
    return [json.loads(line) for line in (Path(output_dir) / "training_metrics.jsonl").read_text().splitlines()]


def run_train(output_dir: Path, overrides: list, extra_args=(), timeout=300, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dinov2.train.train", "--output-dir", str(output_dir), *extra_args, *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, **popen)


def run_torchrun(output_dir, overrides, script=("-m", "dinov2.train.train"), check=True):
    """The trainer (or a wrapper ``script``) on 2 gloo ranks; with ``check``, it must succeed."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *script,
        "--output-dir",
        str(output_dir),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # a script outside the repo imports dinov2
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    assert run.returncode == 0 or not check, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def random_nested(rng: random.Random, max_depth: int = 5) -> dict:
    """Unbalanced nested mapping with leaves under the root and single-child chains."""
    names = iter(range(10**6))

    def grow(depth: int) -> dict:
        children = {}
        for _ in range(rng.randint(1, 4)):
            name = f"n{next(names)}"
            roll = rng.random()
            if depth >= max_depth or roll < 0.4:
                children[name] = None
            elif roll < 0.55:
                children[name] = {f"n{next(names)}": grow(depth + 2)}  # single-child chain
            else:
                children[name] = grow(depth + 1)
        return children

    nested = grow(1)
    nested["top_leaf"] = None
    return nested


def cli_exit(main, argv: list, capsys) -> tuple:
    """Run a CLI's ``main`` in-process as its ``python -m`` entry point does (``run_cli``):
    ``(exit code, stderr with its line breaks and runs of spaces made single spaces)``."""
    from dinov2.utils.cli import run_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_cli(main, [str(arg) for arg in argv])
    return stopped.value.code, " ".join(capsys.readouterr().err.split())


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a test's gloo process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
