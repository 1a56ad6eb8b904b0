"""One evaluation per output folder: a second run into a folder in use fails at once and names the first.

Two runs writing one folder would mix their predictions, metrics and report with no error. Waiting
for the first run would not help: the second would then silently overwrite its results. So the
second run stops before doing any work and names the run that holds the folder (pid, host, start
time, command), and the user chooses another ``--output-dir`` or reruns deliberately later.

The lock is an exclusive ``flock`` on ``<folder>/.eval.lock``, held while the run lasts. The kernel
releases it when the process ends in any way (also ``kill -9``), so a crashed run never leaves a
stale lock behind; on Linux NFS clients ``flock`` is carried by NFS byte-range locks and holds
across hosts. The file's text (who holds it) is informative only.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from dinov2.errors import ConfigError

LOCK_NAME = ".eval.lock"


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "a run that has not yet written its name"


@contextlib.contextmanager
def output_folder_lock(folder: Path) -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if needed) for the ``with`` block; ConfigError naming the
    holder when another process holds it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_NAME, "a+")
    except OSError as error:
        raise ConfigError(f"--output-dir {folder} cannot be used: {error.strerror or error}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise ConfigError(
                f"--output-dir {folder} is in use by another evaluation ({_describe(handle.read())}); "
                "wait for it to finish or choose another --output-dir"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        try:
            yield folder
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
