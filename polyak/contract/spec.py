"""The job spec: one pydantic model, validated once, up front.

Every field carries its default and a one-line meaning; README's spec reference is
generated from these descriptions (tests/test_readme.py keeps the two in step).
"""

from __future__ import annotations

import io
import json
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from polyak.contract.choices import (
    ACTIVATIONS,
    DATA_SOURCES,
    DEVICES,
    DTYPES,
    LOSSES,
    MODES,
    OPTIMIZERS,
    SCHEDULES,
    SKLEARN_DATASETS,
    SYNTHETIC_DATASETS,
)
from polyak.contract.errors import SpecError, SpecSyntaxError
from polyak.contract.network import param_count

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATASET_ID = re.compile(r"[0-9a-f]{64}")
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_.]*")


def is_uri(target: str | Path) -> bool:
    """A URI (``s3://``, ``gs://``, ``file://``) rather than a local path."""
    return bool(_URI.match(str(target)))


class _Strict(BaseModel):
    # inf/NaN would pass the bounds checks and then serialise as null, unreadable when the job is loaded.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    layers: list[int] = Field(
        default=[64, 64, 10],
        description="m_0 (inputs) ... m_L (outputs); L = len-1 layers",
    )
    activation: Literal[ACTIVATIONS] = Field(
        default="relu", description="hidden layers; the output layer is linear"
    )
    loss: Literal[LOSSES] = Field(
        default="cross_entropy",
        description="cross_entropy (softmax, labels are class ids) | mse (mean over samples and outputs)",
    )
    init_scale: float = Field(default=1.0, gt=0, description="sigma: W^(l)_ij ~ N(0, sigma^2 / m_{l-1}); biases 0")
    seed: int = Field(default=0, ge=0, description="seeds init, shuffling and data splits")

    @model_validator(mode="after")
    def _check_layers(self) -> ModelSpec:
        if len(self.layers) < 2:
            raise ValueError("layers: needs at least 2 widths (inputs and outputs), got " + str(self.layers))
        if any(m < 1 for m in self.layers):
            raise ValueError(f"layers: every width must be >= 1, got {self.layers}")
        if self.loss == "cross_entropy" and self.layers[-1] < 2:
            raise ValueError(f"layers: cross_entropy needs >= 2 outputs (one per class), got {self.layers[-1]}")
        return self


class DataSpec(_Strict):
    source: Literal[DATA_SOURCES] = Field(default="sklearn", description="where the data comes from")
    name: str | None = Field(
        default="digits",
        description=f"sklearn: {' | '.join(SKLEARN_DATASETS)}; synthetic: {' | '.join(SYNTHETIC_DATASETS)}; "
        "dataset: the id of an uploaded dataset (POST /datasets)",
    )
    path: str | None = Field(
        default=None,
        description="file: .npy (memory-mapped), .parquet file or directory, or a URI (s3://, gs://, file://) "
        "read in part; .npz (X, y) and .csv are read whole",
    )
    target: str | list[str] | None = Field(
        default=None, description=".parquet/.csv: name(s) of the target column(s); null = the last column(s)"
    )
    n_samples: int = Field(default=1000, ge=2, description="synthetic: number of samples")
    n_features: int = Field(default=20, ge=1, description="synthetic: number of features")
    n_classes: int = Field(default=2, ge=2, description="synthetic classification: number of classes")
    condition_number: float = Field(
        default=1.0, ge=1.0, description="synthetic regression: condition number of the feature covariance"
    )
    noise: float = Field(default=0.0, ge=0.0, description="synthetic: label noise (std for regression)")
    validation_fraction: float = Field(default=0.0, ge=0.0, lt=1.0, description="held out, never trained on")
    standardize: bool = Field(default=False, description="z-score features with training-set statistics")

    @model_validator(mode="after")
    def _check_source(self) -> DataSpec:
        if self.source == "sklearn" and self.name not in SKLEARN_DATASETS:
            raise ValueError(f"name: sklearn dataset must be one of {', '.join(SKLEARN_DATASETS)}, got {self.name!r}")
        if self.source == "synthetic" and self.name not in SYNTHETIC_DATASETS:
            raise ValueError(
                f"name: synthetic dataset must be one of {', '.join(SYNTHETIC_DATASETS)}, got {self.name!r}"
            )
        if self.source == "file" and not self.path:
            raise ValueError("path: required when source is 'file'")
        if self.source == "dataset" and not (self.name and _DATASET_ID.fullmatch(self.name)):
            raise ValueError(f"name: a dataset is named by its id (64 hex digits, from POST /datasets or "
                             f"Client.upload), got {self.name!r}")
        return self


