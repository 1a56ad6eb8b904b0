"""dino_hier: DINOv2 for white blood cells with hierarchical cross-entropy.

Needs torch >= 2.6 (:data:`TORCH_FLOOR`): FSDP2's public ``torch.distributed.fsdp.fully_shard``
first shipped in 2.6 (public ``torch.distributed.tensor`` in 2.5). Importing the package with an
older torch fails at once with that message instead of halfway into a training run.
"""

import re

import torch

__version__ = "0.1.0"
TORCH_FLOOR = (2, 6)


def check_torch_version(version: str) -> None:
    """Raise ImportError when the torch ``version`` string (``2.5.1+cu121``, ``2.6.0a0+git...``) is
    below :data:`TORCH_FLOOR`; a pre-release of the floor counts as the floor (NGC builds)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match.group(1)), int(match.group(2))) >= TORCH_FLOOR:
        return
    floor = ".".join(map(str, TORCH_FLOOR))
    raise ImportError(
        f"dino_hier needs torch >= {floor}, found torch {version} ({torch.__file__}): it calls "
        f"torch.distributed.fsdp.fully_shard (FSDP2), new in torch {floor}. "
        f"Install a torch >= {floor} built for your CUDA (see https://pytorch.org/get-started), "
        "e.g. in a fresh virtual environment, then `pip install -e .` there."
    )


check_torch_version(torch.__version__)
