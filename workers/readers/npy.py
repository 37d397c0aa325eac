"""``.npy``: a 2-D numeric table, features then target column(s), read in part through a memory map."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polyak.contract.errors import DataError
from polyak.workers.readers.source import CHUNK_BYTES, Source


@dataclass(eq=False)
class NpySource(Source):
    path: str  # features then the n_targets target columns

    def _raw_chunks(self, rows, chunk_rows):
        # Mapped pages that were touched count in RSS until unmapped, and the kernel maps the pages around
        # each one it faults in: a chunk is also cut where its rows span more than a chunk's bytes of the file
        # (a sparse set of rows, a validation slice, would map the whole file), and its map is dropped after
        # the copy, keeping the resident part of the file to about one chunk.
        span = max(1, CHUNK_BYTES // max(1, self.nbytes_per_row))  # >= chunk_rows, which chunks() caps by it
        for pos, run in spans(rows, chunk_rows, span):
            table = np.load(self.path, mmap_mode="r", allow_pickle=False)
            block = np.asarray(table[run])  # a copy: fancy indexing
            del table
            yield pos, block[:, : self.n_features], block[:, self.n_features :]


def spans(rows: np.ndarray, chunk_rows: int, span: int) -> Iterator[tuple[int, np.ndarray]]:
    """Runs of at most ``chunk_rows`` sorted rows whose row numbers lie within ``span`` of the run's first."""
    pos = 0
    while pos < len(rows):
        end = min(pos + chunk_rows, int(np.searchsorted(rows, rows[pos] + span, side="left")))
        end = max(end, pos + 1)
        yield pos, rows[pos:end]
        pos = end


def open_npy(path: Path, origin: str, n_targets: int, classification: bool) -> NpySource:
    """The table's shape and dtype from its header: no row is read."""
    table = np.load(path, mmap_mode="r", allow_pickle=False)
    shape, dtype = table.shape, table.dtype
    del table
    if not np.issubdtype(dtype, np.number):
        raise DataError(f"{origin}: the table must be numeric, got dtype {dtype}")
    if len(shape) != 2 or shape[1] <= n_targets:
        raise DataError(f"{origin}: expected a 2-D table of features then {n_targets} target column(s), got {shape}")
    return NpySource(
        origin=origin,
        n=shape[0],
        n_features=shape[1] - n_targets,
        n_targets=n_targets,
        classification=classification,
        nbytes_per_row=dtype.itemsize * shape[1],
        path=str(path),
    )
