"""workers/readers/: every format reads exactly the rows asked for, statistics stream, errors by content."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from polyak.contract.errors import DataError
from polyak.contract.spec import DataSpec, ModelSpec
from polyak.workers.readers import open_features, open_source
from polyak.workers.readers.source import CHUNK_ROWS
from polyak.workers.readers.stats import feature_stats

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["npy", "npz", "csv", "csv_header", "parquet", "parquet_dir", "parquet_uri"]


def open_file(path, layers, loss="mse", target=None):
    return open_source(DataSpec(source="file", path=str(path), target=target), ModelSpec(layers=layers, loss=loss))


def names(d: int, k: int) -> list[str]:
    return [f"f{j}" for j in range(d)] + [f"t{j}" for j in range(k)]


def write_parquet(path: Path, table: np.ndarray, columns: list[str], row_group_size: int = 7, int_columns=()):
    ints = [name in int_columns for name in columns]
    arrays = [pa.array(table[:, j].astype(np.int64) if ints[j] else table[:, j]) for j in range(len(columns))]
    pq.write_table(pa.table(arrays, names=columns), path, row_group_size=row_group_size)


def write(fmt: str, tmp_path: Path, table: np.ndarray, k: int, int_columns=()) -> str:
    """``table`` (features then k targets) stored as ``fmt``; returns the path or URI to open."""
    columns = names(table.shape[1] - k, k)
    if fmt == "npy":
        np.save(tmp_path / "t.npy", table)
        return str(tmp_path / "t.npy")
    if fmt == "npz":
        y = table[:, -1] if k == 1 else table[:, -k:]
        np.savez(tmp_path / "t.npz", X=table[:, :-k], y=y.astype(np.int64) if int_columns else y)
        return str(tmp_path / "t.npz")
    if fmt.startswith("csv"):
        header = ",".join(columns) if fmt == "csv_header" else ""
        np.savetxt(tmp_path / "t.csv", table, delimiter=",", header=header, comments="")
        return str(tmp_path / "t.csv")
    if fmt == "parquet":
        write_parquet(tmp_path / "t.parquet", table, columns, int_columns=int_columns)
        return str(tmp_path / "t.parquet")
    folder = tmp_path / "parts"
    folder.mkdir()
    # Written out of name order, and of unequal sizes, so that name order and file offsets both matter.
    for name, part in zip(["b.parquet", "a.parquet", "c.parquet"], np.split(table, [20, 33]), strict=True):
        write_parquet(folder / name, part, columns, int_columns=int_columns)
    (folder / "a.parquet").rename(folder / "tmp.parquet")
    (folder / "b.parquet").rename(folder / "a.parquet")
    (folder / "tmp.parquet").rename(folder / "b.parquet")
    (folder / "_SUCCESS").write_text("")  # a writer's marker file is not data
    return folder.as_uri() if fmt == "parquet_uri" else str(folder)


def subsets(n: int, rng) -> list[np.ndarray]:
    picks = [np.sort(rng.choice(n, size, replace=False)) for size in (1, 5, n // 3, n - 1)]
    return [np.array([], np.int64), np.arange(n), np.array([0, n - 1]), *picks]


# -- reading rows --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_read_returns_exactly_the_rows_asked_for(fmt, tmp_path):
    rng = np.random.default_rng(0)
    n, d, k = 50, 4, 2
    table = rng.standard_normal((n, d + k)) * 10
    source = open_file(write(fmt, tmp_path, table, k), [d, 8, k])
    assert (source.n, source.n_features, source.n_targets, source.classification) == (n, d, k, False)
    assert source.nbytes_per_row == 8 * (d + k)
    for rows in subsets(n, rng):
        X, y = source.read(rows)
        assert X.dtype == y.dtype == np.float64 and X.shape == (len(rows), d) and y.shape == (len(rows), k)
        np.testing.assert_array_equal(X, table[rows, :d])
        np.testing.assert_array_equal(y, table[rows, d:])
        X32, y32 = source.read(rows, np.float32)
        assert X32.dtype == y32.dtype == np.float32
        np.testing.assert_array_equal(X32, table[rows, :d].astype(np.float32))
        np.testing.assert_array_equal(y32, table[rows, d:].astype(np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_class_ids_come_back_as_int64(fmt, tmp_path):
    rng = np.random.default_rng(1)
    n, d = 40, 3
    labels = rng.integers(0, 5, n)
    table = np.column_stack([rng.standard_normal((n, d)), labels])
    source = open_file(write(fmt, tmp_path, table, 1, int_columns=["t0"]), [d, 5], loss="cross_entropy")
    assert (source.n, source.n_features, source.n_targets, source.classification) == (n, d, 1, True)
    rows = np.sort(rng.choice(n, 17, replace=False))
    X, y = source.read(rows, np.float32)
    assert y.dtype == np.int64 and y.shape == (17,)
    np.testing.assert_array_equal(y, labels[rows])
    np.testing.assert_array_equal(X, table[rows, :d].astype(np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_to_predict_on_is_features_only(fmt, tmp_path):
    """`polyak predict`'s DATA: every column a feature (an .npz's X), through the readers training uses."""
    table = np.random.default_rng(8).standard_normal((50, 4))
    source = open_features(write(fmt, tmp_path, table, 1))  # .npz: X is the first 3 columns, y the last
    expected = table[:, :3] if fmt == "npz" else table
    assert (source.n, source.n_features, source.n_targets, source.classification) == (50, expected.shape[1], 0, False)
    rows = np.array([0, 7, 8, 30, 49])
    X, y = source.read(rows)
    np.testing.assert_array_equal(X, expected[rows])
    assert y.shape == (5, 0)


@pytest.mark.parametrize("fmt", ["npy", "parquet", "parquet_dir"])
def test_chunks_cover_the_rows_in_order(fmt, tmp_path):
    rng = np.random.default_rng(2)
    table = rng.standard_normal((50, 3))
    source = open_file(write(fmt, tmp_path, table, 1), [2, 1])
    rows = np.sort(rng.choice(50, 31, replace=False))
    chunks = list(source.chunks(rows, chunk_rows=3))
    assert all(len(X) <= 3 for _, X, _ in chunks)
    assert [pos for pos, _, _ in chunks] == list(np.cumsum([0] + [len(X) for _, X, _ in chunks])[:-1])
    np.testing.assert_array_equal(np.concatenate([X for _, X, _ in chunks]), table[rows, :2])


def test_parquet_decodes_only_the_row_groups_holding_requested_rows(tmp_path, monkeypatch):
    table = np.arange(50 * 3, dtype=np.float64).reshape(50, 3)
    source = open_file(write("parquet_dir", tmp_path, table, 1), [2, 1])
    assert source.group_starts.tolist() == [0, 7, 14, 20, 27, 33, 40, 47, 50]  # files of 20, 13, 17 rows
    asked = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        asked.append((kwargs["row_groups"], kwargs["columns"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    X, _ = source.read(np.array([3, 22, 41, 49]))
    np.testing.assert_array_equal(X[:, 0], [9, 66, 123, 147])
    assert [groups for groups, _ in asked] == [[0], [0], [1], [2]]  # row 3 in a, 22 in b, 41 and 49 in c
    assert all(columns == ["f0", "f1", "t0"] for _, columns in asked)


@pytest.mark.parametrize("fmt", ["npy", "csv", "parquet_uri"])
def test_an_opened_source_pickles(fmt, tmp_path):
    table = np.random.default_rng(7).standard_normal((50, 3))
    source = pickle.loads(pickle.dumps(open_file(write(fmt, tmp_path, table, 1), [2, 1])))
    np.testing.assert_array_equal(source.read(np.arange(10, 40))[0], table[10:40, :2])


def test_rows_must_be_sorted_unique_and_in_range(tmp_path):
    source = open_file(write("npy", tmp_path, np.zeros((10, 3)), 1), [2, 1])
    for rows in ([3, 1], [1, 1], [-1, 2], [9, 10], [[1, 2]]):
        with pytest.raises(ValueError, match=r"sorted, unique row numbers in \[0, 10\)"):
            source.read(np.array(rows))


def test_sklearn_source_reads_the_dataset():
    from sklearn.datasets import load_iris

    X_ref, y_ref = load_iris(return_X_y=True)
    source = open_source(DataSpec(source="sklearn", name="iris"), ModelSpec(layers=[4, 3]))
    assert (source.origin, source.n, source.n_features) == ("sklearn dataset 'iris'", 150, 4) and source.classification
    rows = np.arange(0, 150, 3)
    X, y = source.read(rows)
    np.testing.assert_array_equal(X, X_ref[rows])
    np.testing.assert_array_equal(y, y_ref[rows])
    with pytest.raises(DataError, match="model.loss = mse does not suit sklearn dataset 'iris', which has class label"):
        open_source(DataSpec(source="sklearn", name="iris"), ModelSpec(layers=[4, 3], loss="mse"))


def test_synthetic_source_has_the_spec_shape():
    data = DataSpec(source="synthetic", name="regression", n_samples=30, n_features=4)
    source = open_source(data, ModelSpec(layers=[4, 1], loss="mse"))
    X, y = source.read(np.arange(30))
    assert X.shape == (30, 4) and y.shape == (30, 1) and not source.classification


# -- target columns by name ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csv_header", "parquet", "parquet_uri"])
def test_target_names_the_target_columns(fmt, tmp_path):
    rng = np.random.default_rng(3)
    table = rng.standard_normal((30, 5))  # columns f0 f1 f2 t0 t1
    table[:, 1] = rng.integers(0, 3, 30)
    path = write(fmt, tmp_path, table, 2, int_columns=["f1"])
    one = open_file(path, [4, 3], loss="cross_entropy", target="f1")
    assert one.n_features == 4 and one.n_targets == 1
    X, y = one.read(np.arange(30))
    np.testing.assert_array_equal(X, table[:, [0, 2, 3, 4]])  # the other columns, in schema order
    np.testing.assert_array_equal(y, table[:, 1].astype(np.int64))
    two = open_file(path, [3, 2], target=["t1", "f0"])
    X, y = two.read(np.arange(30))
    np.testing.assert_array_equal(X, table[:, [1, 2, 3]])
    np.testing.assert_array_equal(y, table[:, [4, 0]])  # in the order named
    with pytest.raises(DataError, match=r"data.target: column 'zzz' is not in .*; it has columns f0, f1, f2, t0, t1"):
        open_file(path, [4, 1], target=["t0", "zzz"])
    with pytest.raises(DataError, match="cross_entropy needs one target column of class ids; data.target names 2"):
        open_file(path, [3, 3], loss="cross_entropy", target=["t0", "t1"])


def test_target_on_a_source_without_column_names_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"data.target = 't0' names columns, but .*t.npy has none; leave it null"):
        open_file(write("npy", tmp_path, np.zeros((5, 3)), 1), [2, 1], target="t0")
    with pytest.raises(DataError, match="data.target = 'f0' names columns, but the file has no header row"):
        open_file(write("csv", tmp_path, np.zeros((5, 3)), 1), [2, 1], target="f0")
    with pytest.raises(DataError, match="only .parquet and .csv files have any"):
        open_source(DataSpec(source="sklearn", name="iris", target="x"), ModelSpec(layers=[4, 3]))


# -- feature statistics --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["npy", "parquet", "parquet_dir"])
@pytest.mark.parametrize("chunk_rows", [5, CHUNK_ROWS])
def test_feature_stats_match_numpy_even_far_from_zero(fmt, chunk_rows, tmp_path):
    rng = np.random.default_rng(4)
    n = 50
    # A feature at 1e6 + N(0, 1): E[x^2] - E[x]^2 loses about 12 of float64's 16 digits to cancellation.
    table = np.column_stack(
        [1e6 + rng.standard_normal(n), rng.standard_normal(n) * 1e-3, np.full(n, 7.0), rng.standard_normal(n)]
    )
    source = open_file(write(fmt, tmp_path, table, 1), [3, 1])
    rows = np.sort(rng.choice(n, 37, replace=False))
    mean, std = feature_stats(source, rows, chunk_rows=chunk_rows)
    X = table[rows, :3]
    np.testing.assert_allclose(mean, X.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std[:2], X[:, :2].std(axis=0), rtol=1e-12)
    assert std[2] == 1.0 and mean[2] == 7.0  # constant: standardizes to 0, not NaN
    naive = np.sqrt(np.abs((X[:, 0] ** 2).mean() - X[:, 0].mean() ** 2))
    assert abs(naive / X[:, 0].std() - 1) > 1e-9  # the reference above would catch the naive formula


def test_feature_stats_need_rows(tmp_path):
    source = open_file(write("npy", tmp_path, np.zeros((5, 3)), 1), [2, 1])
    with pytest.raises(ValueError, match="at least one row"):
        feature_stats(source, np.array([], np.int64))


# -- errors --------------------------------------------------------------------------------------
def test_missing_path_shows_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=re.escape(f"data.path: {tmp_path / 'nope.npy'} does not exist")):
        open_file("nope.npy", [2, 1])
    with pytest.raises(DataError, match=re.escape(f"data.path: {(tmp_path / 'gone').as_uri()} does not exist")):
        open_file((tmp_path / "gone").as_uri(), [2, 1])


def test_unsupported_file_type(tmp_path):
    (tmp_path / "data.xyz").write_text("1,2\n")
    message = "data.xyz: unsupported file type '.xyz'; use .npy, .parquet (read in part), .npz or .csv (read whole)"
    with pytest.raises(DataError, match=re.escape(message)):
        open_file(tmp_path / "data.xyz", [1, 1])
    np.save(tmp_path / "t.npy", np.zeros((4, 2)))
    with pytest.raises(DataError, match="unsupported file type '.npy'; a URI names .parquet data"):
        open_file((tmp_path / "t.npy").as_uri(), [1, 1])


def test_npz_needs_x_and_y(tmp_path):
    np.savez(tmp_path / "a.npz", X=np.zeros((4, 2)))
    with pytest.raises(DataError, match=r"a.npz: .npz needs arrays X and y; missing y \(has \['X'\]\)"):
        open_file(tmp_path / "a.npz", [2, 1])


def test_a_corrupt_file_is_a_data_error(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="bad.npy: cannot read data"):
        open_file(tmp_path / "bad.npy", [1, 1])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read data"):
        open_file(tmp_path / "bad.parquet", [1, 1])


def test_table_shape_errors(tmp_path):
    with pytest.raises(DataError, match=r"expected a 2-D table of features then 2 target column\(s\), got \(10, 2\)"):
        open_file(write("npy", tmp_path, np.zeros((10, 2)), 1), [1, 2])
    with pytest.raises(DataError, match=r"expected feature columns then 2 target column\(s\), got 2 column\(s\)"):
        open_file(write("parquet", tmp_path, np.zeros((10, 2)), 1), [1, 2])
    with pytest.raises(DataError, match="needs at least 2 samples, got 1"):
        open_file(write("csv", tmp_path, np.zeros((1, 2)), 1), [1, 1])
    np.save(tmp_path / "b.npy", np.zeros((4, 3), dtype=bool))
    with pytest.raises(DataError, match="b.npy: the table must be numeric, got dtype bool"):
        open_file(tmp_path / "b.npy", [2, 1])


@pytest.mark.parametrize("fmt", ["npy", "npz", "csv", "parquet", "parquet_dir"])
def test_bad_values_are_reported_by_their_global_row(fmt, tmp_path):
    table = np.random.default_rng(5).standard_normal((50, 3))
    table[:, 2] = np.arange(50) % 3
    table[34, 1] = np.nan
    table[41, 2] = 1.5
    table[45, 2] = -2
    if fmt == "csv":  # a text file's NaN is a missing cell, refused when the file is read
        with pytest.raises(DataError, match=r"column 'f1' has 1 missing cell\(s\) \(first in row 34\); fill or drop"):
            open_file(write(fmt, tmp_path, table, 1), [2, 3], loss="cross_entropy")
        table[34, 1] = 0.0
    source = open_file(write(fmt, tmp_path, table, 1), [2, 3], loss="cross_entropy")
    source.read(np.array([0, 33, 35, 40]))  # validation is of the rows read
    if fmt != "csv":
        with pytest.raises(DataError, match=r"X has NaN or inf values \(first in row 34\)"):
            source.read(np.arange(20, 50))
    with pytest.raises(DataError, match=r"cross_entropy needs integer class ids in y, found fractional .* row 41\)"):
        source.read(np.arange(35, 50))
    with pytest.raises(DataError, match=r"labels must be in 0..k-1, found a negative one \(first in row 45\)"):
        source.read(np.array([44, 45, 46]))


def test_non_finite_targets_and_float32_overflow(tmp_path):
    table = np.ones((20, 3))
    table[12, 2] = np.inf
    table[7, 0] = 1e300
    source = open_file(write("npy", tmp_path, table, 1), [2, 1])
    with pytest.raises(DataError, match=r"y has NaN or inf values \(first in row 12\)"):
        source.read(np.arange(10, 20))
    source.read(np.arange(10))
    with pytest.raises(DataError, match=r"X has NaN or inf values \(first in row 7\)"):
        source.read(np.arange(10), np.float32)


def test_parquet_errors(tmp_path, monkeypatch):
    table = pa.table({"a": [1.0, 2.0, 3.0], "name": ["x", "y", "z"], "t": [0.0, 1.0, 2.0]})
    pq.write_table(table, tmp_path / "s.parquet")
    with pytest.raises(DataError, match="s.parquet: column 'name' holds text, not numbers; encode it first: "
                                         "OneHotEncoder"):
        open_file(tmp_path / "s.parquet", [2, 1])

    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(pa.table({"a": [1.0, 2.0], "t": [0.0, 1.0]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"a": pa.array([1.0], pa.float32()), "t": [0.0]}), folder / "part-1.parquet")
    with pytest.raises(DataError, match=r"column 0: 'a: double' in .*/part-0.parquet but 'a: float' in .*/part-1"):
        open_file(folder, [1, 1])

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: the directory holds no .parquet files"):
        open_file(tmp_path / "empty", [1, 1])

    with pytest.raises(DataError, match="nosuch://bucket/data: cannot open .*nosuch"):
        open_file("nosuch://bucket/data", [1, 1])

    for module in ("pyarrow", "pyarrow.fs", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(DataError, match=re.escape("reading .parquet needs pyarrow (pip install 'polyak[parquet]')")):
        open_file(tmp_path / "s.parquet", [2, 1])


# -- memory --------------------------------------------------------------------------------------
CHILD = """
import json, sys
import numpy as np
from polyak.contract.spec import DataSpec, ModelSpec
from polyak.workers.readers import open_source

