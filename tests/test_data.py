"""workers/data.py: sources, checks with messages by content and field, the seeded split, standardization, shards."""

from __future__ import annotations

import numpy as np
import pytest

from polyak.contract.choices import SKLEARN_DATASETS
from polyak.contract.errors import DataError
from polyak.contract.spec import DataSpec, ModelSpec
from polyak.workers.data import ShardLayout, Split, check_cheaply, load_dataset, load_shard, prepare, shard_bounds
from polyak.workers.generated import regression_with_condition


def load(data: dict, model: dict):
    return load_dataset(DataSpec(**data), ModelSpec(**model))


def write_npz(path, X, y):
    np.savez(path, X=X, y=y)
    return str(path)


def id_data(n=60, d=3, k=4, seed=0):
    """Rows whose first feature is the row id, so splits can be traced back to the source rows."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.arange(n, dtype=np.float64), rng.standard_normal((n, d - 1)) * 3 + 5])
    y = rng.integers(0, k, size=n)
    return X, y


# -- sources -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, layers, n, d, classes",
    [
        ("digits", [64, 10], 1797, 64, 10),
        ("iris", [4, 3], 150, 4, 3),
        ("wine", [13, 3], 178, 13, 3),
        ("breast_cancer", [30, 2], 569, 30, 2),
        ("diabetes", [10, 1], 442, 10, None),
    ],
)
def test_sklearn_datasets(name, layers, n, d, classes):
    loss = "mse" if classes is None else "cross_entropy"
    ds = load({"source": "sklearn", "name": name, "validation_fraction": 0.2}, {"layers": layers, "loss": loss})
    n_val = round(0.2 * n)
    assert ds.X_train.shape == (n - n_val, d) and ds.X_val.shape == (n_val, d)
    assert ds.n_train == n - n_val and ds.n_features == d
    assert ds.classification == (classes is not None)
    if classes is None:
        assert ds.y_train.shape == (n - n_val, 1) and ds.y_train.dtype == np.float64
    else:
        assert ds.y_train.shape == (n - n_val,) and ds.y_train.dtype == np.int64
        assert set(np.unique(np.r_[ds.y_train, ds.y_val])) == set(range(classes))
    assert name in ds.origin


def test_synthetic_regression_has_the_requested_condition_number():
    ds = load(
        {
            "source": "synthetic",
            "name": "regression",
            "n_samples": 5000,
            "n_features": 10,
            "condition_number": 100,
        },
        {"layers": [10, 1], "loss": "mse"},
    )
    eig = np.linalg.eigvalsh(ds.X_train.T @ ds.X_train)
    assert eig[-1] / eig[0] == pytest.approx(100, rel=0.1)
    # noise 0: y is exactly linear in X
    w, res, *_ = np.linalg.lstsq(ds.X_train, ds.y_train[:, 0], rcond=None)
    assert np.abs(ds.X_train @ w - ds.y_train[:, 0]).max() < 1e-10


def test_regression_with_condition_directly():
    X, y = regression_with_condition(8000, 6, 1000.0, 0.1, np.random.default_rng(3))
    assert X.shape == (8000, 6) and y.shape == (8000,)
    eig = np.linalg.eigvalsh(np.cov(X.T))
    assert eig[-1] / eig[0] == pytest.approx(1000, rel=0.1)


def test_synthetic_classification():
    ds = load(
        {"source": "synthetic", "name": "classification", "n_samples": 300, "n_features": 7, "n_classes": 5},
        {"layers": [7, 5]},
    )
    assert ds.X_train.shape == (300, 7) and ds.classification
    assert set(np.unique(ds.y_train)) == set(range(5))
    again = load(
        {"source": "synthetic", "name": "classification", "n_samples": 300, "n_features": 7, "n_classes": 5},
        {"layers": [7, 5], "activation": "tanh"},  # a different model key: built again, not cached
    )
    np.testing.assert_array_equal(ds.X_train, again.X_train)


# -- split and standardization -------------------------------------------------------------------
def test_split_is_seeded_and_disjoint(tmp_path):
    X, y = id_data(n=100)
    path = write_npz(tmp_path / "d.npz", X, y)
    spec = {"source": "file", "path": path, "validation_fraction": 0.25}
    a = load(spec, {"layers": [3, 4], "seed": 1})
    b = load(spec, {"layers": [3, 4], "seed": 1, "activation": "tanh"})
    c = load(spec, {"layers": [3, 4], "seed": 2})
    train_ids, val_ids = a.X_train[:, 0].astype(int), a.X_val[:, 0].astype(int)
    assert len(val_ids) == 25 and len(train_ids) == 75
    assert not set(train_ids) & set(val_ids)
    assert sorted(np.r_[train_ids, val_ids]) == list(range(100))
    np.testing.assert_array_equal(a.X_train, b.X_train)  # same seed, same split
    np.testing.assert_array_equal(a.X_val, b.X_val)
    assert set(c.X_val[:, 0].astype(int)) != set(val_ids)  # another seed, another split
    # rows keep their labels
    np.testing.assert_array_equal(a.y_train, y[train_ids])
    np.testing.assert_array_equal(a.y_val, y[val_ids])


def test_standardize_uses_training_statistics_only(tmp_path):
    X, y = id_data(n=80, d=4)
    X = np.column_stack([X, np.full(80, 7.0)])  # a constant feature
    path = write_npz(tmp_path / "d.npz", X, y)
    raw = load({"source": "file", "path": path, "validation_fraction": 0.25}, {"layers": [5, 4]})
    std = load({"source": "file", "path": path, "validation_fraction": 0.25, "standardize": True}, {"layers": [5, 4]})
    mean, sd = raw.X_train.mean(axis=0), raw.X_train.std(axis=0)
    sd[sd == 0] = 1
    np.testing.assert_allclose(std.X_train, (raw.X_train - mean) / sd, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std.X_val, (raw.X_val - mean) / sd, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std.X_train[:, :4].mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(std.X_train[:, :4].std(axis=0), 1, rtol=1e-12)
    assert np.all(std.X_train[:, 4] == 0) and np.all(std.X_val[:, 4] == 0)  # not NaN
    assert np.all(np.abs(std.X_val.mean(axis=0)[:4]) > 1e-6)  # validation rows are not re-centred


def test_bad_validation_fraction(tmp_path):
    X, y = id_data(n=4)
    path = write_npz(tmp_path / "d.npz", X, y)
    with pytest.raises(DataError, match="validation_fraction"):
        load({"source": "file", "path": path, "validation_fraction": 0.1}, {"layers": [3, 4]})


# -- shards --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, k", [(10, 3), (150, 4), (7, 7), (1437, 2), (5, 1)])
def test_shard_bounds_partition_contiguously(n, k):
    b = shard_bounds(n, k)
    assert b[0] == 0 and b[-1] == n and len(b) == k + 1
    sizes = np.diff(b)
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("standardize", [False, True])
def test_shards_partition_the_training_set_and_the_layout_finds_every_row(standardize):
    data = DataSpec(source="sklearn", name="iris", validation_fraction=0.2, standardize=standardize)
    model = ModelSpec(layers=[4, 3])
    ds = load_dataset(data, model)
    info = prepare(data, model)
    layout = ShardLayout.of(data, model, info, 3)
    parts = [load_shard(data, model, np.float64, info.stats, k, 3) for k in range(3)]
    for k, (train, _) in enumerate(parts):
        lo, hi = layout.bounds[k], layout.bounds[k + 1]
        assert len(train.X) == hi - lo
        # training row i of the whole set is, in shard k, at layout.position[i]
        np.testing.assert_array_equal(train.X[layout.position[lo:hi]], ds.X_train[lo:hi])
        np.testing.assert_array_equal(train.y[layout.position[lo:hi]], ds.y_train[lo:hi])
    assert sum(len(train.X) for train, _ in parts) == ds.n_train == 120
    # each worker's slice of the validation rows: together, the validation set once (iris has duplicate rows:
    # compared as multisets, row by row, not as sets)
    val = np.concatenate([v.X for _, v in parts])
    assert len(val) == len(ds.X_val) == 30
    np.testing.assert_array_equal(val[np.lexsort(val.T)], ds.X_val[np.lexsort(ds.X_val.T)])
    # worker k holds validation rows [10k, 10k + 10) of the validation order, in source order
    val_rows = Split(model.seed, 150, 0.2).val_rows()
    for k, (_, v) in enumerate(parts):
        mine = slice(10 * k, 10 * k + 10)
        np.testing.assert_array_equal(v.X, ds.X_val[mine][np.argsort(val_rows[mine])])
        np.testing.assert_array_equal(v.y, ds.y_val[mine][np.argsort(val_rows[mine])])
    batch = np.random.default_rng(0).permutation(120)[:50]
    split = layout.split_batch(batch)
    got = np.concatenate([parts[k][0].X[positions] for k, positions in enumerate(split)])
    want = np.concatenate([ds.X_train[batch[(batch >= lo) & (batch < hi)]]
                           for lo, hi in zip(layout.bounds[:-1], layout.bounds[1:], strict=True)])
    np.testing.assert_array_equal(got, want)  # a batch's rows, shard by shard, in the batch's order


def test_the_split_is_a_function_of_seed_n_and_fraction_alone():
    a, b, c = Split(3, 1000, 0.2), Split(3, 1000, 0.2), Split(4, 1000, 0.2)
    np.testing.assert_array_equal(a.perm, b.perm)
    assert not np.array_equal(a.val_rows(), c.val_rows())
    assert (a.n_val, a.n_train) == (200, 800)
    assert sorted(np.r_[a.val_rows(), a.train_rows()]) == list(range(1000))
    np.testing.assert_array_equal(a.train_rows(100, 300), a.train_rows()[100:300])


def test_standardization_statistics_come_from_the_training_rows_only():
    data = DataSpec(source="sklearn", name="wine", validation_fraction=0.25, standardize=True)
    model = ModelSpec(layers=[13, 3])
    info = prepare(data, model)
    raw = load_dataset(data.model_copy(update={"standardize": False}), model)
    np.testing.assert_allclose(info.x_mean, raw.X_train.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(info.x_std, raw.X_train.std(axis=0), rtol=1e-13)
    assert not np.allclose(info.x_mean, np.r_[raw.X_train, raw.X_val].mean(axis=0), rtol=1e-6)


def test_parts_are_held_in_the_jobs_dtype():
    data = DataSpec(source="sklearn", name="digits", standardize=True)
    model = ModelSpec(layers=[64, 10])
    info = prepare(data, model)
    train, _ = load_shard(data, model, np.float32, info.stats, 0, 2)
    assert train.X.dtype == np.float32 and train.y.dtype == np.int64
    reference = load_dataset(data, model)
    layout = ShardLayout.of(data, model, info, 2)
    lo, hi = layout.bounds[0], layout.bounds[1]
    np.testing.assert_array_equal(train.X[layout.position[lo:hi]], reference.X_train[lo:hi].astype(np.float32))


def test_bad_shard_counts():
    with pytest.raises(DataError, match="5 training samples"):
        shard_bounds(5, 6)
    with pytest.raises(ValueError, match="num_workers"):
        shard_bounds(5, 0)


# -- file formats --------------------------------------------------------------------------------
def _round_trip_table(tmp_path, suffix, writer, header=False, targets=1):
    rng = np.random.default_rng(4)
    n = 30
    X = np.column_stack([np.arange(n, dtype=np.float64), rng.standard_normal((n, 2))])
    y = rng.integers(0, 3, size=n) if targets == 1 else rng.standard_normal((n, targets))
    table = np.column_stack([X, y])
    path = tmp_path / f"data{suffix}"
    writer(path, table, header)
    model = {"layers": [3, 3]} if targets == 1 else {"layers": [3, targets], "loss": "mse"}
    ds = load({"source": "file", "path": str(path)}, model)
    order = np.argsort(ds.X_train[:, 0])
    np.testing.assert_allclose(ds.X_train[order], X, rtol=1e-12)
    expected_y = y if targets == 1 else y
    np.testing.assert_allclose(ds.y_train[order], expected_y, rtol=1e-12)
    return ds


def _npy(path, table, header):
    np.save(path, table)


def _csv(path, table, header):
    names = ",".join(f"c{i}" for i in range(table.shape[1]))
    np.savetxt(path, table, delimiter=",", header=names if header else "", comments="")


def _parquet(path, table, header):
    import pyarrow as pa  # in the dev extra: a missing pyarrow fails, it does not skip
    import pyarrow.parquet as pq

    pq.write_table(pa.table({f"c{i}": table[:, i] for i in range(table.shape[1])}), path)


@pytest.mark.parametrize(
    "suffix, writer, header",
    [(".npy", _npy, False), (".csv", _csv, False), (".csv", _csv, True), (".parquet", _parquet, False)],
    ids=["npy", "csv", "csv-header", "parquet"],
)
def test_table_files(tmp_path, suffix, writer, header):
    ds = _round_trip_table(tmp_path, suffix, writer, header)
    assert ds.classification and ds.y_train.dtype == np.int64


def test_multi_target_regression_from_csv(tmp_path):
    ds = _round_trip_table(tmp_path, ".csv", _csv, targets=2)
    assert ds.y_train.shape == (30, 2) and not ds.classification


def test_npz_regression_targets(tmp_path):
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((20, 3)), rng.standard_normal((20, 2))
    ds = load({"source": "file", "path": write_npz(tmp_path / "r.npz", X, Y)}, {"layers": [3, 2], "loss": "mse"})
    assert ds.y_train.shape == (20, 2)
    ds1 = load(
        {"source": "file", "path": write_npz(tmp_path / "r1.npz", X, Y[:, 0])},
        {"layers": [3, 1], "loss": "mse"},
    )
    assert ds1.y_train.shape == (20, 1)


def test_a_rewritten_file_is_read_again(tmp_path):
    """load_dataset caches, but a file that changed on disk must not be served from the cache."""
    X, y = id_data(n=20)
    path = write_npz(tmp_path / "d.npz", X, y)
    first = load({"source": "file", "path": path}, {"layers": [3, 4]})
    write_npz(tmp_path / "d.npz", X + 1000.0, y)
    second = load({"source": "file", "path": path}, {"layers": [3, 4]})
    assert second.X_train[:, 0].min() >= 1000 and first.X_train[:, 0].max() < 1000


# -- bad data: errors by content -----------------------------------------------------------------
def expect_error(tmp_path, X, y, model=None, fname="d.npz") -> str:
    path = write_npz(tmp_path / fname, X, y)
    with pytest.raises(DataError) as e:
        load({"source": "file", "path": path}, model or {"layers": [X.shape[1] if np.ndim(X) == 2 else 3, 4]})
    return str(e.value)


def test_nan_and_inf_in_X(tmp_path):
    X, y = id_data()
    X[3, 1] = np.nan
    X[5, 2] = np.inf
    msg = expect_error(tmp_path, X, y)
    assert "NaN or inf" in msg and "(first in row 3)" in msg and "d.npz" in msg


def test_nan_in_y(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((10, 3)), rng.standard_normal(10)
    y[4] = np.nan
    msg = expect_error(tmp_path, X, y, {"layers": [3, 1], "loss": "mse"})
    assert "y has NaN" in msg


def test_wrong_shapes(tmp_path):
    msg = expect_error(tmp_path, np.arange(10.0), np.zeros(10, dtype=int), {"layers": [3, 4]})
    assert "2-D" in msg and "(10,)" in msg
    msg = expect_error(tmp_path, np.zeros((10, 3)), np.zeros((10, 2), dtype=int), {"layers": [3, 4]}, "y2.npz")
    assert "(n,)" in msg and "(10, 2)" in msg


def test_labels_outside_the_output_range_name_both_numbers(tmp_path):
    X, y = id_data(k=4)
    y[7] = 12
    msg = expect_error(tmp_path, X, y, {"layers": [3, 10]})
    assert "12" in msg and "10" in msg and "0..9" in msg
    y[7] = -1
    msg = expect_error(tmp_path, X, y, {"layers": [3, 10]}, "neg.npz")
    assert "-1" in msg and "0..k-1" in msg


def test_fractional_labels(tmp_path):
    X, y = id_data()
    msg = expect_error(tmp_path, X, y + 0.5)
    assert "integer class ids" in msg


def test_length_mismatch(tmp_path):
    X, y = id_data(n=10)
    msg = expect_error(tmp_path, X, y[:9])
    assert "10 rows" in msg and "9" in msg
    msg = expect_error(tmp_path, X, np.array(3), fname="scalar.npz")
    assert "one target per row" in msg


def test_layers_mismatch_names_both_numbers(tmp_path):
    X, y = id_data(d=3)
    msg = expect_error(tmp_path, X, y, {"layers": [5, 4]})
    assert "layers[0] = 5" in msg and "3 features" in msg
    rng = np.random.default_rng(0)
    msg = expect_error(
        tmp_path,
        rng.standard_normal((10, 3)),
        rng.standard_normal((10, 2)),
        {"layers": [3, 1], "loss": "mse"},
        "reg.npz",
    )
    assert "layers[-1] = 1" in msg and "2 target column(s)" in msg
    with pytest.raises(DataError, match=r"layers\[0\] = 60 .* 64 features"):
        load({"source": "sklearn", "name": "digits"}, {"layers": [60, 10]})


def test_loss_that_does_not_suit_the_data():
    with pytest.raises(DataError, match="mse.*class labels"):
        load({"source": "sklearn", "name": "digits"}, {"layers": [64, 10], "loss": "mse"})
    with pytest.raises(DataError, match="cross_entropy.*real-valued"):
        load({"source": "sklearn", "name": "diabetes"}, {"layers": [10, 2], "loss": "cross_entropy"})


@pytest.mark.parametrize("data, model", [
    ({"source": "sklearn", "name": "digits"}, {"layers": [64, 10], "loss": "mse"}),
    ({"source": "synthetic", "name": "regression", "n_features": 3}, {"layers": [3, 2], "loss": "cross_entropy"}),
])
def test_the_loss_check_is_one_check_before_and_when_the_data_is_made(data, model):
    """The service's cheap check and the loader say the same, naming model.loss."""
    with pytest.raises(DataError) as cheap:
        check_cheaply(DataSpec(**data), ModelSpec(**model))
    with pytest.raises(DataError) as loaded:
        load(data, model)
    assert cheap.value.message == loaded.value.message and "does not suit" in loaded.value.message
    assert cheap.value.field == loaded.value.field == "model.loss"


