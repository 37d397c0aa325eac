"""Readers that read part of a data source, so that a gradient worker holds only its own shard's rows; one
module per format, opened by type here (``open_source``: the spec's data; ``open_labelled`` and
``open_features``: a file a trained model is scored or predicts on, read by the same readers).

Read in part (opening reads metadata only; ``read(rows)`` touches only what those rows need):

- ``.npy`` (npy.py): a 2-D numeric table, features then target column(s), memory-mapped once per chunk.
- ``.parquet`` (parquet.py): a file, a directory of ``.parquet`` files, or a URI that ``pyarrow.fs`` opens;
  only the row groups holding requested rows are decoded.

Read whole, because neither format can be read in part: ``.npz`` (npz.py: arrays X and y) and ``.csv``
(csv.py: optionally with a header row of column names); and data made in memory (in_memory.py: sklearn's
and synthetic datasets). What every reader shares is in source.py, the feature statistics in stats.py.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from polyak.contract.errors import DataError
from polyak.contract.spec import DataSpec, ModelSpec, is_uri
from polyak.workers.readers.csv import open_csv
from polyak.workers.readers.in_memory import open_generated
from polyak.workers.readers.npy import open_npy
from polyak.workers.readers.npz import open_npz
from polyak.workers.readers.parquet import open_parquet, pyarrow_modules
from polyak.workers.readers.remote import within_bound
from polyak.workers.readers.source import Source, check_n

_UNSUPPORTED = "use .npy, .parquet (read in part), .npz or .csv (read whole)"
# The folders a server confines data to (``polyak serve --data-root``, and its uploads' folder), os.pathsep
# between them. In the environment: the local Ray the server starts, and so every worker, inherits it; a cluster it
# joins gets it in the job's runtime_env (placement.confined_env).
DATA_ROOTS = "POLYAK_DATA_ROOTS"


def confine_data(roots: list[Path]) -> None:
    """From now on this process and the processes it starts open data files only inside ``roots``."""
    os.environ[DATA_ROOTS] = os.pathsep.join(str(Path(r).resolve()) for r in roots)


def check_confined(path: Path) -> None:
    """Where a file is opened: a path that leads out of the data roots (a symlink swapped in on its way since the
    server checked it at submit, seconds before a worker gets here) is refused, naming the path and the roots."""
    roots = [Path(r) for r in os.environ.get(DATA_ROOTS, "").split(os.pathsep) if r]
    if not roots:
        return
    real = path.resolve()
    leads = [real] + ([m.resolve() for m in real.iterdir()] if real.is_dir() else [])
    for target in leads:
        if not any(target.is_relative_to(root) for root in roots):
            raise DataError(f"data.path: {path} leads to {target}, outside the server's data root "
                            f"{os.pathsep.join(map(str, roots))}: refused where it was opened")


def open_source(data: DataSpec, model: ModelSpec) -> Source:
    """The source the spec names, opened (metadata only for .npy and .parquet, whole for the rest), with
    rows enough to train on."""
    if data.source == "dataset":  # a polyak server turns it into its file at submit
        raise DataError(f"data.source = dataset names an upload to a polyak server ({data.name}): submit the job "
                        "to that server (polyak submit, Client.submit), or train from a file here", "data.source")
    if data.source != "file":
        if data.target is not None:
            raise DataError(
                f"data.target = {data.target!r} names columns, but only .parquet and .csv files have any", "data.target"
            )
        source = open_generated(data, model)
    else:
        source = open_labelled(data.path, data.target, model.loss, model.layers[-1])
    check_n(source.n, source.origin)
    return source


def open_labelled(path: str, target, loss: str, n_outputs: int) -> Source:
    """A data file (or URI) of features and targets, split as a job's spec says: ``target`` (data.target)
    names the target columns, else they are the last column(s): one of class ids for cross_entropy, one per
    output for mse."""
    return _open_file(path, target, count_targets(target, loss, n_outputs, path), loss == "cross_entropy")


def open_features(path: str) -> Source:
    """A data file (or URI) of features only: every column is one (``.npz``: array X)."""
    return _open_file(path, None, 0, False)


def count_targets(target, loss: str, n_outputs: int, origin: str) -> int:
    """The number of target columns: those ``target`` names, else 1 (class ids) or ``n_outputs`` (mse)."""
    if target is None:
        return 1 if loss == "cross_entropy" else n_outputs
    n = 1 if isinstance(target, str) else len(target)
    if loss == "cross_entropy" and n != 1:
        raise DataError(
            f"{origin}: cross_entropy needs one target column of class ids; data.target names {n}", "data.target"
        )
    return n


def _open_file(origin: str, target, n_targets: int, classification: bool) -> Source:
    """Opened by its type: ``target`` names the target columns, else they are the last ``n_targets``."""
    if is_uri(origin):
        return _open_uri(origin, target, n_targets, classification)
    path = Path(origin)
    if not path.exists():
        raise DataError(f"data.path: {os.path.abspath(path)} does not exist")
    check_confined(path)
    if path.is_dir() or path.suffix == ".parquet":
        _, _, pafs = pyarrow_modules(origin)
        return open_parquet(pafs.LocalFileSystem(), os.path.abspath(path), origin, target, n_targets, classification)
    if target is not None and path.suffix in (".npy", ".npz"):
        raise DataError(
            f"data.target = {target!r} names columns, but {origin} has none; "
            "leave it null (.npy: the targets are the last column(s); .npz: array y)",
            "data.target",
        )
    try:
        if path.suffix == ".npy":
            return open_npy(path, origin, n_targets, classification)
        if path.suffix == ".npz":
            return open_npz(path, origin, n_targets, classification)
        if path.suffix == ".csv":
            return open_csv(path, origin, target, n_targets, classification)
    except DataError:
        raise
    except Exception as e:  # numpy raises many types for a corrupt file; their messages quote its bytes
        raise DataError(f"{origin}: cannot read data: not a readable {path.suffix} file ({type(e).__name__})") \
            from None
    raise DataError(f"{origin}: unsupported file type {path.suffix!r}; {_UNSUPPORTED}")


def _open_uri(uri: str, target, n_targets: int, classification: bool) -> Source:
    """Metadata only, within remote.OPEN_SECONDS (and given up on a cancel): an endpoint may never answer."""
    return within_bound(lambda: _open_uri_now(uri, target, n_targets, classification), uri)


def _open_uri_now(uri: str, target, n_targets: int, classification: bool) -> Source:
    pa, _, pafs = pyarrow_modules(uri)
    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{uri}: cannot open ({type(e).__name__}: {e})") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.path: {uri} does not exist")
    suffix = PurePosixPath(root).suffix
    if info.type == pafs.FileType.File and suffix != ".parquet":
        hint = "a URI names .parquet data; copy the file to a local path" if suffix in (".npy", ".npz", ".csv") else ""
        raise DataError(f"{uri}: unsupported file type {suffix!r}; {hint or _UNSUPPORTED}")
    return open_parquet(filesystem, root, uri, target, n_targets, classification)
