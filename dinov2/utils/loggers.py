"""Training curves: each record the trainer logs goes to every backend named in ``train.logger``.

``train.logger`` is a list of

* ``jsonl``: ``OUT/training_metrics.jsonl``, one JSON object per record (always written);
* ``tensorboard``: event files in ``OUT/tensorboard`` (``tensorboard --logdir OUT/tensorboard``),
  needs ``pip install tensorboard``;
* ``wandb``: a Weights & Biases run named after the output folder, project ``$WANDB_PROJECT``
  (default ``dino_hier``); ``WANDB_MODE=offline`` works without an account (``wandb sync`` later).
  Its id is kept in ``OUT/wandb_run_id.txt``, so a resumed run continues the same curves; wandb
  ignores the steps it already has (those between the checkpoint and the interruption).

A record is the flat dict the trainer builds: ``{"step": 120, "loss": ..., "lr": ..., ...}``;
numbers become scalars grouped as ``train/<key>`` (loss terms and anything else),
``schedule/<key>`` (lr, wd, momentum, teacher_temp) and ``speed/<key>`` (throughput, MFU, ETA);
keys that already hold a ``/`` (``eval/knn_k20/accuracy``) keep it. Only the main process writes
(``enabled=False`` elsewhere); every process checks the names, so a bad setting stops all alike.
"""

import importlib
import importlib.util
import math
import os
import uuid
from collections.abc import Sequence
from numbers import Real
from pathlib import Path

from omegaconf import OmegaConf

from dinov2.errors import ConfigError
from dinov2.utils.logging import MetricsWriter

try:  # optional: pip install tensorboard
    from torch.utils.tensorboard import SummaryWriter
except ImportError:
    SummaryWriter = None

LOGGERS = ("jsonl", "tensorboard", "wandb")
SECTIONS = {
    "schedule": ("lr", "wd", "momentum", "teacher_temp"),
    "speed": ("time_per_step", "images_per_s", "mfu", "eta_s", "global_batch"),
}
_SECTION_OF = {key: section for section, keys in SECTIONS.items() for key in keys}


def scalar_tag(key: str) -> str:
    """The curve name of a record key: ``lr`` -> ``schedule/lr``, ``loss`` -> ``train/loss``."""
    return key if "/" in key else f"{_SECTION_OF.get(key, 'train')}/{key}"


def scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers (not ``step``) by curve name."""
    return {
        scalar_tag(key): float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    }


class TensorBoardCurves:
    """Event files in ``log_dir``; opened at the first record, dropping events at or after the resume step."""

    def __init__(self, log_dir: Path, config: dict):
        self.log_dir = Path(log_dir)
        self.config = config
        self.resume_step = None
        self.writer = None

    def truncate_after(self, step: int) -> None:
        self.resume_step = step

    def write(self, record: dict) -> None:
        if self.writer is None:
            self.writer = SummaryWriter(str(self.log_dir), purge_step=self.resume_step)
            yaml = OmegaConf.to_yaml(OmegaConf.create(self.config))
            self.writer.add_text("config", f"```yaml\n{yaml}```", global_step=record["step"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()  # live curves: the file is complete after every record

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbCurves:
    """One wandb run per output folder, resumed by the id stored there."""

    def __init__(self, output_dir: Path, config: dict):
        self.output_dir = Path(output_dir)
        self.config = config
        self.run = None

    def truncate_after(self, step: int) -> None:
        """wandb keeps its own history; it ignores records of steps it already has."""

    def write(self, record: dict) -> None:
        if self.run is None:
            wandb = importlib.import_module("wandb")  # here, not at the top: importing it takes ~1 s
            id_file = self.output_dir / "wandb_run_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "dino_hier"),
                name=self.output_dir.resolve().name,
                id=run_id,
                resume="allow",
                dir=str(self.output_dir),
                config=self.config,
            )
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class TrainingCurves:
    """The trainer's one logging interface: ``write(record)`` to every backend, ``truncate_after(step)``
    on resume (records of ``step`` and later are dropped, as the resumed run repeats them)."""

    def __init__(self, names: Sequence[str], output_dir: Path, config: dict, enabled: bool = True):
        names = [names] if isinstance(names, str) else list(names)
        unknown = [name for name in names if name not in LOGGERS]
        if unknown:
            raise ConfigError(f"train.logger: unknown logger(s) {unknown}; choose from {list(LOGGERS)}")
        installed = {"tensorboard": SummaryWriter is not None, "wandb": importlib.util.find_spec("wandb") is not None}
        missing = [f"{name} (pip install {name})" for name in names if not installed.get(name, True)]
        if missing:
            raise ConfigError(f"train.logger={names} needs packages that are not installed: {', '.join(missing)}")
        output_dir = Path(output_dir)
        self.jsonl = MetricsWriter(output_dir / "training_metrics.jsonl", enabled=enabled)
        self.live = []
        if enabled and "tensorboard" in names:
            self.live.append(TensorBoardCurves(output_dir / "tensorboard", config))
        if enabled and "wandb" in names:
            self.live.append(WandbCurves(output_dir, config))

    def truncate_after(self, step: int) -> None:
        for backend in (self.jsonl, *self.live):
            backend.truncate_after(step)

    def write(self, record: dict) -> None:
        for backend in (self.jsonl, *self.live):
            backend.write(record)

    def close(self) -> None:
        for backend in self.live:
            backend.close()