def test_a_data_error_carries_the_spec_field_it_concerns(tmp_path):
    X, y = id_data(n=10, d=3)
    npz = write_npz(tmp_path / "d.npz", X, y)
    csv = tmp_path / "d.csv"
    np.savetxt(csv, np.column_stack([X, y]), delimiter=",", header="a,b,c,label", comments="")
    cases = [
        ({"source": "file", "path": npz}, {"layers": [5, 4]}, "model.layers", "layers[0] = 5"),
        ({"source": "file", "path": npz}, {"layers": [3, 2]}, "model.layers", "labels up to"),
        ({"source": "file", "path": str(csv), "target": "nope"}, {"layers": [3, 4]}, "data.target", "'nope'"),
        ({"source": "file", "path": npz, "target": "label"}, {"layers": [3, 4]}, "data.target", "has none"),
        ({"source": "file", "path": npz, "validation_fraction": 0.99}, {"layers": [3, 4]},
         "data.validation_fraction", "leaves no training"),
        ({"source": "file", "path": str(tmp_path / "absent.npy")}, {"layers": [3, 4]}, "data.path", "does not exist"),
        ({"source": "sklearn", "name": "iris"}, {"layers": [4, 3], "loss": "mse"}, "model.loss", "does not suit"),
    ]
    for data, model, field, words in cases:
        with pytest.raises(DataError) as e:
            load(data, model)
        assert (e.value.field, words in e.value.message) == (field, True), (data, model, e.value.message)
    with pytest.raises(DataError) as e:
        shard_bounds(5, 6)
    assert e.value.field == "cluster.num_workers"
    with pytest.raises(DataError) as e:
        check_cheaply(DataSpec(source="synthetic", name="classification", n_classes=5), ModelSpec(layers=[20, 3]))
    assert e.value.field == "model.layers" and "data.n_classes = 5" in e.value.message


