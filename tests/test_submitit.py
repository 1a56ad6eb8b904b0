"""The submitit launcher without SLURM: task layout, rendezvous port, early config errors."""

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dinov2.distributed import rendezvous_port
from dinov2.errors import ConfigError
from dinov2.run.submit import add_launcher_args, make_executor, tasks_per_node
from dinov2.run.train.train import main

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(REPO / "dinov2" / "configs" / "train" / "demo.yaml")


def _launcher_args(*argv):
    parser = argparse.ArgumentParser()
    add_launcher_args(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, tasks",
    [((), 4), (("--ngpus", "2"), 2), (("--ngpus", "0"), 1), (("--ngpus", "0", "--ntasks-per-node", "2"), 2)],
)
def test_one_task_per_gpu_or_the_requested_cpu_tasks(argv, tasks):
    assert tasks_per_node(_launcher_args(*argv)) == tasks


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (("--ngpus", "2", "--ntasks-per-node", "3"), "--ntasks-per-node 3"),
        (("--ngpus", "0", "--ntasks-per-node", "2", "--cluster", "debug"), "--cluster debug"),
        (("--nodes", "2", "--cluster", "local"), "--cluster local"),
        (
            (
                "--ngpus",
                "-1",
            ),
            "--ngpus",
        ),
    ],
)
def test_impossible_layouts_are_refused(argv, culprit):
    with pytest.raises(ConfigError, match=re.escape(culprit)):
        tasks_per_node(_launcher_args(*argv))


def test_rendezvous_port_is_the_one_train_hier_sh_computes():
    lines = (REPO / "train_hier.sh").read_text().splitlines()
    line = next(text for text in lines if text.startswith("MASTER_PORT="))
    for job_id, restart in [(1, 0), (999, 3), (1000, 0), (123456, 21)]:
        script = f"SLURM_JOB_ID={job_id} SLURM_RESTART_COUNT={restart}; {line}; echo $MASTER_PORT"
        port = int(subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout)
        assert port == rendezvous_port(str(job_id), restart)
    assert rendezvous_port("5", 1) != rendezvous_port("5", 0)  # a requeued run gets a fresh port
    assert 20000 <= rendezvous_port("4711_3") < 40000  # array job ids are not plain numbers


def test_bad_config_key_fails_before_anything_is_submitted(tmp_path):
    argv = ["--cluster", "local", "--ngpus", "0", "--config-file", DEMO_CONFIG]
    argv += ["--output-dir", str(tmp_path / "out"), "optim.base_lrr=0.1"]
    with pytest.raises(ConfigError, match="base_lrr"):
        main(argv)
    assert not (tmp_path / "out").exists()


def test_slurm_arg_must_be_key_value(tmp_path):
    argv = ["--cluster", "local", "--ngpus", "0", "--slurm-arg", "qos", "--config-file", DEMO_CONFIG]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        main(argv + ["--output-dir", str(tmp_path / "out")])


def test_local_cluster_trains_with_two_processes(tmp_path):
    """--cluster local: submitit starts 2 processes here; they rendezvous, train with FSDP2 and export."""
    from dinov2.data.synthetic_cells import generate_demo_dataset
    from dinov2.models.model_file import load_model_file

    manifest = generate_demo_dataset(tmp_path / "data", n_per_class=2, size=64, seed=0)
    output_dir = tmp_path / "out"
    argv = ["--cluster", "local", "--ngpus", "0", "--ntasks-per-node", "2", "--timeout", "10"]
    argv += ["--config-file", DEMO_CONFIG, "--output-dir", str(output_dir)]
    argv += [f"train.dataset_path_unsup=[{manifest}]", "train.max_iters=2", "train.batch_size_per_gpu=4"]
    argv += ["train.num_workers=0", "train.log_period=2", "train.progress_bar=false", "train.device=cpu"]
    assert main(argv) == 0
    logs = "".join(p.read_text() for p in (output_dir / "submitit").glob("*/*_log.out"))
    assert "[rank 0/2]" in logs and "[rank 1/2]" in logs
    assert "global batch 8 (4 per rank)" in (output_dir / "log.txt").read_text()
    assert load_model_file(output_dir / "model.pth").supervised_head is not None


def test_slurm_jobs_end_every_task_when_one_fails(tmp_path):
    """srun --kill-on-bad-exit=1 in the sbatch file submitit writes (tests/test_slurm.py runs it for real)."""
    if shutil.which("srun") is None:
        pytest.skip("submitit's slurm executor needs srun on the PATH")
    executor = make_executor(_launcher_args("--ngpus", "2"), tmp_path)
    srun_args = executor._executor.parameters["srun_args"]
    assert "--kill-on-bad-exit=1" in srun_args and "--cpus-per-task=8" in srun_args
