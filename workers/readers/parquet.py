"""``.parquet``: a file, a directory of ``.parquet`` files (one dataset, files in name order), or a URI that
``pyarrow.fs`` opens (``s3://``, ``gs://``, ``file://``), read in part: opening reads metadata only, and
``read(rows)`` decodes only the row groups holding those rows. Targets are the ``data.target`` column(s), else
the last column(s)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace

import numpy as np

from polyak.contract.errors import DataError
from polyak.workers.readers.columns import check_column_type
from polyak.workers.readers.source import Source, split_columns

COLUMNS_PER_READ = 64


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
        pa, pq, _ = pyarrow_modules(self.origin)
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
    if not names:  # the targets of a file to predict on: none
        return np.empty((len(local), 0))
    first = batch.column(names[0]).to_numpy(zero_copy_only=False)
    out = np.empty((len(local), len(names)), dtype=np.result_type(first.dtype, np.float32))
    out[:, 0] = first[local]
    for j, name in enumerate(names[1:], start=1):
        out[:, j] = batch.column(name).to_numpy(zero_copy_only=False)[local]
    return out


def pyarrow_modules(origin: str):
    """(pyarrow, pyarrow.parquet, pyarrow.fs), or a DataError naming the extra that installs them."""
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
    _, _, pafs = pyarrow_modules(origin)
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


def open_parquet(filesystem, root: str, origin: str, target, n_targets: int, classification: bool) -> ParquetSource:
    """The dataset's schema and row groups from its files' metadata: no row is read."""
    pa, pq, _ = pyarrow_modules(origin)
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
        check_column_type(pa, origin, field.name, field.type)
    features, targets = split_columns(schema.names, target, n_targets, origin)
    starts = np.concatenate([[0], np.cumsum(group_rows, dtype=np.int64)])
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