def test_missing_npz_keys(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, features=np.zeros((5, 2)), y=np.zeros(5))
    with pytest.raises(DataError) as e:
        load({"source": "file", "path": str(path)}, {"layers": [2, 2]})
    assert "missing X" in str(e.value) and "features" in str(e.value)


def test_unsupported_suffix_and_missing_file(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("1,2,3\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\.npz"):
        load({"source": "file", "path": str(path)}, {"layers": [2, 2]})
    missing = tmp_path / "absent.npz"
    with pytest.raises(DataError) as e:
        load({"source": "file", "path": str(missing)}, {"layers": [2, 2]})
    assert str(missing) in str(e.value) and "does not exist" in str(e.value)


def test_corrupt_file(tmp_path):
    path = tmp_path / "d.npy"
    path.write_bytes(b"this is not numpy")
    with pytest.raises(DataError, match="cannot read data"):
        load({"source": "file", "path": str(path)}, {"layers": [2, 2]})


@pytest.mark.parametrize("name", sorted(SKLEARN_DATASETS))
def test_the_known_sklearn_shapes_are_the_datasets_own(name):
    d, classes = SKLEARN_DATASETS[name]
    loss = "cross_entropy" if classes else "mse"
    ds = load({"source": "sklearn", "name": name}, {"layers": [d, classes or 1], "loss": loss})
    assert ds.n_features == d
    assert (int(ds.y_train.max()) + 1 if classes else None) == classes
