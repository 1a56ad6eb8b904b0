"""Writing output files safely.

:func:`atomic_write` writes a file so that readers only ever see the old or the new content: the data
go to a uniquely named temporary file in the target's folder, which is flushed to disk and renamed
over the target (``os.replace`` is atomic within one file system). On any failure the temporary file
is removed and the target is left as it was. Failures of the disk (full, over quota, read-only, a
file where a folder belongs) become an :class:`~dinov2.errors.OutputError` naming the file, so the
command-line tools print one line instead of a traceback.
"""

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from dinov2.errors import OutputError

# errors of the disk when the content is flushed and synced
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


class _RecordingFile:
    """A file object that remembers the first OSError of ``write``/``flush``: writers such as
    ``torch.save`` turn it into an unrelated RuntimeError, and the disk's reason would be lost.
    ``path`` is the temporary file, for writers that take a file name instead of a file object."""

    def __init__(self, handle: IO, path: str):
        self._handle = handle
        self.path = path
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self._handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self):
        try:
            self._handle.flush()
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name):
        return getattr(self._handle, name)


def _describe(path: Path, error: OSError) -> str:
    reason = error.strerror or str(error)
    blocking = next((folder for folder in path.parents if folder.exists() and not folder.is_dir()), None)
    if blocking is not None:
        reason = f"{blocking} is a file, not a folder"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            reason += f" ({shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free)"
    return f"cannot write {path}: {reason}"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_write(path) as handle: ...`` writes ``path`` atomically.

    ``mode`` is ``"wb"`` (bytes) or ``"w"`` (UTF-8 text, newlines as written); a writer that takes a
    file name instead writes to ``handle.path``. The parent folders are created. On success the
    content is fsync'ed and renamed onto ``path``; on an exception no temporary file is left and
    ``path`` is unchanged. Raises OutputError for a folder that cannot be created or written and
    for a full disk.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise OutputError(_describe(path, error)) from None
    text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
    handle = _RecordingFile(os.fdopen(fd, mode, **text), temporary)
    try:
        with handle._handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        failed = handle.error or (error if isinstance(error, OSError) and error.errno in _DISK_FULL else None)
        if failed is not None:
            raise OutputError(_describe(path, failed)) from None
        raise
    try:
        os.replace(temporary, path)
    except OSError as error:  # e.g. a folder stands where the file should go
        Path(temporary).unlink(missing_ok=True)
        raise OutputError(_describe(path, error)) from None


def output_folder(path: str | os.PathLike, option: str = "--output-dir") -> Path:
    """Create the folder ``path`` (with parents) and check that files can be written in it.

    Raises OutputError naming ``option`` and the path when a file stands there, the folder cannot be
    created (e.g. under ``/proc``) or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise OutputError(
            f"{option} {path} cannot be used as an output folder: {error.strerror or error} ({error.filename or path})"
        ) from None
    return path
