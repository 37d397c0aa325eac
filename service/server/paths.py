"""Which files a submitted job may read: ``data.path`` and ``init_weights`` are the server's files.

Relative paths resolve against ``--data-root`` (or the server's working directory without one) and
are stored absolute, so a job means the same file wherever the server is started from later. With a
data root, a path that leaves it (``..``, an absolute path, a symlink pointing out) is rejected, and so is
a URI (it names no file under the root); without one, a URI (s3://, gs://, file://) is the workers' to read.
``data.path`` may be a directory (of .parquet files); ``init_weights`` is a file.
"""

from __future__ import annotations

from pathlib import Path

from client.errors import SpecError
from client.files import is_uri
from client.spec import JobSpec


def resolve_paths(spec: JobSpec, data_root: Path | None) -> JobSpec:
    """The spec with its file paths absolute and checked; SpecError naming the field otherwise."""
    data, init = spec.data, spec.init_weights
    if data.source == "file" and not (is_uri(data.path) and data_root is None):
        data = data.model_copy(update={"path": _resolve("data.path", data.path, data_root, directory_ok=True)})
    if init:
        init = _resolve("init_weights", init, data_root)
    return spec.model_copy(update={"data": data, "init_weights": init})


def _resolve(field: str, value: str, root: Path | None, directory_ok: bool = False) -> str:
    base = root.resolve() if root else Path.cwd()
    if is_uri(value):
        raise _error(field, f"{value} is a URI, but the server confines data to its data root {base}")
    try:
        path = (base / value).resolve()  # follows symlinks: where the file really is decides
        if root and not path.is_relative_to(base):
            raise _error(field, f"{value} is outside the server's data root {base}")
        if not (path.is_file() or (directory_ok and path.is_dir())):
            what = "a file or a directory of .parquet files" if directory_ok else "a file"
            raise _error(field, f"{path} does not exist on the server or is not {what}")
    except (OSError, ValueError) as e:  # a NUL byte, a name too long for the file system, ...
        raise _error(field, f"not a usable path ({type(e).__name__}: {e})") from None
    return str(path)


def _error(field: str, message: str) -> SpecError:
    return SpecError(f"{field}: {message}", [{"field": field, "message": message}])
