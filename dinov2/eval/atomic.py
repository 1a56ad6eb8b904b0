"""Files written whole or not at all: a unique temporary name in the target's folder, then a rename.

Unique names (``tempfile.mkstemp``) keep concurrent writers of one target from writing into each
other's temporary file; the rename makes a reader see either the old file or the complete new one.
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(handle)`` on a new temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    """:func:`write_atomically` for UTF-8 text."""
    return write_atomically(path, lambda handle: handle.write(text.encode()))
