"""Process-group set-up from torchrun or SLURM environment variables.

* torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; a process
  group also for one process (``--nproc_per_node=1``), so that ``compute_precision.fsdp=true``
  runs FSDP2 on one GPU.
* SLURM (``srun``, one task per GPU): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (or
  ``SLURM_NTASKS``), ``SLURM_LOCALID``; ``MASTER_ADDR`` defaults to the first host of
  ``SLURM_JOB_NODELIST`` and ``MASTER_PORT`` to :func:`rendezvous_port`.
  Only inside an ``srun`` step (``SLURM_STEP_ID`` set): a batch script itself is one process.
* neither: a single process, no process group.

Backend: NCCL when the device is CUDA, gloo otherwise. A rank uses GPU ``local_rank mod
visible GPUs``: with one GPU visible per task (``--gpus-per-task=1``, per-task cgroups) every
rank's GPU is ``cuda:0``, with the node's GPUs all visible it is ``cuda:<local rank>``.

Every collective (and the start-up rendezvous) gives up after ``train.collective_timeout_s``; a
crashed rank is better ended by the launcher at once (``srun --kill-on-bad-exit=1``, torchrun),
the timeout catches a rank that hangs.
"""

import os
import re
import subprocess
import zlib
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dinov2.errors import ConfigError, TrainingError


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    source: str  # "torchrun", "slurm" or "single"


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        match = re.match(r"([^,\[]+)(?:\[(\d+))?", nodelist)
        if not match:
            raise ConfigError(
                f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR"
            ) from None
        return match.group(1) + (match.group(2) or "")


def read_env(environ=os.environ) -> DistributedEnv:
    """Rank, world size and local rank from the launcher's environment variables."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistributedEnv(
            int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)), "torchrun"
        )
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        world = int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", 1)))
        if world > 1:
            return DistributedEnv(int(environ["SLURM_PROCID"]), world, int(environ.get("SLURM_LOCALID", 0)), "slurm")
    return DistributedEnv(0, 1, 0, "single")


def select_device(device: str, local_rank: int) -> torch.device:
    """``auto`` picks a GPU when CUDA is available, else the CPU; the GPU is ``cuda:<local_rank mod
    visible GPUs>`` (see the module docstring)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if device != "cpu":
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {device!r}")
    return torch.device("cpu")


def rendezvous_port(job_id: str, restart_count: int = 0) -> int:
    """The rendezvous port of a SLURM job: ``20000 + 20 * (job id mod 1000) + restart count mod 20``
    (``train_hier.sh`` computes the same in the shell). The restart count keeps a requeued job off
    the port its previous run may still hold; array job ids (``4711_3``) are hashed."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return 20000 + 20 * (number % 1000) + restart_count % 20


def enable(device: str = "auto", timeout_s: float | None = None) -> tuple:
    """Initialise the process group when launched with several processes; returns ``(env, device)``.
    ``timeout_s``: how long a collective waits for the other ranks (None: torch's default, 10 min)."""
    env = read_env()
    torch_device = select_device(device, env.local_rank)
    if (env.world_size > 1 or env.source == "torchrun") and not dist.is_initialized():
        if env.source == "slurm":
            os.environ.setdefault("MASTER_ADDR", _first_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
            restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
            os.environ.setdefault("MASTER_PORT", str(rendezvous_port(os.environ.get("SLURM_JOB_ID", "0"), restart)))
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        try:
            dist.init_process_group(
                backend=backend,
                init_method="env://",
                rank=env.rank,
                world_size=env.world_size,
                device_id=torch_device if torch_device.type == "cuda" else None,
                timeout=None if timeout_s is None else timedelta(seconds=timeout_s),
            )
        except dist.DistError as error:
            raise TrainingError(
                f"rank {env.rank} of {env.world_size} ({env.source} launch): the process group did not form at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within train.collective_timeout_s="
                f"{timeout_s}: another process failed to start or cannot reach this address (see its log). "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
            ) from error
    return env, torch_device


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on at least one rank (all ranks get the same answer)."""
    if not is_enabled():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def any_rank_each(flags: list, device: torch.device) -> list:
    """For each flag (a bool, or a 0-dim tensor on ``device`` read without a host sync), whether it is
    true on at least one rank: one all-reduce and one host read for all of them together."""
    values = torch.stack(
        [
            flag.detach().to(torch.float32).reshape(())
            if isinstance(flag, torch.Tensor)
            else torch.full((), float(flag), device=device)  # a fill kernel, not a host-to-device copy
            for flag in flags
        ]
    )
    if is_enabled():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [value > 0 for value in values.tolist()]


def destroy() -> None:
    if is_enabled():
        dist.destroy_process_group()