class OptimizerSpec(_Strict):
    method: Literal[OPTIMIZERS] = Field(
        default="heavy_ball", description="update rule (MATH.md); adagrad, rmsprop and adam adapt per coordinate"
    )
    lr: float = Field(default=0.1, gt=0, description="eta")
    alpha: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="heavy ball: W+ = W - alpha*eta*g + (1 - alpha)(W - W_prev); ignored by sgd and the adaptive rules",
    )
    schedule: Literal[SCHEDULES] = Field(
        default="constant", description="step size eta_t as a function of the step t"
    )
    decay_steps: float = Field(default=1000, gt=0, description="inverse_time: eta_t = eta / (1 + t / decay_steps)")
    power: float = Field(default=1.0, gt=0.5, le=1.0, description="inverse_power: eta_t = eta / (1 + t)^power")
    weight_decay: float = Field(default=0.0, ge=0, description="L2: g += weight_decay * W (weights, not biases)")
    beta1: float = Field(default=0.9, ge=0, lt=1, description="adam: first-moment decay; ignored by the others")
    beta2: float = Field(default=0.999, ge=0, lt=1, description="adam: second-moment decay; ignored by the others")
    rho: float = Field(
        default=0.99, ge=0, lt=1, description="rmsprop: second-moment decay (torch's RMSprop alpha); ignored by others"
    )
    eps: float = Field(
        default=1e-8, gt=0, description="adagrad, rmsprop, adam: added to the root (torch's Adagrad default is 1e-10)"
    )


# The hyperparameters each method reads (the others are accepted and ignored).
METHOD_FIELDS = {
    "sgd": ("lr",), "heavy_ball": ("lr", "alpha"), "nesterov": ("lr", "alpha"), "adagrad": ("lr", "eps"),
    "rmsprop": ("lr", "rho", "eps"), "adam": ("lr", "beta1", "beta2", "eps"),
}


def optimizer_summary(o: OptimizerSpec) -> str:
    """'adam lr=0.002 beta1=0.9 beta2=0.999 eps=1e-08': the method and the parameters it uses."""
    parts = [o.method, *(f"{name}={getattr(o, name):g}" for name in METHOD_FIELDS[o.method])]
    if o.schedule != "constant":
        parts.append(o.schedule)
    if o.weight_decay:
        parts.append(f"weight_decay={o.weight_decay:g}")
    return " ".join(parts)


class BatchSpec(_Strict):
    size: int | None = Field(default=128, ge=1, description="n'; null or >= n means the full batch (GD)")
    growth: float = Field(default=1.0, ge=1.0, description="n' is multiplied by this after every epoch")
    max_size: int | None = Field(default=None, ge=1, description="cap on the grown n' (default n)")


class StoppingSpec(_Strict):
    max_epochs: int = Field(default=100, ge=0, description="stop after this many epochs")
    max_steps: int | None = Field(default=None, ge=0, description="stop after this many steps")
    weight_change_tol: float | None = Field(
        default=None,
        gt=0,
        description="||W_t - W_{t-t'}|| / ||W_{t-t'}|| < tol, t' = steps of the last epoch",
    )
    grad_tol: float | None = Field(
        default=None,
        gt=0,
        description="||mean of the last t' minibatch gradients|| < tol, after warmup_steps",
    )
    warmup_steps: int = Field(default=0, ge=0, description="T0: grad_tol is only checked for t >= T0")
    target_loss: float | None = Field(default=None, description="training loss (epoch mean) <= target")
    patience: int | None = Field(
        default=None, ge=1, description="epochs without validation-loss improvement > min_delta"
    )
    min_delta: float = Field(default=0.0, ge=0, description="smallest validation-loss drop that counts")


