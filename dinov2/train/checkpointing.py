"""Training checkpoints: one ``torch.save`` file per save, written atomically, the last K kept.

``OUT/checkpoint_<step:07d>.pth`` = ``{"format": "dino_hier.train_checkpoint", "model": full
state dict ("student.backbone.*", "teacher.backbone.*", "student.dino_head.*", ...,
"supervised_head.*", "dino_loss.center", ...), "optimizer": optimizer state keyed by parameter
name, "scaler": grad-scaler state or None, "step": completed iterations, "config": the run config,
"rng": one RNG snapshot per rank, "world_size": ...}``.

With FSDP2 every rank takes part in gathering the full state dicts (to CPU); rank 0 writes the
file with :func:`dinov2.utils.io.atomic_write`, so a crash never leaves a half-written checkpoint
under the final name. On resume rank 0 alone reads the file and broadcasts it. The file is independent of
the world size and ``load_pretrained`` reads ``teacher.backbone.*`` from it.
"""

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dinov2 import distributed
from dinov2.errors import CheckpointError, ConfigError
from dinov2.fsdp import full_model_state_dict, full_optimizer_state_dict, load_full_state
from dinov2.models.weights import state_dict_mismatches
from dinov2.train.config_history import check_resume, config_changes, describe
from dinov2.utils.io import atomic_write

FORMAT = "dino_hier.train_checkpoint"
logger = logging.getLogger("dinov2")
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
        with atomic_write(path) as handle:
            torch.save(state, handle)
        for old in list_checkpoints(output_dir)[:-keep]:
            old.unlink()
    distributed.barrier()
    return path


class UnreadableCheckpointError(CheckpointError):
    """The file is damaged (truncated, corrupt) or not a training checkpoint at all."""


def read_checkpoint_file(path: Path, mmap: bool = False) -> dict:
    """The checkpoint's dict; ``mmap``: tensors memory-mapped, not read (cheap, for its records)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # a truncated or foreign file
        raise UnreadableCheckpointError(f"cannot read training checkpoint {path}: {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UnreadableCheckpointError(f"{path} is not a dino_hier training checkpoint (no format {FORMAT!r})")
    return state


def checkpoint_precision(path: Path) -> dict | None:
    """The precision record (``{"name", "reason"}``) a checkpoint was trained with, read without
    loading its tensors (memory-mapped); None for checkpoints that have none."""
    return read_checkpoint_file(path, mmap=True).get("precision")


def skip_damaged(checkpoints: list, set_aside: bool = False) -> list:
    """``checkpoints`` (oldest first) up to the newest one that reads (memory-mapped: its index and
    records, not every tensor). Each newer, damaged one is skipped with a warning naming it and why;
    with ``set_aside`` (resume) the main process renames it ``<name>.damaged``, so that it is neither
    tried again nor counted among the checkpoints kept. CheckpointError when none reads."""
    reasons = []
    for position in range(len(checkpoints) - 1, -1, -1):
        path = checkpoints[position]
        try:
            read_checkpoint_file(path, mmap=True)
            return checkpoints[: position + 1]
        except UnreadableCheckpointError as error:
            reasons.append(str(error))
            logger.warning("skipping damaged checkpoint %s: %s", path, error)
            if set_aside and distributed.is_main_process():
                os.replace(path, path.with_name(path.name + ".damaged"))
                logger.warning("renamed it %s.damaged", path.name)
    raise CheckpointError(
        "no readable training checkpoint: " + ("; ".join(reasons) or "none found") + ". --no-resume starts over"
    )


def _check_fits(path: Path, model, model_state: dict, changes: dict) -> None:
    """A checkpoint of another model or config fails here, naming its keys, before any loading."""
    problems = state_dict_mismatches(model_state, model.state_dict())
    if problems:
        if changes:
            problems.append(f"the config differs from the checkpoint's in {describe(changes)}")
        raise CheckpointError(f"checkpoint {path} does not fit this model/config: " + ". ".join(problems))


def _read_and_check(path: Path, model, config: dict | None, allow_changes: bool) -> dict:
    """Read ``path``; check that it fits ``model`` and that ``config`` may resume it (config_history)."""
    state = read_checkpoint_file(path)
    changes = {}
    if config is not None:
        changes = config_changes(state["config"], config, state.get("world_size", 1), distributed.get_world_size())
    _check_fits(path, model, state["model"], changes)
    state["config_changes"] = check_resume(changes, Path(path), allow_changes)
    return state


_SHARED_ERRORS = {cls.__name__: cls for cls in (UnreadableCheckpointError, CheckpointError, ConfigError)}


def _read_on_rank0(path: Path, model, config: dict | None, allow_changes: bool) -> tuple:
    """Rank 0 reads and checks the file; every rank gets its small part (all but the model and
    optimizer tensors) and the same error, so that no rank waits for a broadcast that never comes."""
    state, shared = None, {}
    if distributed.get_rank() == 0:
        try:
            state = _read_and_check(path, model, config, allow_changes)
            shared = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
            shared["optimizer_names"] = list(state["optimizer"]["state"])
        except tuple(_SHARED_ERRORS.values()) as error:
            shared = {"error": str(error), "kind": type(error).__name__}
    box = [shared]
    dist.broadcast_object_list(box, src=0)
    if "error" in box[0]:
        raise _SHARED_ERRORS[box[0]["kind"]](box[0]["error"])
    return state, box[0]


def load_checkpoint(path: Path, model, optimizer, scaler, config: dict | None = None, allow_changes=False) -> dict:
    """Restore model, optimizer, scaler and this rank's RNG from ``path`` (collective); returns the
    dict (without the model and optimizer tensors on ranks > 0), with ``config_changes`` against
    ``config`` when given (see :func:`dinov2.train.config_history.check_resume`). With several
    processes rank 0 alone reads the file and broadcasts it: one copy in a node's host memory, not
    one per GPU."""
    if distributed.is_enabled():
        full, state = _read_on_rank0(path, model, config, allow_changes)
        load_full_state(
            model,
            full["model"] if full else {},
            optimizer,
            full["optimizer"] if full else {},
            saved_optimizer_names=state["optimizer_names"],
            from_rank0=True,
        )
    else:
        state = _read_and_check(path, model, config, allow_changes)
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
