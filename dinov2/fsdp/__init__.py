"""FSDP2 wrapping and full (unsharded) state dicts.

``shard_model`` applies ``fully_shard`` to every transformer block of each backbone, to each
head, then to the whole module, with a ``MixedPrecisionPolicy`` (parameters gathered in the
compute dtype, gradients reduced in ``reduce_dtype``). ``reshard_after_forward=False`` keeps
gathered parameters between forward and backward (ZeRO-2, DINOv2's SHARD_GRAD_OP); the trainer
asks it for the student only, since the teacher has no backward that would reshard it.

Checkpoints hold full state dicts: every rank takes part in gathering the shards, rank 0 alone
receives them on the CPU (``cpu_offload``: the others get an empty dict, so a node's host memory
holds one copy) and writes one ``torch.save`` file, so a checkpoint is independent of the
world size and readable without a process group (``load_pretrained`` reads
``teacher.backbone.*`` from it).
The same functions work on an unsharded module (single process).
"""

import warnings

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def shard_model(
    model: nn.Module,
    blocks: list,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """``fully_shard`` each module in ``blocks`` (transformer blocks, heads), then ``model``."""
    # The backbone's output dict holds views (x_norm[:, 0], ...); nothing modifies them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state_dict(model: nn.Module) -> dict:
    """Unsharded parameters and buffers on the CPU (collective: call on every rank)."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter names, unsharded, on the CPU (collective)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(
    model: nn.Module,
    model_state: dict,
    optimizer=None,
    optimizer_state=None,
    saved_optimizer_names=None,
    from_rank0: bool = False,
) -> None:
    """Inverse of the two functions above (collective). ``from_rank0``: rank 0 alone passes the
    full dicts (the others ``{}``) and broadcasts them tensor by tensor, so a node's host memory
    holds one copy; ``saved_optimizer_names``, the parameters that have optimizer state in the
    dicts, must then be given on every rank."""
    set_model_state_dict(
        model, model_state, options=StateDictOptions(full_state_dict=True, strict=True, broadcast_from_rank0=from_rank0)
    )
    if optimizer is not None:
        # Parameters that never had a gradient (a frozen last layer) have no saved state: load
        # non-strictly, then drop the zero state that set_optimizer_state_dict initialises for
        # them, so that their first real step is AdamW's step 1, as in the uninterrupted run.
        options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=from_rank0)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        saved = set(optimizer_state["state"] if saved_optimizer_names is None else saved_optimizer_names)
        for name, param in model.named_parameters():
            if name not in saved:
                optimizer.state.pop(param, None)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter (the tensor itself when unsharded)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
