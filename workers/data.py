"""The seeded train/validation split, shards, standardization statistics, and loading a part of the data.

Which rows are validation rows and which shard a training row belongs to is a function of (seed, n,
validation_fraction, num_workers) alone, so a worker process given (spec, shard k of K) reads exactly its
own rows from the source itself (workers/readers/ reads .npy and .parquet in part): shards are never
shipped by the driver, and the driver never holds training rows. It holds a ``DataInfo``: shapes and the
standardization statistics, computed once in one streaming pass over the training rows.

Row numbering: training row i (what the trainer's batches name) is source row ``perm[n_val + i]``; shard k
holds training rows ``[b_k, b_{k+1})`` and keeps them in source order (what a reader reads fastest), so
the engine maps training row i to its position in its shard with ``ShardLayout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from polyak.contract.choices import SKLEARN_DATASETS
from polyak.contract.errors import DataError
from polyak.contract.spec import DataSpec, ModelSpec, is_uri
from polyak.workers.generated import has_class_labels
from polyak.workers.readers import open_source
from polyak.workers.readers.in_memory import origin_of
from polyak.workers.readers.source import ArraySource, Source, check_loss_suits
from polyak.workers.readers.stats import feature_stats


@dataclass(frozen=True)
class DataInfo:
    """What the driver knows of a job's data: shapes and statistics, never rows."""

    origin: str  # names the data in messages
    n_train: int
    n_val: int
    n_features: int
    n_targets: int
    classification: bool
    x_mean: np.ndarray | None = None  # (d,) float64 over the training rows, when data.standardize
    x_std: np.ndarray | None = None

    @property
    def stats(self) -> tuple[list[float], list[float]] | None:
        """The standardization statistics as plain lists (they travel in actor constructor arguments)."""
        return None if self.x_mean is None else (self.x_mean.tolist(), self.x_std.tolist())


@dataclass(frozen=True)
class Dataset:
    """A whole dataset in memory, training rows in training order: for small data and as the reference
    that the sharded path is tested against (``load_dataset``)."""

    X_train: np.ndarray  # (n, d)
    y_train: np.ndarray  # (n,) int class ids, or (n, k) float targets
    X_val: np.ndarray  # (n_val, d)
    y_val: np.ndarray
    classification: bool
    origin: str

    @property
    def n_train(self) -> int:
        return self.X_train.shape[0]

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]


