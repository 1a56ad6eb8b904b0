"""Process-group set-up: which GPU a rank takes, and the collective timeout setting."""

import os
import socket
import time

import pytest
import torch
from conftest import run_train, tiny_overrides

from dinov2 import distributed


@pytest.fixture
def fake_gpus(monkeypatch):
    """``count`` visible CUDA devices; returns the list of devices set_device was called with."""
    chosen = []

    def install(count):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        return chosen

    return install


@pytest.mark.parametrize("setting", ["cuda", "auto"])
def test_one_visible_gpu_per_task_gives_every_rank_cuda_0(fake_gpus, setting):
    """--gpus-per-task=1 / per-task cgroups: local rank 3 sees one device, its cuda:0."""
    chosen = fake_gpus(1)
    assert distributed.select_device(setting, local_rank=3) == torch.device("cuda", 0)
    assert chosen == [0]


def test_all_node_gpus_visible_gives_the_local_rank(fake_gpus):
    chosen = fake_gpus(4)
    assert [distributed.select_device("cuda", rank).index for rank in range(4)] == [0, 1, 2, 3]
    assert chosen == [0, 1, 2, 3]
    assert distributed.select_device("cuda", 6) == torch.device("cuda", 2)  # 2 tasks x 4 GPUs: modulo


def test_cpu_ignores_the_local_rank(fake_gpus):
    chosen = fake_gpus(2)
    assert distributed.select_device("cpu", 5) == torch.device("cpu") and chosen == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_rank_whose_peers_never_come_fails_after_collective_timeout_s(tmp_path):
    """Rank 0 of 2 with rank 1 never started: exit 2 after ~train.collective_timeout_s, not torch's 10 min."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(_free_port())
    overrides = tiny_overrides(tmp_path / "unused.csv", **{"train.collective_timeout_s": 3, "train.device": "cpu"})
    start = time.monotonic()
    done = run_train(tmp_path / "out", overrides, timeout=120, env=env)
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-3000:]
    assert "rank 0 of 2" in done.stderr and "train.collective_timeout_s=3" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert elapsed < 60, elapsed
