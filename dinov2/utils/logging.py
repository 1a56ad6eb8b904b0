"""Human log (stdout + ``OUT/log.txt``), JSON-lines metrics (``OUT/training_metrics.jsonl``) and the
per-window training record (:class:`StepLogger`)."""

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

from dinov2.utils.io import atomic_write

LOGGER_NAME = "dinov2"


def setup_logging(output_dir: Path, rank: int = 0) -> logging.Logger:
    """Rank 0 logs INFO to stdout and ``log.txt``; other ranks log warnings only (stdout)."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    prefix = f"[rank {rank}] " if rank else ""
    formatter = logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(formatter)
    stream.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.addHandler(stream)
    if rank == 0:
        file_handler = logging.FileHandler(Path(output_dir) / "log.txt")
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger


class MetricsWriter:
    """Appends one JSON object per logged step; on resume drops lines from steps not yet reached."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step < step`` (a resumed run repeats the later ones)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) < step
        ]
        with atomic_write(self.path, "w") as handle:  # a crash here must not lose the earlier records
            handle.write("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


class StepLogger:
    """Every ``period`` steps: the window's mean loss terms (over steps and ranks), time per step,
    throughput, MFU and ETA, logged and written to every sink (``sink.write(record)``); a DINO
    term that sits at its collapsed value (uniform student and teacher) is warned about once.

    MFU = model FLOPs of the window / elapsed time / ``peak_flops`` (the measured matmul rate of the
    precision in use, named by ``peak_label``). Time spent inside :meth:`paused` (checkpoints,
    exports) is not counted.
    """

    def __init__(
        self,
        logger: logging.Logger,
        sinks: list,
        period: int,
        max_iter: int,
        global_batch: int,
        peak_flops: float,
        peak_label: str,
        collapsed_values: dict,
        n_prototypes: int,
        world_size: int = 1,
    ):
        self.logger, self.sinks, self.period, self.max_iter = logger, sinks, period, max_iter
        self.global_batch, self.peak_flops, self.peak_label = global_batch, peak_flops, peak_label
        self.collapsed_values, self.n_prototypes, self.world_size = collapsed_values, n_prototypes, world_size
        self.warned_collapsed = set()
        self._start_window()

    def _start_window(self) -> None:
        self.window_start, self.window_steps, self.window_flops, self.sums = time.perf_counter(), 0, 0.0, {}
        self.paused_seconds = 0.0

    @contextlib.contextmanager
    def paused(self):
        """Work between steps (a checkpoint, an export) that the step timing leaves out."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - start

    def step(self, done: int, loss: torch.Tensor, terms: dict, flops: float, schedule: dict) -> dict | None:
        """Account one finished step (``done`` steps so far); at the end of a window return the record."""
        for name, value in (("loss", loss), *terms.items()):
            value = value.detach().float()  # summed on the device: no host sync per step
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.window_steps += 1
        self.window_flops += flops
        if done % self.period and done != self.max_iter:
            return None
        names = sorted(self.sums)
        means = torch.stack([self.sums[name] for name in names]) / self.window_steps
        if self.world_size > 1:
            torch.distributed.all_reduce(means)
            means /= self.world_size
        elapsed = time.perf_counter() - self.window_start - self.paused_seconds
        seconds_per_step = elapsed / self.window_steps
        record = {"step": done, **{name: round(value, 6) for name, value in zip(names, means.tolist())}}
        record.update(schedule)
        record.update(
            global_batch=self.global_batch,
            time_per_step=seconds_per_step,
            images_per_s=self.global_batch / seconds_per_step,
            mfu=self.window_flops / elapsed / self.peak_flops,
            eta_s=seconds_per_step * (self.max_iter - done),
        )
        for sink in self.sinks:
            sink.write(record)
        terms_text = " ".join(f"{name} {record[name]:.4f}" for name in terms if name in record)
        self.logger.info(
            "step %d/%d  loss %.4f (%s)  lr %.2e  %.3f s/step  MFU %.1f%% of %s  ETA %s",
            done,
            self.max_iter,
            record["loss"],
            terms_text,
            record.get("lr", float("nan")),
            seconds_per_step,
            100 * record["mfu"],
            self.peak_label,
            time.strftime("%H:%M:%S", time.gmtime(record["eta_s"])),
        )
        self._warn_collapsed(record)
        self._start_window()
        return record

    def _warn_collapsed(self, record: dict) -> None:
        for name, value in self.collapsed_values.items():
            if name in record and name not in self.warned_collapsed and abs(record[name] - value) < 1e-3:
                self.warned_collapsed.add(name)
                self.logger.warning(
                    "%s sits at %.4f, its value for uniform student and teacher outputs over %d prototypes: "
                    "the DINO head has collapsed and no longer learns (common in short runs from random "
                    "weights; start from pretrained weights, student.pretrained_weights=...)",
                    name,
                    value,
                    self.n_prototypes,
                )
