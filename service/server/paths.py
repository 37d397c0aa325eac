"""Which files a submitted job may read: ``data.path`` and ``init_weights`` are the server's files.

Relative paths resolve against ``--data-root`` (or the server's working directory without one) and
are stored absolute, so a job means the same file wherever the server is started from later. With a
data root, a path that leaves it (``..``, an absolute path, a symlink pointing out) is rejected, and so is
a URI (it names no file under the root); without one, a URI (s3://, gs://, file://) is the workers' to read.
``data.path`` may be a directory (of .parquet files), whose files must lie in it; ``init_weights`` is a file.

A job reads its files when it starts, which may be long after submit: ``recheck`` runs then, and refuses a
path that no longer resolves to itself (a file or a folder on its way swapped for a symlink since submit).
"""

from __future__ import annotations

from pathlib import Path

from polyak.contract.errors import SpecError
from polyak.contract.spec import DataSpec, JobSpec, is_uri
from polyak.service.server.datasets import DatasetStore


def resolve_paths(spec: JobSpec, data_root: Path | None, datasets: DatasetStore | None = None) -> JobSpec:
    """The spec with its file paths absolute and checked, an uploaded dataset named by its file in the server's
    datasets folder (``source: file``, ``name`` kept as the dataset's id); SpecError naming the field otherwise."""
    data, init = spec.data, spec.init_weights
    if data.source == "dataset":
        data = _dataset_file(data, datasets)
    elif data.source == "file" and not (is_uri(data.path) and data_root is None):
        data = data.model_copy(update={"path": _resolve("data.path", data.path, data_root, directory_ok=True)})
    if init:
        init = _resolve("init_weights", init, data_root)
    return spec.model_copy(update={"data": data, "init_weights": init})


def _dataset_file(data: DataSpec, datasets: DatasetStore | None) -> DataSpec:
    try:
        path = datasets.path(data.name) if datasets is not None else None
    except KeyError:
        path = None
    if path is None:
        raise _error("data.name", f"no dataset with id {data.name} on this server (GET /datasets lists them)")
    return DataSpec.model_validate({**data.model_dump(), "source": "file", "path": str(path)})


def recheck(spec: JobSpec) -> None:
    """Before the job reads them: the paths ``resolve_paths`` stored must still be the files it checked.
    SpecError naming the field and the path otherwise."""
    paths = [("init_weights", spec.init_weights)] if spec.init_weights else []
    if spec.data.source == "file" and not is_uri(spec.data.path):
        paths.insert(0, ("data.path", spec.data.path))
    for field, value in paths:
        path = Path(value)
        if not path.is_absolute():  # not stored by resolve_paths (a library caller's spec): nothing to compare
            continue
        try:
            real = path.resolve()
            if real != path:
                raise _error(field, f"{value} changed since the job was submitted: it now leads to {real} "
                                    "through a symlink; the job reads only the file checked at submit")
            if path.is_dir():
                _check_members(field, path)
        except (OSError, ValueError) as e:
            raise _error(field, f"{value}: not a usable path ({type(e).__name__}: {e})") from None


def _check_members(field: str, folder: Path) -> None:
    """A data directory's files must lie in it: a symlink in it must not lead elsewhere."""
    for member in folder.iterdir():
        real = member.resolve()
        if not real.is_relative_to(folder):
            raise _error(field, f"{member} leads outside {folder} (to {real}): a data directory's files must lie in it")


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
        if path.is_dir():
            _check_members(field, path)
    except (OSError, ValueError) as e:  # a NUL byte, a name too long for the file system, ...
        raise _error(field, f"not a usable path ({type(e).__name__}: {e})") from None
    return str(path)


def _error(field: str, message: str) -> SpecError:
    return SpecError(f"{field}: {message}", [{"field": field, "message": message}])