class ClusterSpec(_Strict):
    num_workers: int = Field(default=2, ge=0, description="data shards = workers; 0 = in this process, no Ray")
    mode: Literal[MODES] = Field(
        default="sync", description="sync: one exact minibatch step per round; async: bounded staleness"
    )
    max_staleness: int = Field(
        default=4, ge=0, description="async: a gradient older than this many versions is dropped"
    )
    device: Literal[DEVICES] = Field(default="auto", description="auto | cpu | gpu (error if none)")
    dtype: Literal[DTYPES] = Field(default="float32", description="floating-point type")
    num_servers: int = Field(
        default=1, ge=1, description="parameter server shards: W and the optimizer's buffers split into this many "
        "contiguous key ranges, one actor each (at most the number of parameters; needs num_workers >= 1)"
    )


class TrackingSpec(_Strict):
    tensorboard: str | None = Field(
        default=None, description="folder for TensorBoard event files, weights.npz and model.onnx (one subfolder per "
        "job); relative in a spec file: beside it"
    )
    mlflow: str | None = Field(
        default=None, description="MLflow tracking URI (a local folder or file: URI is MLflow's file store)"
    )
    experiment: str = Field(default="polyak", min_length=1, max_length=200, description="MLflow experiment name")


class JobSpec(_Strict):
    name: str | None = Field(default=None, max_length=200, description="optional label")
    group: str | None = Field(
        default=None, max_length=200, description="label shared by related jobs (a sweep); GET /jobs?group= lists them"
    )
    priority: int = Field(default=0, description="higher runs first; FIFO within a priority")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    stopping: StoppingSpec = Field(default_factory=StoppingSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    init_weights: str | None = Field(default=None, description="optional .npz to start from instead of random init")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> JobSpec:
        if self.cluster.mode == "async" and self.cluster.num_workers == 0:
            raise ValueError("cluster.mode: async needs num_workers >= 1")
        servers = self.cluster.num_servers
        if servers > 1 and self.cluster.num_workers == 0:
            raise ValueError(f"cluster.num_servers: {servers} needs num_workers >= 1 (num_workers 0 trains in this "
                             "process, with no parameter server to shard); use num_servers 1")
        if servers > (p := param_count(self.model.layers)):
            raise ValueError(f"cluster.num_servers: must be <= the model's {p} parameters (one per shard at least), "
                             f"got {servers}")
        if self.stopping.patience is not None and self.data.validation_fraction == 0.0:
            raise ValueError("stopping.patience: needs validation data (data.validation_fraction > 0)")
        return self


_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
_KINDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping of fields",
    "model_type": "a mapping of fields",
    "model_attributes_type": "a mapping of fields",
}


_REPR = reprlib.Repr()  # attributes, not keywords: Python < 3.12 takes none
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 40, 40


def _shown(value: Any) -> str:
    """A short repr that stays short for huge inputs (a YAML alias bomb expands to a vast nested list)."""
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain_message(e: dict) -> str:
    """pydantic's wording rewritten as DESIGN.md's: what is allowed, then what was given."""
    kind, ctx = e["type"], e.get("ctx") or {}
    got = f", got {_shown(e['input'])}" if "input" in e else ""
    if kind in _BOUNDS and _BOUNDS[kind][0] in ctx:
        key, op = _BOUNDS[kind]
        bound = ctx[key]
        bound = f"{bound:g}" if isinstance(bound, float) else str(bound)
        return f"must be {op} {bound}{got}"
    if kind == "literal_error" and "expected" in ctx:
        return f"must be one of {ctx['expected']}{got}"
    if kind in _KINDS:
        return f"must be {_KINDS[kind]}{got}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    return e["msg"]


def field_errors(error: ValidationError) -> list[dict[str, str]]:
    """pydantic's errors as [{field, message}], the field dotted (``stopping.max_epochs``)."""
    out = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
            # Model validators name their field in the message ("layers: ..."): fold it into the location.
            head, sep, tail = msg.partition(": ")
            if sep and _FIELD_NAME.fullmatch(head):
                loc = f"{loc}.{head}" if loc else head
                msg = tail
        else:
            msg = _plain_message(e)
        out.append({"field": loc or "(spec)", "message": msg})
    return out


