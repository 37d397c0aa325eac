"""Files the commands write: one behaviour for every ``-o``, and URIs for shared storage.

Every ``-o`` of every command: the folder must exist (nothing is created silently; the error names the folder),
the file is written whole or not at all (a temporary file, then a rename), with the mode any new file of
yours gets (0644 under the usual umask). A URI (``s3://``, ``gs://``, ``file://``) goes through pyarrow's
filesystems, so a job on a cluster can leave its weights on shared storage.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from polyak.client.errors import PolyakError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(target: str | Path) -> bool:
    return bool(_URI.match(str(target)))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # a buffer, not a name: np.savez would append ".npz" to a name without it
    return buffer.getvalue()


def check_output(target: str | Path) -> None:
    """Fail before any work when ``target`` cannot be written: its folder is missing or is not a folder."""
    if is_uri(target):
        return
    folder = Path(target).absolute().parent
    if not folder.is_dir():
        raise PolyakError(f"cannot write {target}: the folder {folder} does not exist")
    if Path(target).is_dir():
        raise PolyakError(f"cannot write {target}: it is a folder")


def write_output(target: str | Path, data: bytes) -> str:
    """Write ``data`` to a local path or a URI; where it went, for the message."""
    check_output(target)
    if is_uri(target):
        return _write_uri(str(target), data)
    path = Path(target)
    fd, tmp = tempfile.mkstemp(dir=path.absolute().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary file only
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise PolyakError(f"cannot write {target}: {e.strerror or e}") from None
    return str(path)


def _write_uri(uri: str, data: bytes) -> str:
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise PolyakError(f"writing to {uri} needs pyarrow (pip install 'polyak[parquet]')") from None
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        with filesystem.open_output_stream(path) as out:
            out.write(data)
    except Exception as e:  # pyarrow's errors for a bad bucket, no credentials, a missing folder, ...
        raise PolyakError(f"cannot write {uri}: {e}") from None
    return uri


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
