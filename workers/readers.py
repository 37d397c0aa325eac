"""Readers that read part of a data source, so that a gradient worker holds only its own shard's rows.

Read in part (opening reads metadata only; ``read(rows)`` touches only what those rows need):

- ``.npy``: a 2-D numeric table, features then target column(s), memory-mapped once per chunk.
- ``.parquet``: a file, a directory of ``.parquet`` files (one dataset, files in name order), or a URI that
  ``pyarrow.fs`` opens (``s3://``, ``gs://``, ``file://``); only the row groups holding requested rows are
  decoded. Targets are the ``data.target`` column(s), else the last column(s).

Read whole, because neither format can be read in part (numpy cannot memory-map a ``.npz`` member, which may
be compressed; a ``.csv`` row's position is only known by reading every row before it): ``.npz`` (arrays X and
y), ``.csv`` (optionally with a header row of column names), and the in-memory sklearn and synthetic datasets.

Every ``read`` validates each chunk as it goes (finite values, class ids), so a bad row is reported by its
global row number however large the source is.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np

from polyak.contract.errors import DataError
from polyak.contract.spec import DataSpec, ModelSpec, is_uri
from polyak.workers.generated import sklearn_dataset, synthetic_dataset

CHUNK_ROWS = 65536
COLUMNS_PER_READ = 64
CHUNK_BYTES = 16 * 2**20  # of stored rows: the float64 copy a chunk becomes is 2-4x that, and transient
_UNSUPPORTED = "use .npy, .parquet (read in part), .npz or .csv (read whole)"


# -- the source interface ------------------------------------------------------------------------
@dataclass(eq=False)
class Source:
    """One opened data source: its shape from metadata, and ``read`` for any subset of its rows."""

    origin: str  # names the data in every message
    n: int
    n_features: int
    n_targets: int
    classification: bool  # targets are class ids (model.loss == "cross_entropy")
    nbytes_per_row: int  # as stored, for memory estimates

    def column_groups(self) -> list[tuple[int, int, Source]]:
        """(first, end, source of features [first, end)): the feature columns in groups that are best read one
        group at a time. One group, but for a wide columnar source (parquet keeps a reader per column)."""
        return [(0, self.n_features, self)]

    def read(self, rows: np.ndarray, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
        """(X (len(rows), d) in ``dtype``, y) for sorted, unique row numbers in [0, n); y is int64 (len,) class
        ids, or (len, n_targets) in ``dtype``. Peak memory is the output plus about one chunk."""
        rows = _checked_rows(rows, self.n)
        X = np.empty((len(rows), self.n_features), dtype)
        y = np.empty(len(rows), np.int64) if self.classification else np.empty((len(rows), self.n_targets), dtype)
        for pos, X_chunk, y_chunk in self.chunks(rows, dtype):
            X[pos : pos + len(X_chunk)] = X_chunk
            y[pos : pos + len(y_chunk)] = y_chunk
        return X, y

    def chunks(
        self, rows: np.ndarray, dtype=np.float64, chunk_rows: int = CHUNK_ROWS
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Validated (pos, X, y) chunks, in order, of at most ``chunk_rows`` rows (fewer for wide rows):
        X and y hold the data of ``rows[pos : pos + len(X)]``, typed as ``read`` returns them."""
        rows = _checked_rows(rows, self.n)
        chunk_rows = max(1, min(chunk_rows, CHUNK_BYTES // max(1, self.nbytes_per_row)))
        for pos, X_raw, y_raw in self._raw_chunks(rows, chunk_rows):
            yield (pos, *self._validated(rows[pos : pos + len(X_raw)], X_raw, y_raw, dtype))

    def _raw_chunks(self, rows: np.ndarray, chunk_rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(pos, X, y) as stored, y of shape (m, n_targets), for consecutive runs of ``rows``."""
        raise NotImplementedError

    def _validated(self, rows: np.ndarray, X, y, dtype) -> tuple[np.ndarray, np.ndarray]:
        # X is checked after the cast: a float64 value beyond float32's range becomes inf there.
        with np.errstate(over="ignore"):
            X = np.asarray(X, dtype=dtype)
        self._first_bad(~np.isfinite(X).all(axis=1), rows, "X has NaN or inf values")
        self._first_bad(~np.isfinite(y).all(axis=1), rows, "y has NaN or inf values")
        if not self.classification:
            return X, np.asarray(y, dtype=dtype)
        labels = y[:, 0]
        self._first_bad(
            labels != np.round(labels), rows, "cross_entropy needs integer class ids in y, found fractional values"
        )
        negative = labels < 0
        if negative.any():
            i = negative.argmax()
            raise DataError(f"{self.origin}: labels must be in 0..k-1, found {labels[i]:g} (in row {rows[i]})")
        return X, labels.astype(np.int64)

    def _first_bad(self, bad: np.ndarray, rows: np.ndarray, what: str) -> None:
        if bad.any():
            raise DataError(f"{self.origin}: {what} (first in row {rows[bad.argmax()]})")


def _checked_rows(rows, n: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or (len(rows) and (rows[0] < 0 or rows[-1] >= n or np.any(np.diff(rows) <= 0))):
        raise ValueError(f"rows must be sorted, unique row numbers in [0, {n}), got {rows!r}")
    return rows


def _spans(rows: np.ndarray, chunk_rows: int, span: int) -> Iterator[tuple[int, np.ndarray]]:
    """Runs of at most ``chunk_rows`` sorted rows whose row numbers lie within ``span`` of the run's first."""
    pos = 0
    while pos < len(rows):
        end = min(pos + chunk_rows, int(np.searchsorted(rows, rows[pos] + span, side="left")))
        end = max(end, pos + 1)
        yield pos, rows[pos:end]
        pos = end


def _runs(rows: np.ndarray, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    for pos in range(0, len(rows), chunk_rows):
        yield pos, rows[pos : pos + chunk_rows]


# -- in memory: sklearn, synthetic, .npz, .csv ---------------------------------------------------
@dataclass(eq=False)
class ArraySource(Source):
    X: np.ndarray  # (n, d)
    y: np.ndarray  # (n, n_targets)

    def _raw_chunks(self, rows, chunk_rows):
        for pos, run in _runs(rows, chunk_rows):
            yield pos, self.X[run], self.y[run]


def _array_source(X, y, classification: bool, origin: str) -> ArraySource:
    X, y = np.asarray(X), np.asarray(y)
    if not np.issubdtype(X.dtype, np.number):
        raise DataError(f"{origin}: X must be numeric, got dtype {X.dtype}")
    if X.ndim != 2:
        raise DataError(f"{origin}: X must be 2-D (n, d), got shape {X.shape}")
    if y.ndim == 0:
        raise DataError(f"{origin}: y must hold one target per row of X, got a single value")
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{origin}: y must be numeric, got dtype {y.dtype}")
    if y.shape[0] != X.shape[0]:
        raise DataError(f"{origin}: X has {X.shape[0]} rows but y has {y.shape[0]}")
    if classification and y.ndim != 1:
        raise DataError(f"{origin}: cross_entropy needs y of shape (n,) with class ids, got {y.shape}")
    if y.ndim > 2:
        raise DataError(f"{origin}: y must be (n,) or (n, k), got {y.shape}")
    y = y.reshape(len(y), -1)
    _check_n(X.shape[0], origin)
    return ArraySource(
        origin=origin,
        n=X.shape[0],
        n_features=X.shape[1],
        n_targets=y.shape[1],
        classification=classification,
        nbytes_per_row=X.itemsize * X.shape[1] + y.itemsize * y.shape[1],
        X=X,
        y=y,
    )


def _open_npz(path: Path, origin: str, classification: bool) -> ArraySource:
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("X", "y") if k not in f]
        if missing:
            raise DataError(f"{origin}: .npz needs arrays X and y; missing {', '.join(missing)} (has {list(f)})")
        X, y = f["X"], f["y"]
    return _array_source(X, y, classification, origin)


def _open_csv(path: Path, origin: str, target, n_targets: int, classification: bool) -> ArraySource:
    try:
        table, names = np.loadtxt(path, delimiter=",", ndmin=2), None
    except ValueError:  # a header row of column names
        table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        with open(path) as f:
            names = [name.strip().strip("\"'") for name in f.readline().split(",")]
    if names is None and target is not None:
        raise DataError(f"{origin}: data.target = {target!r} names columns, but the file has no header row")
    n_columns = table.shape[1]
    if names is not None and len(names) != n_columns:
        raise DataError(f"{origin}: the header names {len(names)} columns but the rows have {n_columns}")
    features, targets = _split_columns(names or list(range(n_columns)), target, n_targets, origin)
    y = table[:, targets]
    return _array_source(table[:, features], y[:, 0] if classification else y, classification, origin)


def _in_memory(data: DataSpec, model: ModelSpec) -> ArraySource:
    if data.source == "sklearn":
        X, y, classification = sklearn_dataset(data.name)
        origin = f"sklearn dataset {data.name!r}"
    else:
        X, y, classification = synthetic_dataset(data, model.seed)
        origin = f"synthetic {data.name} data"
    if classification != (model.loss == "cross_entropy"):
        kind = "class labels" if classification else "real-valued targets"
        raise DataError(f"model.loss = {model.loss} does not suit {origin}, which has {kind}")
    return _array_source(X, y, classification, origin)


# -- .npy: memory-mapped -------------------------------------------------------------------------
@dataclass(eq=False)
class NpySource(Source):
    path: str  # features then the n_targets target columns

    def _raw_chunks(self, rows, chunk_rows):
        # Mapped pages that were touched count in RSS until unmapped, and the kernel maps the pages around
        # each one it faults in: a chunk is also cut where its rows span more than a chunk's bytes of the file
        # (a sparse set of rows, a validation slice, would map the whole file), and its map is dropped after
        # the copy, keeping the resident part of the file to about one chunk.
        span = max(chunk_rows, CHUNK_BYTES // max(1, self.nbytes_per_row))
        for pos, run in _spans(rows, chunk_rows, span):
            table = np.load(self.path, mmap_mode="r", allow_pickle=False)
            block = np.asarray(table[run])  # a copy: fancy indexing
            del table
            yield pos, block[:, : self.n_features], block[:, self.n_features :]


def _open_npy(path: Path, origin: str, n_targets: int, classification: bool) -> NpySource:
    table = np.load(path, mmap_mode="r", allow_pickle=False)
    shape, dtype = table.shape, table.dtype
    del table
    if not np.issubdtype(dtype, np.number):
        raise DataError(f"{origin}: the table must be numeric, got dtype {dtype}")
    if len(shape) != 2 or shape[1] <= n_targets:
        raise DataError(f"{origin}: expected a 2-D table of features then {n_targets} target column(s), got {shape}")
    _check_n(shape[0], origin)
    return NpySource(
        origin=origin,
        n=shape[0],
        n_features=shape[1] - n_targets,
        n_targets=n_targets,
        classification=classification,
        nbytes_per_row=dtype.itemsize * shape[1],
        path=str(path),
    )


# -- .parquet: by row groups through pyarrow -----------------------------------------------------
@dataclass(eq=False)
class ParquetSource(Source):
    filesystem: object  # a pyarrow.fs.FileSystem
    files: list[str]
    group_file: np.ndarray  # per row group: index into files
    group_index: np.ndarray  # per row group: its number within its file
    group_starts: np.ndarray  # global row of each row group's first row, then n
    features: list[str]  # column names
    targets: list[str]

    def column_groups(self) -> list[tuple[int, int, Source]]:
        # Each column being read holds buffers of its own (a few hundred KB): 784 at once cost ~250 MB.
        return [
            (lo, min(lo + COLUMNS_PER_READ, self.n_features),
             replace(self, features=self.features[lo : lo + COLUMNS_PER_READ],
                     n_features=len(self.features[lo : lo + COLUMNS_PER_READ])))
            for lo in range(0, self.n_features, COLUMNS_PER_READ)
        ]

    def _raw_chunks(self, rows, chunk_rows):
        pa, pq, _ = _pyarrow(self.origin)
        first = np.searchsorted(rows, self.group_starts)  # rows[first[g] : first[g + 1]] lie in row group g
        needed = np.flatnonzero(np.diff(first))
        try:
            for f in np.unique(self.group_file[needed]):
                with self.filesystem.open_input_file(self.files[f]) as handle:
                    parquet = pq.ParquetFile(handle, pre_buffer=False)
                    for g in needed[self.group_file[needed] == f]:
                        yield from self._group_chunks(parquet, g, rows, first[g], first[g + 1], chunk_rows)
                        _release_free_memory()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.origin}: cannot read data ({type(e).__name__}: {e})") from None

    def _group_chunks(self, parquet, g: int, rows: np.ndarray, lo: int, hi: int, chunk_rows: int):
        start = self.group_starts[g]
        batches = parquet.iter_batches(
            batch_size=chunk_rows, row_groups=[int(self.group_index[g])], columns=self.features + self.targets,
            use_threads=False,
        )
        for batch in batches:
            stop = lo + np.searchsorted(rows[lo:hi], start + batch.num_rows)
            if stop > lo:
                local = rows[lo:stop] - start
                yield int(lo), _columns(batch, self.features, local), _columns(batch, self.targets, local)
            lo, start = stop, start + batch.num_rows


def _release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it after a row group's many mid-sized buffers,
    and RSS would stay at the streaming pass's peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to do
        pass


def _columns(batch, names: list[str], local: np.ndarray) -> np.ndarray:
    """The named columns at these rows of the batch, filled into one array: no list of columns to stack."""
    first = batch.column(names[0]).to_numpy(zero_copy_only=False)
    out = np.empty((len(local), len(names)), dtype=np.result_type(first.dtype, np.float32))
    out[:, 0] = first[local]
    for j, name in enumerate(names[1:], start=1):
        out[:, j] = batch.column(name).to_numpy(zero_copy_only=False)[local]
    return out


def _pyarrow(origin: str):
    try:
        import pyarrow as pa
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{origin}: reading .parquet needs pyarrow (pip install 'polyak[parquet]')") from None
    # Arrow's own allocator keeps freed batches for reuse, so a streaming pass would hold its peak for good;
    # the system allocator hands big blocks back at once.
    pa.set_memory_pool(pa.system_memory_pool())
    return pa, pq, pafs


def _parquet_files(filesystem, root: str, origin: str) -> list[str]:
    _, _, pafs = _pyarrow(origin)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [root]
    # Names starting with "_" or "." are writers' metadata and checksums (_SUCCESS, .part-0.parquet.crc).
    files = sorted(
        f.path
        for f in filesystem.get_file_info(pafs.FileSelector(root))
        if f.is_file and f.base_name.endswith(".parquet") and not f.base_name.startswith(("_", "."))
    )
    if not files:
        raise DataError(f"{origin}: the directory holds no .parquet files")
    return files


def _open_parquet(filesystem, root: str, origin: str, target, n_targets: int, classification: bool):
    pa, pq, _ = _pyarrow(origin)
    files = _parquet_files(filesystem, root, origin)
    schema, group_file, group_index, group_rows = None, [], [], []
    try:
        for i, path in enumerate(files):
            with filesystem.open_input_file(path) as handle:
                parquet = pq.ParquetFile(handle)
                meta, file_schema = parquet.metadata, parquet.schema_arrow.remove_metadata()
            if schema is None:
                schema = file_schema
            elif not file_schema.equals(schema):
                raise DataError(f"{origin}: {_schema_difference(files[0], schema, path, file_schema)}")
            group_file += [i] * meta.num_row_groups
            group_index += range(meta.num_row_groups)
            group_rows += [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{origin}: cannot read data ({type(e).__name__}: {e})") from None
    for field in schema:
        if not (pa.types.is_integer(field.type) or pa.types.is_floating(field.type)):
            raise DataError(
                f"{origin}: column {field.name!r} has type {field.type}; every column must be numeric "
                "(integer or floating point)"
            )
    features, targets = _split_columns(schema.names, target, n_targets, origin)
    starts = np.concatenate([[0], np.cumsum(group_rows, dtype=np.int64)])
    _check_n(int(starts[-1]), origin)
    return ParquetSource(
        origin=origin,
        n=int(starts[-1]),
        n_features=len(features),
        n_targets=len(targets),
        classification=classification,
        nbytes_per_row=sum(field.type.bit_width // 8 for field in schema),
        filesystem=filesystem,
        files=files,
        group_file=np.array(group_file, np.int64),
        group_index=np.array(group_index, np.int64),
        group_starts=starts,
        features=[schema.names[i] for i in features],
        targets=[schema.names[i] for i in targets],
    )


def _schema_difference(path_a: str, a, path_b: str, b) -> str:
    fields_a, fields_b = [f"{f.name}: {f.type}" for f in a], [f"{f.name}: {f.type}" for f in b]
    for i, (fa, fb) in enumerate(zip(fields_a, fields_b, strict=False)):
        if fa != fb:
            return f"files differ in column {i}: {fa!r} in {path_a} but {fb!r} in {path_b}"
    return f"files differ in their columns: {len(fields_a)} in {path_a} but {len(fields_b)} in {path_b}"


# -- shared checks -------------------------------------------------------------------------------
def _check_n(n: int, origin: str) -> None:
    if n < 2:
        raise DataError(f"{origin}: needs at least 2 samples, got {n}")


def _split_columns(names: list, target, n_targets: int, origin: str) -> tuple[list[int], list[int]]:
    """(feature, target) column indices: ``target`` names the target columns, or None for the last ones."""
    if target is None:
        if len(names) <= n_targets:
            raise DataError(
                f"{origin}: expected feature columns then {n_targets} target column(s), got {len(names)} column(s)"
            )
        return list(range(len(names) - n_targets)), list(range(len(names) - n_targets, len(names)))
    wanted = [target] if isinstance(target, str) else list(target)
    for name in wanted:
        if name not in names:
            raise DataError(
                f"data.target: column {name!r} is not in {origin}; it has columns {', '.join(map(str, names))}"
            )
    targets = [names.index(name) for name in wanted]
    features = [i for i in range(len(names)) if i not in targets]
    if not features:
        raise DataError(f"{origin}: data.target names every column; no feature columns are left")
    return features, targets


def _n_targets(data: DataSpec, model: ModelSpec, origin: str) -> int:
    if data.target is None:
        return 1 if model.loss == "cross_entropy" else model.layers[-1]
    n = 1 if isinstance(data.target, str) else len(data.target)
    if model.loss == "cross_entropy" and n != 1:
        raise DataError(f"{origin}: cross_entropy needs one target column of class ids; data.target names {n}")
    return n


# -- opening -------------------------------------------------------------------------------------
def open_source(data: DataSpec, model: ModelSpec) -> Source:
    """The source the spec names, opened: metadata only for .npy and .parquet, whole for the rest."""
    if data.source != "file":
        if data.target is not None:
            raise DataError(f"data.target = {data.target!r} names columns, but only .parquet and .csv files have any")
        return _in_memory(data, model)
    origin, classification = data.path, model.loss == "cross_entropy"
    n_targets = _n_targets(data, model, origin)
    if is_uri(origin):
        return _open_uri(origin, data.target, n_targets, classification)
    path = Path(origin)
    if not path.exists():
        raise DataError(f"data.path: {os.path.abspath(path)} does not exist")
    if path.is_dir() or path.suffix == ".parquet":
        _, _, pafs = _pyarrow(origin)
        return _open_parquet(
            pafs.LocalFileSystem(), os.path.abspath(path), origin, data.target, n_targets, classification
        )
    if data.target is not None and path.suffix in (".npy", ".npz"):
        raise DataError(
            f"data.target = {data.target!r} names columns, but {origin} has none; "
            "leave it null (.npy: the targets are the last column(s); .npz: array y)"
        )
    try:
        if path.suffix == ".npy":
            return _open_npy(path, origin, n_targets, classification)
        if path.suffix == ".npz":
            return _open_npz(path, origin, classification)
        if path.suffix == ".csv":
            return _open_csv(path, origin, data.target, n_targets, classification)
    except DataError:
        raise
    except Exception as e:  # numpy raises many types for a corrupt file; the message is what matters
        raise DataError(f"{origin}: cannot read data ({type(e).__name__}: {e})") from None
    raise DataError(f"{origin}: unsupported file type {path.suffix!r}; {_UNSUPPORTED}")


def _open_uri(uri: str, target, n_targets: int, classification: bool) -> ParquetSource:
    pa, _, pafs = _pyarrow(uri)
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
    return _open_parquet(filesystem, root, uri, target, n_targets, classification)


# -- statistics ----------------------------------------------------------------------------------
def feature_stats(source: Source, rows: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the features over ``rows`` in one streaming pass, float64, a group of columns at a time
    (statistics are per column; a columnar source reads each column once either way). Each chunk's mean and
    sum of squared deviations (M2) are merged with Chan et al.'s parallel formula: a sum of squares minus the
    squared mean would cancel catastrophically for features far from 0. std is the population std (ddof=0);
    a constant feature gets std 1.0, so it standardizes to 0 instead of NaN."""
    parts = [_column_stats(group, rows, chunk_rows) for _, _, group in source.column_groups()]
    return np.concatenate([m for m, _ in parts]), np.concatenate([s for _, s in parts])


def _column_stats(source: Source, rows: np.ndarray, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    count, mean, m2, shift = 0, np.zeros(source.n_features), np.zeros(source.n_features), None
    for _, X, _ in source.chunks(rows, np.float64, chunk_rows):
        # Merging chunk means of size |x| carries their rounding (eps * |x|) into M2 through the mean
        # differences; data shifted by a value near the mean has small chunk means, so the merge keeps float64's
        # digits even for a feature like 1e6 + N(0, 1). (x - shift rounds relative to the small difference.)
        shift = X.mean(axis=0) if shift is None else shift
        X -= shift  # in place: each chunk is a fresh float64 copy, and there is no room for three of them
        n_b, mean_b = len(X), X.mean(axis=0)
        X -= mean_b
        X *= X
        m2_b = X.sum(axis=0)
        delta, total = mean_b - mean, count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta**2 * (count * n_b / total)
        count = total
    if count == 0:
        raise ValueError(f"{source.origin}: feature statistics need at least one row")
    std = np.sqrt(m2 / count)
    std[std == 0] = 1.0
    return shift + mean, std
