"""``.csv``: a table of numbers, optionally under a header row of column names, read by pyarrow's streaming CSV
reader a block at a time (never the file's text whole) into one array: a row's position is only known by reading
every row before it, so every process that reads it holds it whole. Targets are the ``data.target`` column(s),
else the last column(s). Text, categories and missing cells are refused with one line saying what to do."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from polyak.contract.errors import DataError
from polyak.workers.readers.columns import check_column_type, check_no_missing
from polyak.workers.readers.source import ArraySource, array_source, split_columns


def open_csv(path: Path, origin: str, target, n_targets: int, classification: bool) -> ArraySource:
    names, table = _read(path, origin)
    if names is None and target is not None:
        raise DataError(
            f"{origin}: data.target = {target!r} names columns, but the file has no header row", "data.target"
        )
    features, targets = split_columns(names or list(range(table.shape[1])), target, n_targets, origin)
    y = table[:, targets]
    return array_source(table[:, features], y[:, 0] if classification else y, classification, origin)


def _read(path: Path, origin: str) -> tuple[list[str] | None, np.ndarray]:
    """(column names, or None without a header row; the table as float64)."""
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
    except ImportError:
        raise DataError(f"{origin}: reading .csv needs pyarrow (pip install 'polyak[train]')") from None
    header = _has_header(path, origin)
    options = pacsv.ReadOptions(autogenerate_column_names=not header, block_size=1 << 22)
    try:
        reader = pacsv.open_csv(path, read_options=options)
        schema = reader.schema
        for field in schema:
            check_column_type(pa, origin, field.name, field.type)
        blocks, rows = [], 0
        for batch in reader:
            blocks.append(_numbers(origin, batch, rows))
            rows += batch.num_rows
    except pa.ArrowInvalid as e:
        # A value that is no number after rows that were (pyarrow typed the column by its first block). Its text
        # is the file's, which an error never quotes.
        where = str(e).split(":", 2)[:2]
        raise DataError(f"{origin}: {' '.join(w.strip() for w in where)} holds text where numbers were expected; "
                        f"every column must be numeric") from None
    table = np.concatenate(blocks) if blocks else np.empty((0, len(schema)))
    return (schema.names if header else None), table


def _numbers(origin: str, batch, first_row: int) -> np.ndarray:
    """The batch's cells as float64 (rows, columns); its rows are the file's from ``first_row`` on."""
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if column.null_count:
            missing = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
            check_no_missing(origin, name, column.null_count, first_row + int(missing[0]))
    return np.column_stack([c.to_numpy(zero_copy_only=False).astype(np.float64) for c in batch.columns])


def _has_header(path: Path, origin: str) -> bool:
    """A first row with any field that is not a number is a header of column names."""
    try:
        with open(path, newline="") as f:
            first = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{origin}: cannot read data ({type(e).__name__})") from None
    for field in first:
        try:
            float(field)
        except ValueError:
            return True
    return False