# -- the split ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Validation rows and the training order of a source of n rows, from (seed, n, validation_fraction)."""

    seed: int
    n: int
    validation_fraction: float

    @cached_property
    def perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, 1]).permutation(self.n)

    @property
    def n_val(self) -> int:
        return int(round(self.validation_fraction * self.n))

    @property
    def n_train(self) -> int:
        return self.n - self.n_val

    def train_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Source rows of training rows [start, stop), in training order."""
        stop = self.n_train if stop is None else stop
        return self.perm[self.n_val + start : self.n_val + stop]

    def val_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.n_val if stop is None else stop
        return self.perm[start:stop]

    def check(self, origin: str) -> None:
        if self.validation_fraction > 0 and not 1 <= self.n_val < self.n:
            raise DataError(
                f"data.validation_fraction = {self.validation_fraction} leaves no training or no validation rows "
                f"of the {self.n} in {origin}",
                "data.validation_fraction",
            )


def split_of(data: DataSpec, model: ModelSpec, n: int) -> Split:
    return Split(model.seed, n, data.validation_fraction)


# -- what the driver holds -------------------------------------------------------------------------------
def check_fits(info: DataInfo, layers) -> None:
    """The first and last widths must match the data: both numbers go in the message."""
    if layers[0] != info.n_features:
        raise DataError(
            f"model.layers[0] = {layers[0]} but {info.origin} has {info.n_features} features per sample", "model.layers"
        )
    if not info.classification and info.n_targets != layers[-1]:
        raise DataError(
            f"model.layers[-1] = {layers[-1]} but {info.origin} has {info.n_targets} target column(s)", "model.layers"
        )


def check_labels(y: np.ndarray, layers, origin: str) -> None:
    """Class ids beyond the output layer; each part checks the labels it holds."""
    top = int(y.max(initial=0))
    if top >= layers[-1]:
        raise DataError(
            f"model.layers[-1] = {layers[-1]} outputs but {origin} has labels up to {top} "
            f"(labels must be in 0..{layers[-1] - 1})",
            "model.layers",
        )


def prepare(data: DataSpec, model: ModelSpec, source: Source | None = None) -> DataInfo:
    """Open the source (metadata only where the format allows), check it against the spec, and compute the
    standardization statistics in one streaming pass over the training rows. Holds no rows afterwards."""
    source = source or open_source(data, model)
    split = split_of(data, model, source.n)
    split.check(source.origin)
    mean = std = None
    if data.standardize:
        mean, std = feature_stats(source, np.sort(split.train_rows()))
    info = DataInfo(source.origin, split.n_train, split.n_val, source.n_features, source.n_targets,
                    source.classification, mean, std)
    check_fits(info, model.layers)
    if isinstance(source, ArraySource) and info.classification:  # in memory anyway: check every label now
        check_labels(source.y, model.layers, source.origin)
    return info


def check_cheaply(data: DataSpec, model: ModelSpec) -> None:
    """The data's shape against the spec, where that costs next to nothing: synthetic data (from the spec),
    sklearn's bundled sets, a local .npy's header, .parquet metadata, an .npz's array headers. A .csv or a URI
    is checked when the job loads it. DataError names the field and both numbers."""
    if data.source == "dataset":
        open_source(data, model)  # says where a dataset can be used
    if data.source != "file":
        _check_generated(data, model)
        return
    path = data.path
    if is_uri(path) or path.endswith(".csv"):
        return
    if path.endswith(".npz"):
        shapes = npz_shapes(path)
        if "X" in shapes and len(shapes["X"]) == 2 and shapes["X"][1] != model.layers[0]:
            raise DataError(
                f"model.layers[0] = {model.layers[0]} but {path} has {shapes['X'][1]} features per sample",
                "model.layers",
            )
        return
    source = open_source(data, model)  # .npy / .parquet: metadata only
    check_fits(DataInfo(source.origin, source.n, 0, source.n_features, source.n_targets, source.classification),
               model.layers)


def _check_generated(data: DataSpec, model: ModelSpec) -> None:
    """Synthetic and sklearn data against the spec from their shapes alone: sklearn is not imported, and
    nothing is made."""
    origin, classification = origin_of(data), has_class_labels(data)
    check_loss_suits(model.loss, classification, origin)
    if data.source == "synthetic":
        check_fits(DataInfo(origin, 0, 0, data.n_features, 1, classification), model.layers)
        if classification and data.n_classes > model.layers[-1]:
            raise DataError(
                f"model.layers[-1] = {model.layers[-1]} outputs but data.n_classes = {data.n_classes}", "model.layers"
            )
        return
    d, classes = SKLEARN_DATASETS[data.name]
    check_fits(DataInfo(origin, 0, 0, d, 1, classification), model.layers)
    if classification and classes > model.layers[-1]:
        raise DataError(
            f"model.layers[-1] = {model.layers[-1]} outputs but {origin} has labels up to {classes - 1} "
            f"(labels must be in 0..{model.layers[-1] - 1})",
            "model.layers",
        )


def npz_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Each array's shape from its header alone (a member of an .npz is only decompressed when read)."""
    import zipfile

    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith(".npy"):
                    with archive.open(member) as f:
                        major, _ = np.lib.format.read_magic(f)
                        read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                       else np.lib.format.read_array_header_2_0)
                        shape, _, _ = read_header(f)
                        shapes[member.removesuffix(".npy")] = shape
    except (OSError, ValueError, zipfile.BadZipFile):
        return {}  # the loader reports what is wrong with the file
    return shapes


# -- what a worker (or the in-process engine) holds ------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """Rows of the data in memory, in source order, standardized, in the job's dtype."""

    X: np.ndarray  # (m, d)
    y: np.ndarray  # (m,) int64 class ids, or (m, k) in dtype


