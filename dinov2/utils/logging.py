"""Human log (stdout + ``OUT/log.txt``) and JSON-lines metrics (``OUT/training_metrics.jsonl``)."""

import json
import logging
import sys
from pathlib import Path

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