source = open_source(DataSpec(source="file", path=sys.argv[1]), ModelSpec(layers=[49, 1], loss="mse"))
X, y = source.read(np.arange(0, source.n, 2), np.float32)
peak_kb = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
print(json.dumps({"peak": peak_kb * 1024, "out": X.nbytes + y.nbytes, "last": X[-1].tolist() + y[-1].tolist()}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc")
def test_npy_read_keeps_only_the_output_resident(tmp_path):
    n, width = 1_000_000, 50  # 200 MB of float32
    path = tmp_path / "big.npy"
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, width))
    rng = np.random.default_rng(6)
    for start in range(0, n, 100_000):
        table[start : start + 100_000] = rng.standard_normal((100_000, width), dtype=np.float32)
    last = table[n - 2].tolist()
    table.flush()
    del table
    try:
        # A fresh process: VmHWM is this read's peak alone. Every other row touches every page of the file.
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)], cwd=ROOT, capture_output=True, text=True, check=True
        )
    finally:
        path.unlink()
    report = json.loads(out.stdout)
    assert report["last"] == last
    assert report["out"] == n // 2 * width * 4
    assert report["peak"] < report["out"] + 150 * 2**20, report


def test_a_wide_parquet_source_is_read_a_group_of_columns_at_a_time(tmp_path, monkeypatch):
    import polyak.workers.readers.parquet as parquet_reader
    from polyak.workers.data import load_part

    monkeypatch.setattr(parquet_reader, "COLUMNS_PER_READ", 2)  # 5 features: groups of 2, 2 and 1
    rng = np.random.default_rng(5)
    table = np.column_stack([rng.standard_normal((60, 5)) * 3 + 100, rng.integers(0, 3, 60)])
    source = open_file(write("parquet", tmp_path, table, 1), [5, 3], loss="cross_entropy")
    groups = source.column_groups()
    assert [(lo, hi, g.n_features) for lo, hi, g in groups] == [(0, 2, 2), (2, 4, 2), (4, 5, 1)]
    rows = np.sort(rng.choice(60, 25, replace=False))
    mean, std = feature_stats(source, rows, chunk_rows=4)
    np.testing.assert_allclose(mean, table[rows, :5].mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(std, table[rows, :5].std(axis=0), rtol=1e-12)
    part = load_part(source, rows[::-1], np.float64, (mean, std), [5, 3])  # any order in, source order held
    np.testing.assert_allclose(part.X, (table[rows, :5] - mean) / std, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(part.y, table[rows, 5].astype(np.int64))


def test_npy_chunks_never_span_more_of_the_file_than_a_chunk(tmp_path, monkeypatch):
    """A sparse set of rows (a validation slice) in a big file would otherwise map the whole file at once."""
    import polyak.workers.readers.npy as npy_reader

    table = np.arange(1000 * 3, dtype=np.float64).reshape(1000, 3) % 7
    source = open_file(write("npy", tmp_path, table, 1), [2, 1])
    monkeypatch.setattr(npy_reader, "CHUNK_BYTES", 24 * 50)  # 50 rows of 3 float64
    rows = np.arange(0, 1000, 37)
    runs = list(npy_reader.spans(rows, 10, 50))
    assert np.array_equal(np.concatenate([r for _, r in runs]), rows)
    assert all(r[-1] - r[0] < 50 and len(r) <= 10 for _, r in runs)
    X, _ = source.read(rows)
    np.testing.assert_array_equal(X, table[rows, :2])
