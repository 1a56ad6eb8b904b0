"""Submit a job with submitit: on SLURM (one task per GPU), or on this machine for testing.

Pre-emption protocol shared with ``train_hier.sh`` and the trainer: SLURM sends ``SIGUSR1`` to
every task (``--signal=USR1@<delay>`` before the time limit, or ``scancel --signal=USR1``); the
trainer writes a checkpoint at the next step boundary and returns 75; the task then hands over
to submitit's own ``SIGUSR1`` handler, which calls the task's ``checkpoint()`` and requeues the
job. submitit's default signal is ``SIGUSR2``; jobs submitted here use ``SIGUSR1`` throughout.
"""

import argparse
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import submitit

from dinov2.distributed import rendezvous_port
from dinov2.errors import ConfigError, TrainingError

PREEMPT_SIGNAL = "USR1"
PREEMPT_SIGNUM = signal.SIGUSR1
CLUSTERS = ("slurm", "local", "debug")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """The resource options of every launcher (``python -m dinov2.run.<task>``)."""
    group = parser.add_argument_group("resources")
    group.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    group.add_argument(
        "--ngpus", type=int, default=4, help="GPUs per node, one task each (default 4); 0 trains on CPUs"
    )
    group.add_argument(
        "--ntasks-per-node",
        type=int,
        default=None,
        help="processes per node (default: --ngpus, or 1 without GPUs); with GPUs it must equal --ngpus",
    )
    group.add_argument(
        "--cpus-per-task", type=int, default=None, help="CPU cores per task (default 8 with GPUs, 1 without)"
    )
    group.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: the partition's)")
    group.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default partition)")
    group.add_argument(
        "--timeout", type=int, default=72 * 60, help="time limit per run in minutes (default 4320 = 72 h)"
    )
    group.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        help="seconds before the time limit at which SLURM sends SIGUSR1 so the run can checkpoint (default 120)",
    )
    group.add_argument("--job-name", default="dino_hier", help="SLURM job name (default dino_hier)")
    group.add_argument(
        "--slurm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any further sbatch option, e.g. --slurm-arg account=myproj --slurm-arg qos=high (repeatable)",
    )
    group.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default="slurm",
        help="slurm (default); local: tasks as processes on this machine; debug: one task in this process "
        "(both for testing; they always --wait)",
    )
    group.add_argument(
        "--wait", action="store_true", help="wait until the job has finished; exit non-zero when it failed"
    )


def tasks_per_node(args: argparse.Namespace) -> int:
    """One task per GPU; ``--ntasks-per-node`` processes (default 1) on CPU-only nodes."""
    if args.nodes < 1 or args.ngpus < 0:
        raise ConfigError(f"--nodes must be >= 1 and --ngpus >= 0, got {args.nodes} and {args.ngpus}")
    if args.ngpus == 0:
        tasks = args.ntasks_per_node or 1
    elif args.ntasks_per_node not in (None, args.ngpus):
        raise ConfigError(
            f"--ntasks-per-node {args.ntasks_per_node} with --ngpus {args.ngpus}: training runs one task per GPU"
        )
    else:
        tasks = args.ngpus
    if tasks < 1:
        raise ConfigError(f"--ntasks-per-node must be >= 1, got {tasks}")
    if args.cluster != "slurm" and args.nodes != 1:
        raise ConfigError(f"--cluster {args.cluster} runs on this machine only: use --nodes 1")
    if args.cluster == "debug" and tasks != 1:
        raise ConfigError("--cluster debug runs a single task in this process: use --ntasks-per-node 1")
    return tasks


def _slurm_args(pairs: Sequence[str]) -> dict[str, str]:
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--slurm-arg expects KEY=VALUE (an sbatch option without dashes), got {pair!r}")
        parsed[key.lstrip("-")] = value
    return parsed


def make_executor(args: argparse.Namespace, log_dir: Path) -> submitit.Executor:
    """An executor for ``args.cluster``; logs and pickles go to ``log_dir/<job id>/``."""
    tasks = tasks_per_node(args)
    slurm_extra = {"signal": f"{PREEMPT_SIGNAL}@{args.signal_delay}", "requeue": True}
    slurm_extra.update(_slurm_args(args.slurm_arg))
    executor = submitit.AutoExecutor(folder=str(log_dir / "%j"), cluster=args.cluster)
    cpus = args.cpus_per_task or (8 if args.ngpus else 1)
    parameters = dict(
        name=args.job_name,
        nodes=args.nodes,
        tasks_per_node=tasks,
        gpus_per_node=args.ngpus,
        cpus_per_task=cpus,
        timeout_min=args.timeout,
    )
    if args.mem_gb is not None:
        parameters["mem_gb"] = args.mem_gb
    if args.cluster == "slurm":
        parameters.update(
            slurm_additional_parameters=slurm_extra,
            # submitit reads its pre-emption signal from this variable when the task starts.
            slurm_setup=[f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}"],
            # srun no longer inherits --cpus-per-task from sbatch since SLURM 22.05. A task that fails
            # ends the others at once instead of leaving them in a collective until its timeout; on
            # pre-emption the SIGTERM that this sends to rank 0 while it requeues is ignored by
            # submitit's handler, so the requeue goes through.
            slurm_srun_args=[f"--cpus-per-task={cpus}", "--kill-on-bad-exit=1"],
        )
        if args.partition:
            parameters["slurm_partition"] = args.partition
    executor.update_parameters(**parameters)
    return executor


def distributed_environment() -> dict[str, str]:
    """torchrun-style variables for this task of a submitit job (rank 0 on the job's first host)."""
    env = submitit.JobEnvironment()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    return {
        "RANK": str(env.global_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.num_tasks // env.num_nodes),
        "MASTER_ADDR": env.hostnames[0],
        "MASTER_PORT": str(rendezvous_port(env.job_id, restart)),
    }


def slurm_job_state(job_id: str) -> str:
    """SLURM's state of a job (RUNNING, COMPLETING, PENDING, ...); '' when SLURM no longer knows it."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return ""


def wait_for_results(job: submitit.Job, num_tasks: int, poll_s: float = 2.0, grace_s: float = 30.0) -> list:
    """Every task's result once all ``num_tasks`` have written one; raises when the job ended without.

    On SLURM this asks ``scontrol`` whether the job has ended: submitit's own check uses ``sacct``,
    which fails on clusters that keep no accounting, and would then wait forever.
    """
    if not isinstance(job, submitit.SlurmJob):
        return job.results()
    ended_at = None
    while not all(job.task(i).paths.result_pickle.exists() for i in range(num_tasks)):
        state = slurm_job_state(job.job_id)
        if state in FINISHED_STATES or not state:
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > grace_s:
                raise TrainingError(
                    f"job {job.job_id} ended ({state or 'no longer known to SLURM'}) without a result from every "
                    f"task; see the logs in {job.paths.folder}"
                )
        time.sleep(poll_s)
    return job.results()
