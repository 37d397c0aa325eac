"""client/spec.py: the job spec's defaults, and errors that name the field and say what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from polyak.contract.errors import SpecError
from polyak.contract.spec import JobSpec, parse_spec

DESIGN_EXAMPLE = """
name: digits-mlp
priority: 0
model:
  layers: [64, 64, 10]
  activation: relu
  loss: cross_entropy
  init_scale: 1.0
  seed: 0
data:
  source: sklearn
  name: digits
  path: null
  validation_fraction: 0.0
  standardize: false
optimizer:
  method: heavy_ball
  lr: 0.1
  alpha: 0.1
  schedule: constant
  decay_steps: 1000
  power: 1.0
  weight_decay: 0.0
batch:
  size: 128
  growth: 1.0
  max_size: null
stopping:
  max_epochs: 100
  max_steps: null
  weight_change_tol: null
  grad_tol: null
  warmup_steps: 0
  target_loss: null
  patience: null
  min_delta: 0.0
cluster:
  num_workers: 2
  mode: sync
  max_staleness: 4
  device: auto
  dtype: float32
init_weights: null
"""


def errors_of(source) -> list[dict]:
    with pytest.raises(SpecError) as e:
        parse_spec(source)
    assert e.value.errors, "a SpecError must list its field errors"
    for err in e.value.errors:  # the summary message repeats every field error
        shown = err["message"] if err["field"] == "(file)" else f"{err['field']}: {err['message']}"
        assert shown in e.value.message
    return e.value.errors


def only_error(source) -> dict:
    errs = errors_of(source)
    assert len(errs) == 1, errs
    return errs[0]


# -- accepted specs ------------------------------------------------------------------------------
def test_empty_spec_gets_the_design_defaults():
    dumped = parse_spec({}).model_dump()
    # group: DESIGN's sweeps section; tracking: issue 21's section, which DESIGN.md (read-only here) predates
    tracking = {"tensorboard": None, "mlflow": None, "experiment": "polyak"}
    design = yaml.safe_load(DESIGN_EXAMPLE) | {"name": None, "group": None, "tracking": tracking}
    assert set(dumped) == set(design)
    for key, value in design.items():
        if isinstance(value, dict):  # DESIGN.md lists every field but the synthetic-data knobs
            assert {k: dumped[key][k] for k in value} == value, key
        else:
            assert dumped[key] == value, key


def test_design_example_parses_from_yaml_and_json_files(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text(DESIGN_EXAMPLE)
    spec = parse_spec(y)
    assert spec.name == "digits-mlp" and spec.model.layers == [64, 64, 10] and spec.batch.max_size is None
    j = tmp_path / "job.json"
    j.write_text(json.dumps(yaml.safe_load(DESIGN_EXAMPLE)))
    assert parse_spec(j) == spec
    assert parse_spec(spec) is spec
    with pytest.raises(TypeError, match=r"not a str: pass Path\(name\) for a spec file"):
        parse_spec(str(j))
    assert JobSpec.model_validate(spec.model_dump()) == spec  # the wire round trip


def test_max_epochs_zero_and_full_batch_are_legal():
    spec = parse_spec({"stopping": {"max_epochs": 0}, "batch": {"size": None}})
    assert spec.stopping.max_epochs == 0 and spec.batch.size is None


# -- rejected specs: field and message -----------------------------------------------------------
@pytest.mark.parametrize(
    "source, field",
    [
        ({"colour": "red"}, "colour"),
        ({"model": {"layer": [2, 2]}}, "model.layer"),
        ({"stopping": {"max_epoch": 3}}, "stopping.max_epoch"),
        ({"cluster": {"gpus": 1}}, "cluster.gpus"),
    ],
)
def test_unknown_keys_are_rejected(source, field):
    assert only_error(source) == {"field": field, "message": "unknown key"}


@pytest.mark.parametrize(
    "source, field, fragments",
    [
        ({"stopping": {"max_epochs": -1}}, "stopping.max_epochs", [">= 0", "-1"]),
        ({"stopping": {"max_steps": -5}}, "stopping.max_steps", [">= 0"]),
        ({"optimizer": {"lr": 0}}, "optimizer.lr", ["> 0"]),
        ({"optimizer": {"alpha": 1.5}}, "optimizer.alpha", ["<= 1", "1.5"]),
        ({"optimizer": {"alpha": 0}}, "optimizer.alpha", ["> 0"]),
        ({"optimizer": {"power": 0.5}}, "optimizer.power", ["> 0.5"]),
        ({"optimizer": {"power": 0.3}}, "optimizer.power", ["> 0.5", "0.3"]),
        ({"optimizer": {"power": 1.2}}, "optimizer.power", ["<= 1", "1.2"]),
        ({"optimizer": {"method": "lbfgs"}}, "optimizer.method", ["sgd", "heavy_ball", "nesterov", "adam"]),
        ({"optimizer": {"schedule": "cosine"}}, "optimizer.schedule", ["inverse_time", "inverse_power"]),
        ({"batch": {"size": 0}}, "batch.size", [">= 1"]),
        ({"batch": {"growth": 0.5}}, "batch.growth", [">= 1"]),
        ({"data": {"validation_fraction": 1.0}}, "data.validation_fraction", ["< 1"]),
        ({"cluster": {"num_workers": -1}}, "cluster.num_workers", [">= 0"]),
        ({"cluster": {"device": "tpu"}}, "cluster.device", ["auto", "cpu", "gpu", "tpu"]),
        ({"cluster": {"dtype": "float16"}}, "cluster.dtype", ["float32", "float64"]),
        ({"stopping": {"max_epochs": "lots"}}, "stopping.max_epochs", ["integer", "lots"]),
        ({"model": {"layers": [64, "x", 10]}}, "model.layers.1", ["integer"]),
        ({"model": {"layers": [64]}}, "model.layers", ["at least 2"]),
        ({"model": {"layers": [64, 0, 10]}}, "model.layers", [">= 1"]),
        ({"model": {"activation": "gelu"}}, "model.activation", ["relu", "tanh", "sigmoid"]),
        ({"data": {"source": "sklearn", "name": "mnist"}}, "data.name", ["digits", "mnist"]),
        ({"data": {"source": "file"}}, "data.path", ["required"]),
        ({"model": 5}, "model", ["mapping"]),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(source, field, fragments):
    err = only_error(source)
    assert err["field"] == field
    for fragment in fragments:
        assert fragment in err["message"], (fragment, err)


def test_async_needs_workers():
    err = only_error({"cluster": {"mode": "async", "num_workers": 0}})
    assert err["field"].startswith("cluster.") and "num_workers" in err["message"]
    assert parse_spec({"cluster": {"mode": "async", "num_workers": 1}}).cluster.mode == "async"


def test_patience_needs_validation_data():
    err = only_error({"stopping": {"patience": 3}})
    assert err["field"] == "stopping.patience" and "validation_fraction" in err["message"]
    ok = parse_spec({"stopping": {"patience": 3}, "data": {"validation_fraction": 0.2}})
    assert ok.stopping.patience == 3


def test_every_bad_field_is_reported_at_once():
    errs = errors_of({"optimizer": {"lr": -1, "alpha": 2}, "stopping": {"max_epochs": -3}, "bogus": 1})
    assert {e["field"] for e in errs} == {"optimizer.lr", "optimizer.alpha", "stopping.max_epochs", "bogus"}


# -- files ---------------------------------------------------------------------------------------
def test_bad_yaml_file_message_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [1,\n  x: : y\n")
    err = only_error(path)
    assert err["field"] == "(file)" and str(path) in err["message"] and "YAML" in err["message"]
    assert "<unicode string>" not in err["message"] and f'in "{path}", line 2' in err["message"]


def test_bad_json_file_message_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"model": ')
    err = only_error(path)
    assert str(path) in err["message"] and "JSON" in err["message"]


def test_missing_file_and_non_mapping_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    err = only_error(missing)
    assert str(missing) in err["message"] and "cannot read" in err["message"]
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    err = only_error(listy)
    assert str(listy) in err["message"] and "mapping" in err["message"]
    with pytest.raises(SpecError, match="mapping"):
        parse_spec(["not", "a", "dict"])  # type: ignore[arg-type]


def test_errors_in_a_file_name_the_field(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("stopping:\n  max_epochs: -2\n")
    assert only_error(path)["field"] == "stopping.max_epochs"


def test_a_huge_aliased_input_gives_a_short_message_quickly():
    import time

    from polyak.contract.errors import SpecError
    from polyak.contract.spec import parse_spec

    bomb: list = [1] * 10
    for _ in range(7):  # 10^8 elements by reference, as YAML anchors build them
        bomb = [bomb] * 10
    start = time.perf_counter()
    with pytest.raises(SpecError) as e:
        parse_spec({"model": {"layers": bomb}})
    assert time.perf_counter() - start < 5
    assert "model.layers" in str(e.value) and len(str(e.value)) < 2000


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_numbers_are_rejected_by_name(value):
    from polyak.contract.errors import SpecError
    from polyak.contract.spec import parse_spec

    with pytest.raises(SpecError, match=r"optimizer\.lr: must be a finite number"):
        parse_spec({"optimizer": {"lr": value}})


def test_relative_paths_in_a_spec_file_name_files_beside_it(tmp_path, monkeypatch):
    folder = tmp_path / "specs"
    folder.mkdir()
    spec_file = folder / "job.yaml"
    spec_file.write_text(
        "data: {source: file, path: data/train.npy}\ninit_weights: ../w0.npz\nmodel: {layers: [3, 2]}\n"
    )
    monkeypatch.chdir(tmp_path)  # not the spec's folder: the spec's folder decides
    spec = parse_spec(Path("specs/job.yaml"))
    assert spec.data.path == str(folder / "data" / "train.npy")
    assert spec.init_weights == str(tmp_path / "w0.npz")
    for kept in ("s3://bucket/train/", "file:///data/train.parquet", str(tmp_path / "abs.npy")):
        spec_file.write_text(f"data: {{source: file, path: '{kept}'}}\nmodel: {{layers: [3, 2]}}\n")
        assert parse_spec(spec_file).data.path == kept
    # a dict is not a file: its paths are left to whoever resolves them (the server, against its data root)
    assert parse_spec({"data": {"source": "file", "path": "x.npy"}}).data.path == "x.npy"


def test_the_optimizer_summary_names_the_parameters_the_method_uses():
    from polyak.contract.spec import optimizer_summary

    adam = parse_spec({"optimizer": {"method": "adam", "lr": 0.002, "alpha": 0.7}}).optimizer
    assert optimizer_summary(adam) == "adam lr=0.002 beta1=0.9 beta2=0.999 eps=1e-08"  # alpha is ignored by adam
    hb = parse_spec({"optimizer": {"schedule": "inverse_time", "weight_decay": 0.01}}).optimizer
    assert optimizer_summary(hb) == "heavy_ball lr=0.1 alpha=0.1 inverse_time weight_decay=0.01"
