"""The one way polyak writes a file: whole or not at all, and durable once it returns.

A temporary file beside the target is written, flushed to disk, given the mode any new file of the user's gets
(0644 under the usual umask: mkstemp's 0600 is for the temporary file only), then renamed over the target, and
the folder's entry is flushed too. A reader sees the old file or the new one, never a torn one, and a crash
right after the return cannot lose it. Weights (-o), checkpoints and best weights all go through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file and put it at ``path`` atomically; the folder must exist."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.absolute().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.absolute().parent)
    return path


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