def parse_spec(source: Path | dict[str, Any] | JobSpec) -> JobSpec:
    """A JobSpec from a spec file (a Path: YAML, or JSON for .json), a mapping of fields or a JobSpec;
    SpecError names every bad field. A str is refused: it could be a file name or spec text, so the caller
    says which (``Path(name)``, or ``spec_mapping(text, ...)``)."""
    if isinstance(source, JobSpec):
        return source
    if isinstance(source, str):
        raise TypeError("parse_spec takes a Path, a mapping or a JobSpec, not a str: pass Path(name) for a spec "
                        "file, or spec_mapping(text, is_json, origin) for YAML/JSON text")
    if isinstance(source, Path):
        source = _paths_beside(read_spec_file(source), source.parent)
    if not isinstance(source, dict):
        raise SpecError("the spec must be a mapping of fields", [{"field": "(spec)", "message": "not a mapping"}])
    try:
        return JobSpec.model_validate(source)
    except ValidationError as e:
        errors = field_errors(e)
        raise SpecError("; ".join(f"{x['field']}: {x['message']}" for x in errors), errors) from None


def _paths_beside(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative ``data.path`` and ``init_weights`` of a spec file name files beside it, as its author meant;
    made absolute here so that they mean the same wherever the job runs from."""

    def beside(value: Any) -> Any:
        if not isinstance(value, str) or not value or is_uri(value) or Path(value).is_absolute():
            return value
        return os.path.abspath(folder / value)

    spec = dict(spec)
    if isinstance(spec.get("data"), dict) and "path" in spec["data"]:
        spec["data"] = {**spec["data"], "path": beside(spec["data"]["path"])}
    if "init_weights" in spec:
        spec["init_weights"] = beside(spec["init_weights"])
    if isinstance(spec.get("tracking"), dict) and "tensorboard" in spec["tracking"]:
        spec["tracking"] = {**spec["tracking"], "tensorboard": beside(spec["tracking"]["tensorboard"])}
    return spec


def read_spec_file(path: Path) -> dict[str, Any]:
    """The mapping a spec file holds (JSON for .json, else YAML); SpecError names the file."""
    try:
        text = path.read_text()
    except OSError as e:
        msg = f"{path}: cannot read spec ({e.strerror})"
        raise SpecError(msg, [{"field": "(file)", "message": msg}]) from None
    return spec_mapping(text, is_json=path.suffix == ".json", origin=str(path))


def spec_mapping(text: str, is_json: bool, origin: str) -> dict[str, Any]:
    """The mapping of fields that spec text holds, JSON or YAML: the one parser of spec files and request
    bodies. SpecSyntaxError when the text is not JSON/YAML at all, SpecError when it holds no mapping."""
    import yaml  # here: the actors import this module and never read spec text

    kind = "JSON" if is_json else "YAML"
    try:
        if is_json:
            data = json.loads(text)
        else:  # a named stream: YAML's errors then say where, not "<unicode string>"
            stream = io.StringIO(text)
            stream.name = origin
            data = yaml.safe_load(stream)
    except (ValueError, yaml.YAMLError, RecursionError) as e:  # JSON's errors are ValueErrors
        msg = f"{origin}: not valid {kind}: {e}"
        raise SpecSyntaxError(msg, [{"field": "(file)", "message": msg}]) from None
    if not isinstance(data, dict):
        msg = f"{origin}: the spec must be a mapping of fields, got {type(data).__name__}"
        raise SpecError(msg, [{"field": "(file)", "message": msg}])
    return data


def _allowed(annotation) -> str:
    """Literal choices as a|b|c, other types by name (``int or null``)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    nullable = " or null" if type(None) in get_args(annotation) else ""
    if get_origin(annotation) is Literal:
        return " \\| ".join(map(str, args))
    if get_origin(annotation) is list:
        return f"list of {args[0].__name__}"
    if args and get_origin(args[0]) is Literal:
        return " \\| ".join(map(str, get_args(args[0]))) + nullable
    if args:
        return " or ".join(getattr(a, "__name__", str(a)) for a in args) + nullable
    return getattr(annotation, "__name__", str(annotation))


def spec_reference() -> str:
    """Every JobSpec field as a Markdown table: README's spec reference is this text, verbatim."""
    rows = ["| field | allowed | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                walk(info.annotation, f"{prefix}{name}.")
                continue
            default = json.dumps(info.get_default(call_default_factory=True))
            meaning = info.description.replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {_allowed(info.annotation)} | `{default}` | {meaning} |")

    walk(JobSpec, "")
    return "\n".join(rows) + "\n"
