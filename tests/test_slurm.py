"""The cluster path for real: `sbatch train_hier.sh` and the submitit launcher on a local SLURM.

`scripts/slurm_local.sh up` installs and starts a single-node SLURM on 127.0.0.1 (root and
apt-get needed). Where it cannot, these tests are skipped with the reason, except under CI=true,
where they fail. The cluster stays up after the tests; their jobs are cancelled.
"""

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_job_names = []  # every job this module submits, cancelled at the end


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"CI=true but the local SLURM cannot run: {reason}")
    pytest.skip(f"local SLURM not available: {reason}")


@pytest.fixture(scope="module")
def partition():
    """Bring the local SLURM up (idempotent); yield its default partition; cancel this module's jobs."""
    up = subprocess.run(
        ["bash", str(REPO / "scripts" / "slurm_local.sh"), "up"], capture_output=True, text=True, timeout=900
    )
    if up.returncode != 0:  # not root, no apt-get, no network, ...: the script says which
        _unavailable(f"scripts/slurm_local.sh up failed: {up.stderr.strip()[-3000:]}")
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout.split()
    yield next((p for p in partitions if p.endswith("*")), partitions[0]).rstrip("*")
    for name in _job_names:
        subprocess.run(["scancel", f"--name={name}"], capture_output=True)


