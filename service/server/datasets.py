"""Uploaded datasets: arrays sent to the service instead of files it can read, kept in ``<data dir>/datasets/``.

An upload is a ``.npy`` table (features, then the target column(s): what ``Client.upload(X, y)`` sends) or a
``.parquet`` file, streamed to a temporary file while its SHA-256 is computed, checked (a 2-D numeric table; a
readable parquet file with numeric columns), and then renamed to ``<sha256>.npy|.parquet``: the same bytes are
stored once, under the name of their content. Nothing but the finished file is ever named so: an upload cut off,
too big or unreadable leaves nothing behind. A spec names one as ``data: {source: dataset, name: <sha256>}``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from polyak.contract.errors import BadInput
from polyak.contract.wire import DatasetInfo
from polyak.service.server.store import StoreUnavailable

FORMATS = {"npy": ".npy", "parquet": ".parquet"}


class DatasetTooLarge(BadInput):
    """An upload over the server's limit (413)."""


class BadDataset(BadInput):
    """An upload that is not a usable table (422)."""


class DatasetStore:
    """The datasets folder: save an upload, list, look up, delete."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        folder.mkdir(parents=True, exist_ok=True)
        for left in folder.glob(".upload-*"):  # a server killed mid-upload
            left.unlink(missing_ok=True)

    async def save(self, chunks: AsyncIterator[bytes], fmt: str) -> tuple[DatasetInfo, bool]:
        """Store the upload; its info, and whether it was new (False: the same bytes were there already)."""
        if fmt not in FORMATS:
            raise BadDataset(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".upload-")
            digest = await self._receive(chunks, fd)
            info = describe(Path(tmp), fmt, digest)
            target = self.path(digest, fmt)
            if target.exists():
                return self.info(digest), False
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
            return info, True
        except OSError as e:  # a full or read-only data dir: the temporary file goes, no dataset is named
            raise StoreUnavailable(f"cannot store the upload in {self.folder}: {e.strerror or e}") from None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    async def _receive(self, chunks: AsyncIterator[bytes], fd: int) -> str:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_bytes:
                    raise DatasetTooLarge(f"the upload is over the server's limit of {self.max_bytes} bytes "
                                          "(polyak serve --max-dataset-bytes)")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size == 0:
            raise BadDataset("the upload is empty: send a .npy table or a .parquet file")
        return digest.hexdigest()

    def path(self, dataset_id: str, fmt: str | None = None) -> Path:
        if fmt is not None:
            return self.folder / f"{dataset_id}{FORMATS[fmt]}"
        found = self._find(dataset_id)
        if found is None:
            raise KeyError(dataset_id)
        return found

    def _find(self, dataset_id: str) -> Path | None:
        return next((p for p in (self.folder / f"{dataset_id}{ext}" for ext in FORMATS.values()) if p.is_file()),
                    None)

    def info(self, dataset_id: str) -> DatasetInfo:
        path = self.path(dataset_id)
        return describe(path, path.suffix.lstrip("."), dataset_id)

    def list(self) -> list[DatasetInfo]:
        found = [p for ext in FORMATS.values() for p in self.folder.glob(f"*{ext}")]
        return sorted((describe(p, p.suffix.lstrip("."), p.stem) for p in found), key=lambda d: d.created_at,
                      reverse=True)

    def delete(self, dataset_id: str) -> None:
        path = self.path(dataset_id)
        try:
            path.unlink()
        except OSError as e:
            raise StoreUnavailable(f"cannot delete {path}: {e.strerror or e}") from None


def describe(path: Path, fmt: str, dataset_id: str) -> DatasetInfo:
    """What a stored (or just received) file holds; BadDataset when it is no usable table."""
    rows, columns = _npy_shape(path) if fmt == "npy" else _parquet_shape(path)
    stat = path.stat()
    return DatasetInfo(id=dataset_id, format=fmt, bytes=stat.st_size, rows=rows, columns=columns,
                       created_at=datetime.fromtimestamp(stat.st_mtime, timezone.utc))


def _npy_shape(path: Path) -> tuple[int, int]:
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)  # the header only, never the data
    except (ValueError, OSError, SyntaxError) as e:
        raise BadDataset(f"not a .npy file: {e}") from None
    if len(shape) != 2 or not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise BadDataset(f"a .npy dataset is a 2-D real table (features, then the target column(s)); "
                         f"this one has shape {shape} and dtype {dtype}")
    if shape[0] < 2 or shape[1] < 2:
        raise BadDataset(f"a .npy dataset needs at least 2 rows and 2 columns, got shape {shape}")
    return int(shape[0]), int(shape[1])


def _parquet_shape(path: Path) -> tuple[int, int]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BadDataset("this server cannot read .parquet (pyarrow is not installed): send a .npy table") from None
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow's errors for a file that is not parquet
        raise BadDataset(f"not a readable .parquet file: {type(e).__name__}") from None
    return int(meta.num_rows), int(meta.num_columns)
