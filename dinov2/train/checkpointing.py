"""Training checkpoints: one ``torch.save`` file per save, written atomically, the last K kept.

``OUT/checkpoint_<step:07d>.pth`` = ``{"format": "dino_hier.train_checkpoint", "model": full
state dict ("student.backbone.*", "teacher.backbone.*", "student.dino_head.*", ...,
"supervised_head.*", "dino_loss.center", ...), "optimizer": optimizer state keyed by parameter
name, "scaler": grad-scaler state or None, "step": completed iterations, "config": the run config,
"rng": one RNG snapshot per rank, "world_size": ...}``.

With FSDP2 every rank takes part in gathering the full state dicts (to CPU); rank 0 writes
``<file>.tmp`` then ``os.replace`` so a crash never leaves a half-written checkpoint under the
final name. On resume rank 0 alone reads the file and broadcasts it. The file is independent of
the world size and ``load_pretrained`` reads ``teacher.backbone.*`` from it.
"""

import os
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dinov2 import distributed
from dinov2.errors import CheckpointError
from dinov2.fsdp import full_model_state_dict, full_optimizer_state_dict, load_full_state
from dinov2.models.weights import state_dict_mismatches

FORMAT = "dino_hier.train_checkpoint"
_NAME = re.compile(r"^checkpoint_(\d{7,})\.pth$")


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint_{step:07d}.pth"


def list_checkpoints(output_dir: Path) -> list:
    """Checkpoint files in ``output_dir``, oldest step first."""
    found = []
    for path in Path(output_dir).glob("checkpoint_*.pth"):
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_rng() -> list:
    """Every rank's RNG snapshot (collective), in rank order."""
    own = rng_state()
    if not distributed.is_enabled():
        return [own]
    gathered = [None] * distributed.get_world_size()
    dist.all_gather_object(gathered, own)
    return gathered


def save_checkpoint(
    output_dir: Path, step: int, model, optimizer, scaler, config: dict, keep: int, extra: dict | None = None
) -> Path:
    """Write ``checkpoint_<step>.pth`` (collective: call on every rank); keep the newest ``keep``."""
    state = {
        "format": FORMAT,
        "model": full_model_state_dict(model),
        "optimizer": full_optimizer_state_dict(model, optimizer),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "config": config,
        "rng": _gather_rng(),
        "world_size": distributed.get_world_size(),
        **(extra or {}),
    }
    path = checkpoint_path(output_dir, step)
    if distributed.is_main_process():
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            old.unlink()
    distributed.barrier()
    return path


def read_checkpoint_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise CheckpointError(f"cannot read training checkpoint {path}: {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dino_hier training checkpoint (no format {FORMAT!r})")
    return state


def checkpoint_precision(path: Path) -> dict | None:
    """The precision record (``{"name", "reason"}``) a checkpoint was trained with, read without
    loading its tensors (memory-mapped); None for checkpoints that have none."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a truncated or foreign file
        raise CheckpointError(f"cannot read training checkpoint {path}: {error}") from None
    return state.get("precision") if isinstance(state, dict) else None


def _check_fits(path: Path, model, model_state: dict) -> None:
    """A checkpoint of another model or config fails here, naming its keys, before any loading."""
    problems = state_dict_mismatches(model_state, model.state_dict())
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this model/config: " + ". ".join(problems))


def _read_on_rank0(path: Path, model) -> tuple:
    """Rank 0 reads and checks the file; every rank gets its small part (all but the model and
    optimizer tensors) and the same error, so that no rank waits for a broadcast that never comes."""
    state, shared = None, {}
    if distributed.get_rank() == 0:
        try:
            state = read_checkpoint_file(path)
            _check_fits(path, model, state["model"])
            shared = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
            shared["optimizer_names"] = list(state["optimizer"]["state"])
        except CheckpointError as error:
            shared = {"error": str(error)}
    box = [shared]
    dist.broadcast_object_list(box, src=0)
    if "error" in box[0]:
        raise CheckpointError(box[0]["error"])
    return state, box[0]


def load_checkpoint(path: Path, model, optimizer, scaler) -> dict:
    """Restore model, optimizer, scaler and this rank's RNG from ``path`` (collective); returns the
    dict (without the model and optimizer tensors on ranks > 0). With several processes rank 0
    alone reads the file and broadcasts it: one copy in a node's host memory, not one per GPU."""
    if distributed.is_enabled():
        full, state = _read_on_rank0(path, model)
        load_full_state(
            model,
            full["model"] if full else {},
            optimizer,
            full["optimizer"] if full else {},
            saved_optimizer_names=state["optimizer_names"],
            from_rank0=True,
        )
    else:
        state = read_checkpoint_file(path)
        _check_fits(path, model, state["model"])
        try:  # the optimizer state can still disagree (other parameter groups)
            load_full_state(model, state["model"], optimizer, state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path} does not fit this model/config: {error}") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rank = distributed.get_rank()
    if state.get("world_size") == distributed.get_world_size():
        set_rng_state(state["rng"][rank])
    else:  # another world size: the data order is still exact (sampler positions), the RNG streams not
        torch.manual_seed(state["step"] * 1000 + rank)
    return state