def load_part(source: Source, rows: np.ndarray, dtype, stats, layers) -> Part:
    """These source rows (any order; held sorted), read chunk by chunk into one array of ``dtype``:
    peak memory is the part plus one chunk in float64."""
    rows = np.sort(rows)
    X = np.empty((len(rows), source.n_features), dtype)
    y = np.empty(len(rows), np.int64) if source.classification else np.empty((len(rows), source.n_targets), dtype)
    mean, std = (None, None) if stats is None else (np.asarray(stats[0]), np.asarray(stats[1]))
    for first, end, columns in source.column_groups():
        for pos, X_chunk, y_chunk in columns.chunks(rows, np.float64 if stats is not None else dtype):
            if stats is not None:  # in place: the chunk is a fresh float64 copy
                X_chunk -= mean[first:end]
                X_chunk /= std[first:end]
            X[pos : pos + len(X_chunk), first:end] = X_chunk
            if first == 0:
                y[pos : pos + len(y_chunk)] = y_chunk
    if source.classification:
        check_labels(y, layers, source.origin)
    return Part(X, y)


def load_shard(data: DataSpec, model: ModelSpec, dtype, stats, shard: int, num_shards: int) -> tuple[Part, Part]:
    """(training part, validation part) of shard k of K, read by the caller itself from the source."""
    source = open_source(data, model)
    split = split_of(data, model, source.n)
    b = shard_bounds(split.n_train, num_shards)
    v = np.linspace(0, split.n_val, num_shards + 1).round().astype(np.int64)
    train = load_part(source, split.train_rows(b[shard], b[shard + 1]), dtype, stats, model.layers)
    val = load_part(source, split.val_rows(v[shard], v[shard + 1]), dtype, stats, model.layers)
    return train, val


@dataclass(frozen=True)
class ShardLayout:
    """Where each training row lives: its shard, and its position in that shard (which holds its rows in
    source order)."""

    bounds: np.ndarray  # (K + 1,) shard k = training rows [bounds[k], bounds[k + 1])
    position: np.ndarray  # (n_train,) training row -> position within its shard

    @classmethod
    def of(cls, data: DataSpec, model: ModelSpec, info: DataInfo, num_shards: int) -> ShardLayout:
        split = Split(model.seed, info.n_train + info.n_val, data.validation_fraction)
        bounds = shard_bounds(info.n_train, num_shards)
        position = np.empty(info.n_train, dtype=np.int64)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            order = np.argsort(split.train_rows(lo, hi), kind="stable")  # position j holds the j-th smallest row
            position[lo + order] = np.arange(hi - lo)
        return cls(bounds, position)

    def split_batch(self, batch: np.ndarray) -> list[np.ndarray]:
        """Each shard's positions of a batch's rows, in the batch's order."""
        shard_of = np.searchsorted(self.bounds, batch, side="right") - 1
        return [self.position[batch[shard_of == k]] for k in range(len(self.bounds) - 1)]


# -- the whole dataset in memory ---------------------------------------------------------------------------
def load_dataset(data: DataSpec, model: ModelSpec) -> Dataset:
    """Every row in memory, training rows in training order, standardized as the engines do: the reference
    the sharded path is tested against, and a convenience for small data. Engines never call it."""
    source = open_source(data, model)
    info = prepare(data, model, source)
    split = split_of(data, model, source.n)
    dtype = np.float64
    parts = []
    for rows in (split.train_rows(), split.val_rows()):
        part = load_part(source, rows, dtype, info.stats, model.layers)
        back = np.argsort(np.argsort(rows, kind="stable"), kind="stable")  # sorted position of each row
        parts.append((part.X[back], part.y[back]))
    (X_train, y_train), (X_val, y_val) = parts
    return Dataset(X_train, y_train, X_val, y_val, info.classification, info.origin)


def shard_bounds(n_train: int, num_shards: int) -> np.ndarray:
    """Row offsets of K contiguous shards of the (already shuffled) training set: shard k = [b[k], b[k+1])."""
    if num_shards < 1:
        raise ValueError(f"cluster.num_workers: must be >= 1 to shard, got {num_shards}")
    if num_shards > n_train:
        raise DataError(
            f"cluster.num_workers = {num_shards} is more than the {n_train} training samples", "cluster.num_workers"
        )
    return np.linspace(0, n_train, num_shards + 1).round().astype(np.int64)


