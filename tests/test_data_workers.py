"""One worker budget per rank, from the CPUs the task has, split over the two loaders."""

import random

import pytest
from conftest import make_demo_data, tiny_overrides

from dinov2.config.custom_hier import get_tree
from dinov2.errors import ConfigError
from dinov2.train.data import available_cpus, build_loaders, split_workers, worker_budget
from dinov2.utils.config import load_config


@pytest.mark.parametrize(
    "environ, affinity, cpus, source",
    [
        ({"SLURM_CPUS_PER_TASK": "8"}, 64, 8, "SLURM_CPUS_PER_TASK=8"),  # SLURM without CPU binding
        ({"SLURM_CPUS_PER_TASK": "8"}, 6, 6, "affinity"),  # a tighter binding wins
        ({}, 12, 12, "affinity"),
        ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4"}, 32, 8, "shared by 4 torchrun"),
        ({"LOCAL_WORLD_SIZE": "4"}, 8, 8, "affinity"),  # submitit tasks: one allotment each
        ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4"}, 2, 1, "shared"),
    ],
)
def test_available_cpus(environ, affinity, cpus, source):
    found, why = available_cpus(environ, affinity)
    assert found == cpus and source in why


def test_auto_budget_leaves_one_cpu_to_the_training_loop():
    assert worker_budget("auto", {"SLURM_CPUS_PER_TASK": "8"}, 128)[0] == 7
    assert worker_budget("auto", {}, 1)[0] == 0
    assert worker_budget(5, {"SLURM_CPUS_PER_TASK": "2"}, 2) == (5, "train.num_workers")


@pytest.mark.parametrize("setting", [-1, "many", True, 2.5])
def test_a_bad_setting_is_refused(setting):
    with pytest.raises(ConfigError, match="train.num_workers must be auto or a number"):
        worker_budget(setting)


def test_split_follows_the_crop_pixels_and_always_sums_to_the_budget():
    paper = [64 * (2 * 224**2 + 1 * 98**2), 64 * 224**2]  # hier_vitl14: 2 x 224 + 1 x 98 | 1 x 224
    assert split_workers(7, paper) == [5, 2]
    assert split_workers(1, paper) == [1, 0] and split_workers(0, paper) == [0, 0]
    assert split_workers(2, [100, 1]) == [1, 1]
    rng = random.Random(0)
    for _ in range(500):
        weights = [rng.uniform(0.01, 10) for _ in range(rng.randint(1, 3))]
        budget = rng.randint(0, 40)
        counts = split_workers(budget, weights)
        assert sum(counts) == budget and min(counts) >= (1 if budget >= len(weights) else 0)


def test_paper_config_on_cpus_per_task_8_runs_7_workers_per_rank():
    cfg = load_config("hier_vitl14")
    budget, _ = worker_budget(cfg.train.num_workers, {"SLURM_CPUS_PER_TASK": "8"}, affinity=32)
    assert budget == 7  # x 4 ranks = 28 on a 32-core node (was 4 x 2 x 10 = 80)


def test_the_loaders_get_the_split(tmp_path):
    manifest = make_demo_data(tmp_path / "data")
    cfg = load_config("demo", tiny_overrides(manifest, **{"train.num_workers": 3}))
    loaders = build_loaders(cfg, get_tree(cfg.supervised.hierarchy), 0, 0, 1)
    try:
        assert loaders.workers == (2, 1)
        assert (loaders.unsupervised._num_workers, loaders.supervised._num_workers) == (2, 1)
    finally:
        loaders.unsupervised._shutdown_workers()
        loaders.supervised._shutdown_workers()