def _job_name(kind: str) -> str:
    name = f"dh-test-{kind}-{uuid.uuid4().hex[:6]}"
    _job_names.append(name)
    return name


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_data")
    subprocess.run(
        [sys.executable, "-m", "dinov2.data.synthetic_cells", "--out", str(out), "--n-per-class", "2", "--size", "64"],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    return out / "manifest.csv"


def _overrides(manifest: Path, iterations: int):
    """The demo config shrunk to seconds per step: 2 tasks x 4 images, bf16, FSDP2 over gloo."""
    return [
        f"train.dataset_path_unsup=[{manifest}]",
        f"train.max_iters={iterations}",
        "train.batch_size_per_gpu=4",
        "train.num_workers=0",
        "train.log_period=2",
        "train.checkpoint_every_iters=1000",
        "train.progress_bar=false",
        "train.device=cpu",
    ]


def _sbatch_train_hier(mode: str, name: str, partition: str, log: Path, output_dir: Path, extra: str, python=None):
    """``sbatch <mode> train_hier.sh`` with the CPU settings: 2 tasks x 1 core, the demo config."""
    settings = (
        f"CONFIG=dinov2/configs/train/demo.yaml,OUTPUT_DIR={output_dir},EXTRA={extra},PYTHON={python or sys.executable}"
    )
    return [
        "sbatch",
        mode,
        f"--job-name={name}",
        f"--partition={partition}",
        f"--output={log}",
        "--gpus-per-node=0",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--time=15",
        f"--export=ALL,{settings}",
        "train_hier.sh",
    ]


def _job_id(name: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ids = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout.split()
        if ids:
            return ids[0]
        time.sleep(0.5)
    raise AssertionError(f"no job named {name} in the queue")


def _wait_for_text(path: Path, pattern: str, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return
        if process.poll() is not None:
            break
        time.sleep(0.5)
    text = path.read_text(errors="replace") if path.exists() else "(no file)"
    raise AssertionError(f"{pattern!r} did not appear in {path}:\n{text[-3000:]}")


def _assert_model_file(output_dir: Path) -> None:
    from dinov2.models.model_file import load_model_file

    assert sorted(output_dir.glob("checkpoint_*.pth")), "no checkpoint written"
    model = load_model_file(output_dir / "model.pth")
    assert model.supervised_head is not None and model.supervised_head.out_features == len(model.tree.leaves)


def test_train_hier_sbatch_on_cpu_is_preempted_requeued_and_resumes(partition, manifest, tmp_path):
    """sbatch --wait train_hier.sh with CPU settings; SIGUSR1 mid-run -> checkpoint, requeue, resume, finish."""
    output_dir, log = tmp_path / "out", tmp_path / "job.out"
    name = _job_name("sbatch")
    extra = " ".join(_overrides(manifest, iterations=10))
    command = _sbatch_train_hier("--wait", name, partition, log, output_dir, extra)
    sbatch = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        job = _job_id(name)
        _wait_for_text(output_dir / "log.txt", r"step 2/10", sbatch)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        out, _ = sbatch.communicate(timeout=400)
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
    text = log.read_text()
    assert sbatch.returncode == 0, f"sbatch --wait: {out}\n{text[-4000:]}"
    assert "[rank 0/2] slurm launch" in text and "[rank 1/2] slurm launch" in text
    assert re.search(r"global batch 8 \(4 per rank\)", text) and "FSDP2" in text
    preempted = re.search(r"pre-empted at step (\d+), checkpoint written \(SIGUSR1\)", text)
    assert preempted, text[-4000:]
    assert f"requeueing job {job}" in text and f"job {job} (restart 1)" in text
    assert re.search(rf"resuming from \S+checkpoint_0*{preempted.group(1)}\.pth at step {preempted.group(1)}", text)
    assert "training finished after 10 steps" in text
    _assert_model_file(output_dir)


def test_a_task_that_fails_at_start_ends_the_job_at_once(partition, manifest, tmp_path):
    """srun --kill-on-bad-exit=1: rank 1 fails before the rendezvous; rank 0, which would wait there for
    train.collective_timeout_s (600 s), is ended by srun within KillWait (30 s here)."""
    output_dir, log = tmp_path / "out", tmp_path / "job.out"
    python = tmp_path / "python_rank1_fails.sh"
    python.write_text(
        "#!/bin/bash\n"
        'if [ "$SLURM_PROCID" = 1 ]; then echo "rank 1: simulated start-up failure" >&2; exit 3; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    extra = " ".join(_overrides(manifest, iterations=10))
    command = _sbatch_train_hier("--wait", _job_name("crash"), partition, log, output_dir, extra, python)
    sbatch = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_text(log, "simulated start-up failure", sbatch, timeout_s=300)
        failed_at = time.monotonic()
        sbatch.communicate(timeout=300)
        ended_after = time.monotonic() - failed_at
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
    text = log.read_text()
    assert sbatch.returncode != 0, text
    assert "task 1: Exited with exit code 3" in text, text
    assert ended_after < 120, f"rank 0 outlived the failed rank by {ended_after:.0f} s:\n{text}"


def test_cancelled_job_is_not_requeued(partition, manifest, tmp_path):
    """scancel sends SIGTERM: the trainer checkpoints and exits 75, but the job must stay cancelled."""
    output_dir, log = tmp_path / "out", tmp_path / "job.out"
    name = _job_name("cancel")
    extra = " ".join(_overrides(manifest, iterations=200))
    command = _sbatch_train_hier("--parsable", name, partition, log, output_dir, extra)
    job = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.monotonic() + 240
    while not ((output_dir / "log.txt").exists() and "step 2/" in (output_dir / "log.txt").read_text()):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.5)
    subprocess.run(["scancel", job], check=True)
    while "not requeueing here" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    # A requeued job would be PENDING at once and RUNNING again after 5 s (cred_expire).
    states = set()
    for _ in range(20):
        squeue = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
        states.update(squeue.stdout.split())
        time.sleep(0.5)
    assert states <= {"CANCELLED", "COMPLETING"}, states
    assert "(restart 1)" not in log.read_text()
    # After scancel, srun may stop relaying the tasks' output: the run's own log.txt has it all.
    assert re.search(r"pre-empted at step \d+, checkpoint written \(SIGTERM\)", (output_dir / "log.txt").read_text())


def test_submitit_launcher_trains_and_requeues_on_preemption(partition, manifest, tmp_path):
    """python -m dinov2.run.train.train on SLURM: 2 CPU tasks; SIGUSR1 -> checkpoint(), requeue, resume, finish."""
    output_dir = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "dinov2.run.train.train",
        "--ngpus",
        "0",
        "--ntasks-per-node",
        "2",
        "--partition",
        partition,
        "--timeout",
        "30",
        "--job-name",
        _job_name("submitit"),
        "--wait",
        "--config-file",
        "dinov2/configs/train/demo.yaml",
        "--output-dir",
        str(output_dir),
        *_overrides(manifest, 10),
    ]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first_line = launcher.stdout.readline()
        job = re.match(r"submitted job (\d+) \(slurm\)", first_line)
        assert job, first_line
        _wait_for_text(output_dir / "log.txt", r"step 2/10", launcher)
        subprocess.run(["scancel", "--signal=USR1", job.group(1)], check=True)
        out, _ = launcher.communicate(timeout=400)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    logs = "".join(p.read_text() for p in sorted((output_dir / "submitit").glob("*/*_log.*")))
    assert launcher.returncode == 0, f"{out}\n{logs[-4000:]}"
    assert f"job {job.group(1)} finished" in out
    text = (output_dir / "log.txt").read_text()
    preempted = re.search(r"pre-empted at step (\d+), checkpoint written \(SIGUSR1\)", text)
    assert preempted, text
    assert "Calling checkpoint method" in logs and f"Requeued job {job.group(1)}" in logs
    assert "resuming from" in text and f"at step {preempted.group(1)}" in text
    assert "training finished after 10 steps" in text
    _assert_model_file(output_dir)
