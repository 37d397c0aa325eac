"""Files the commands write: one behaviour for every ``-o``, and URIs for shared storage.

Every ``-o`` of every command: the folder must exist (nothing is created silently; the error names the folder),
the file is written whole or not at all (a temporary file, then a rename), with the mode any new file of
yours gets (0644 under the usual umask). A URI (``s3://``, ``gs://``, ``file://``) goes through pyarrow's
filesystems, so a job on a cluster can leave its weights on shared storage.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from polyak.contract.atomic import atomic_write
from polyak.contract.errors import OutputError
from polyak.contract.spec import is_uri


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
        raise OutputError(f"cannot write {target}: the folder {folder} does not exist")
    if Path(target).is_dir():
        raise OutputError(f"cannot write {target}: it is a folder")


def write_output(target: str | Path, data: bytes) -> str:
    """Write ``data`` to a local path or a URI; where it went, for the message."""
    check_output(target)
    if is_uri(target):
        return _write_uri(str(target), data)
    path = Path(target)
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        raise OutputError(f"cannot write {target}: {e.strerror or e}") from None
    return str(path)


def _write_uri(uri: str, data: bytes) -> str:
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise OutputError(f"writing to {uri} needs pyarrow (pip install 'polyak[parquet]')") from None
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        with filesystem.open_output_stream(path) as out:
            out.write(data)
    except Exception as e:  # pyarrow's errors for a bad bucket, no credentials, a missing folder, ...
        raise OutputError(f"cannot write {uri}: {e}") from None
    return uri

